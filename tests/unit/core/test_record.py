"""Tests of qalora_export.core.record: the QuantizedLinear record and min-max RTN quantization."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_export.errors import ConfigError
from qalora_export.core.record import QuantizedLinear, check_quant_args, contiguous_g_idx, quantize_rtn


def on_grid_weight(out: int, in_: int, bits: int, group_size: int, seed: int):
    """A weight exactly on an RTN grid: per group, codes hit 0 and 2**b - 1 and the zero is an
    integer in [0, 2**b - 1], so min-max recovers the same scale, zero and codes exactly.

    Returns (weight float32 [out, in], codes [out, in], scale [G, out], zero [G, out])."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    G = in_ // group_size
    codes = torch.randint(0, maxq + 1, (out, G, group_size), generator=gen)
    codes[:, :, 0] = 0
    codes[:, :, 1] = maxq
    codes = codes.reshape(out, in_)
    scale = 2.0 ** -torch.randint(4, 9, (G, out), generator=gen).to(torch.float64)  # exact in fp16
    zero = torch.randint(0, maxq + 1, (G, out), generator=gen).to(torch.float64)
    g = contiguous_g_idx(in_, group_size)
    weight = scale[g].T * (codes.to(torch.float64) - zero[g].T)
    return weight.to(torch.float32), codes, scale, zero


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weights_on_grid_are_recovered_exactly(bits):
    weight, codes, scale, zero = on_grid_weight(6, 64, bits, 16, seed=bits)
    rec = quantize_rtn("lin", weight, bits, 16)
    assert torch.equal(rec.codes.to(torch.int64), codes)
    assert torch.equal(rec.scales.to(torch.float64), scale)
    assert torch.equal(rec.zeros, zero)
    assert torch.equal(rec.dequantize(torch.float32), weight)


def test_record_shapes_dtypes_and_properties():
    w = torch.randn(5, 96)
    bias = torch.randn(5)
    rec = quantize_rtn("model.layers.0.mlp.up_proj", w, 4, 32, bias=bias)
    assert rec.codes.dtype == torch.uint8 and rec.codes.shape == (5, 96)
    assert rec.scales.dtype == torch.float32 and rec.scales.shape == (3, 5)
    assert rec.zeros.dtype == torch.float64 and rec.zeros.shape == (3, 5)
    assert rec.g_idx.dtype == torch.int64 and torch.equal(rec.g_idx, torch.arange(96) // 32)
    assert rec.out_features == 5 and rec.in_features == 96 and rec.num_groups == 3
    assert not rec.is_act_order
    assert torch.equal(rec.bias, bias)
    # stored scales are fp16 values
    assert torch.equal(rec.scales, rec.scales.half().float())
    assert rec.dequantize().dtype == torch.float64
    assert rec.dequantize(torch.float16).dtype == torch.float16


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), out=st.integers(1, 6), groups=st.integers(1, 4),
       group_size=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1e-3, 0.1, 3.0]), min_zero=st.sampled_from([0, 1]))
def test_rtn_error_bound_and_ranges(bits, out, groups, group_size, seed, magnitude, min_zero):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups * group_size, generator=gen) * magnitude
    rec = quantize_rtn("lin", w, bits, group_size, min_zero=min_zero)
    maxq = (1 << bits) - 1
    assert int(rec.codes.max()) <= maxq
    assert torch.equal(rec.zeros, torch.round(rec.zeros))
    assert float(rec.zeros.min()) >= min_zero and float(rec.zeros.max()) <= maxq
    assert bool((rec.scales > 0).all()) and bool(torch.isfinite(rec.scales).all())
    err = (rec.dequantize() - w.to(torch.float64)).abs()
    # Half a step, plus the fp16 rounding of the scale accumulated over the code range
    # (values at the top of the range may clamp), plus one step when min_zero pushes the zero up.
    # fp16 stores the scale with a relative error of 2^-11, or an absolute one of 2^-25 where the
    # scale is subnormal in fp16 (below 2^-14: tiny weights), whichever is larger.
    step = rec.scales.to(torch.float64)[rec.g_idx].T
    scale_rounding = torch.maximum(step * 2.0 ** -11, torch.full_like(step, 2.0 ** -25))
    bound = step * (0.5 + (1.0 if min_zero else 0.0)) + 2 * maxq * scale_rounding
    assert bool((err <= bound).all())


def test_min_zero_one_for_v1_format():
    w = torch.rand(4, 32) + 0.1  # all positive: min-max zero is 0
    assert float(quantize_rtn("lin", w, 4, 32).zeros.min()) == 0.0
    assert float(quantize_rtn("lin", w, 4, 32, min_zero=1).zeros.min()) == 1.0


