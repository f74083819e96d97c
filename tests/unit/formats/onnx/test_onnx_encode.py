"""encode_linear (qalora_export/formats/onnx/encode.py): a folded record -> MatMulNBits inputs, decoded back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_export.core.record import QuantizedLinear, contiguous_g_idx
from qalora_export.errors import FormatLimitError
from qalora_export.formats.onnx import encode as onnx_encode
from qalora_export.formats.onnx import spec as spec


def _record(bits, group_size, groups, out, act_order, fractional, seed) -> QuantizedLinear:
    rng = np.random.default_rng(seed)
    k = group_size * groups
    g_idx = contiguous_g_idx(k, group_size)
    if act_order:
        g_idx = g_idx[torch.from_numpy(rng.permutation(k))]
    zeros = rng.integers(0, 1 << bits, (groups, out)).astype(np.float64)
    if fractional:
        zeros += rng.normal(0, 0.7, zeros.shape)  # a fold moves zeros by fractions, even out of range
    return QuantizedLinear(
        name="layer", bits=bits, group_size=group_size,
        codes=torch.from_numpy(rng.integers(0, 1 << bits, (out, k)).astype(np.uint8)),
        scales=torch.from_numpy(rng.uniform(1e-3, 1e-1, (groups, out)).astype(np.float16).astype(np.float32)),
        zeros=torch.from_numpy(zeros), g_idx=g_idx)


def _decode(lin) -> np.ndarray:
    """What the node computes, as a weight over the original column order (read_weights' rule)."""
    k_blocks = lin.b.shape[1]
    if lin.zero_points.dtype == np.uint8:
        zeros = spec.unpack_zero_points(lin.zero_points, lin.bits, k_blocks)
    else:
        zeros = lin.zero_points
    w = spec.dequantize(spec.unpack_b(lin.b, lin.bits, lin.k), lin.scales, zeros, lin.block_size)
    if lin.zero_residual is not None:
        r = lin.zero_residual.astype(np.float64)
        w = w - np.repeat(r.T, lin.k // r.shape[0], axis=1)
    if lin.perm is not None:
        unpermuted = np.empty_like(w)
        unpermuted[:, lin.perm] = w
        w = unpermuted
    return w


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.sampled_from([16, 32, 48, 64, 96]), st.integers(1, 4),
       st.integers(1, 9), st.booleans(), st.integers(0, 2**31 - 1))
def test_split_holds_any_fold_exactly(bits, group_size, groups, out, act_order, seed):
    layer = _record(bits, group_size, groups, out, act_order, fractional=True, seed=seed)
    lin, stats = onnx_encode.encode_linear(layer, "split")
    ref = layer.dequantize(torch.float64).numpy()
    assert not stats["rounded"]
    assert np.abs(_decode(lin) - ref).max() <= spec.WEIGHT_TOLERANCE * np.abs(ref).max()


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 3, 4]), st.sampled_from([16, 32, 64]), st.integers(1, 4), st.integers(1, 9),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_float_zero_points_exact(bits, group_size, groups, out, act_order, seed):
    layer = _record(bits, group_size, groups, out, act_order, fractional=True, seed=seed)
    lin, _ = onnx_encode.encode_linear(layer, "float")
    ref = layer.dequantize(torch.float64).numpy()
    assert np.abs(_decode(lin) - ref).max() <= spec.WEIGHT_TOLERANCE * np.abs(ref).max()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uint8_integral_zero_points_bit_exact(bits):
    layer = _record(bits, 32, 3, 5, act_order=False, fractional=False, seed=bits)
    lin, stats = onnx_encode.encode_linear(layer, "uint8")
    assert stats["max_abs_error"] == 0.0 and lin.zero_residual is None
    np.testing.assert_array_equal(_decode(lin), layer.dequantize(torch.float64).numpy())


def test_uint8_fractional_refused_names_flags():
    layer = _record(4, 32, 2, 3, act_order=False, fractional=True, seed=1)
    with pytest.raises(FormatLimitError, match="--allow-rounding") as exc:
        onnx_encode.encode_linear(layer, "uint8")
    assert "layer" in str(exc.value)


def test_act_order_with_unequal_groups_refused():
    layer = _record(4, 16, 2, 3, act_order=False, fractional=False, seed=2)
    g_idx = layer.g_idx.clone()
    g_idx[0] = 1  # group 0 now has 15 columns, group 1 has 17
    with pytest.raises(FormatLimitError, match="act-order"):
        onnx_encode.encode_linear(QuantizedLinear(**{**layer.__dict__, "g_idx": g_idx}), "float")