def test_all_zero_group_and_tiny_weights_give_finite_scales():
    w = torch.zeros(3, 32)
    w[1, :] = 1e-9  # fp16 scale underflows: replaced by the smallest normal fp16 step
    rec = quantize_rtn("lin", w, 4, 16)
    assert bool(torch.isfinite(rec.scales).all()) and bool((rec.scales > 0).all())
    assert torch.equal(rec.dequantize()[0], torch.zeros(32, dtype=torch.float64))
    assert float(rec.dequantize()[1].abs().max()) < 1e-4


def test_act_order_equals_contiguous_quantization_of_permuted_columns():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 64, generator=gen)
    perm = torch.randperm(64, generator=gen)
    g_idx = (torch.arange(64) // 16)[perm]  # column perm[i] ... group of column i is g_idx[i]
    rec = quantize_rtn("lin", w, 3, 16, g_idx=g_idx)
    assert rec.is_act_order and torch.equal(rec.g_idx, g_idx)
    order = torch.argsort(g_idx, stable=True)
    ref = quantize_rtn("lin", w[:, order], 3, 16)
    assert torch.equal(rec.codes[:, order], ref.codes)
    assert torch.equal(rec.scales, ref.scales)
    assert torch.equal(rec.zeros, ref.zeros)
    assert torch.equal(rec.dequantize()[:, order], ref.dequantize())


def test_with_zeros_shares_codes_and_leaves_original():
    rec = quantize_rtn("lin", torch.randn(4, 32), 4, 16)
    zeros_before = rec.zeros.clone()
    new = rec.with_zeros(rec.zeros + 0.5)
    assert new.codes is rec.codes and new.scales is rec.scales
    assert torch.equal(rec.zeros, zeros_before)
    assert torch.allclose(new.dequantize(), rec.dequantize() - 0.5 * rec.scales.double()[rec.g_idx].T)


def test_dequantize_formula_with_fractional_zeros():
    rec = QuantizedLinear(name="x", bits=2, group_size=2, codes=torch.tensor([[0, 3, 1, 2]], dtype=torch.uint8),
                          scales=torch.tensor([[0.5], [2.0]]), zeros=torch.tensor([[1.25], [0.5]], dtype=torch.float64),
                          g_idx=torch.tensor([0, 1, 1, 0]))
    # column i uses group g_idx[i]: W = scale * (q - zero)
    expected = torch.tensor([[0.5 * (0 - 1.25), 2.0 * (3 - 0.5), 2.0 * (1 - 0.5), 0.5 * (2 - 1.25)]], dtype=torch.float64)
    assert torch.equal(rec.dequantize(), expected)
    assert rec.is_act_order


@pytest.mark.parametrize("bits, group_size, match", [
    (5, 16, r"--bits 5 is not supported"),
    (4, 48, r"--group-size 48 does not divide the 64 input features of lin"),
    (4, 0, r"--group-size 0"),
    (4, -32, r"--group-size -32"),
])
def test_bad_arguments_raise_config_error(bits, group_size, match):
    with pytest.raises(ConfigError, match=match):
        quantize_rtn("lin", torch.randn(2, 64), bits, group_size)
    with pytest.raises(ConfigError, match=match):
        check_quant_args("lin", 64, bits, group_size)


@pytest.mark.parametrize("g_idx", [
    torch.zeros(64, dtype=torch.int64),  # one group of 64
    torch.arange(64) // 8,  # 8 groups of 8
    torch.arange(32) // 16,  # wrong length
])
def test_bad_g_idx_raises(g_idx):
    with pytest.raises(ConfigError, match="g_idx must assign exactly 16 columns to each of 4 groups"):
        quantize_rtn("lin", torch.randn(2, 64), 4, 16, g_idx=g_idx)


def test_input_weight_not_modified():
    w = torch.randn(4, 32)
    before = w.clone()
    quantize_rtn("lin", w, 4, 16, g_idx=(torch.arange(32) // 16).flip(0))
    assert torch.equal(w, before)


@pytest.mark.parametrize("g_idx", [
    torch.cat([torch.tensor([-1]), torch.arange(1, 64) // 16]),  # negative group
    torch.zeros(2, 32, dtype=torch.int64),  # not 1-D
])
def test_malformed_g_idx_is_a_config_error_not_a_crash(g_idx):
    with pytest.raises(ConfigError, match="g_idx must assign"):
        quantize_rtn("lin", torch.randn(2, 64), 4, 16, g_idx=g_idx)


def test_non_2d_weight_is_a_config_error():
    with pytest.raises(ConfigError, match=r"lin: weight must be 2-D \[out, in\], got shape \(64,\)"):
        quantize_rtn("lin", torch.randn(64), 4, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_finds_every_nan_and_infinity(dtype):
    from qalora_export.core.record import all_finite

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 17, generator=gen).to(dtype)
    assert all_finite(x) and all_finite(x[:, :0]) and all_finite(x.T)  # empty and non-contiguous too
    for bad in (float("nan"), float("inf"), -float("inf")):
        for i, j in ((0, 0), (32, 16), (5, 9)):
            y = x.clone()
            y[i, j] = bad
            assert not all_finite(y) and not all_finite(y.T), (bad, i, j)
