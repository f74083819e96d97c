"""The batch-1 decode kernel (qalora_export.modeling.kernels.triton_gemv) against a float64 reference.

``y = W_eff @ x + bias`` with the packed codes dequantized on the fly: 2/3/4/8 bits, contiguous
and act-order ``g_idx``, fractional zeros, with and without the adapter delta, split-K on and off.
On CPU it runs in Triton's interpreter. The partial-sum workspace is filled with NaN first, so a
program that writes nothing fails the test.
"""

from __future__ import annotations

import pytest
import torch

import kernel_testing as kt

kt.setup()

from qalora_export.errors import ConfigError  # noqa: E402
from qalora_export.modeling.kernels.triton_gemv import gemv_effective_weight  # noqa: E402

IN, OUT, GS = 80, 37, 16


def reference(codes, scales, zeros, g_idx, delta, x, bias):
    """float64 ``y``, a bound on the kernel's float32 error (dequant, products, the sum), and
    ``|x| @ |W_eff.T| + |bias|`` (the scale of the float64 summation error)."""
    scale = scales.double()[g_idx]
    zero = zeros.double()[g_idx]
    m = delta.double().T[g_idx] if delta is not None else torch.zeros_like(scale)
    w = scale * (codes.double() - zero) + m  # [in, out]
    xd = x.double().reshape(-1)
    y = xd @ w + bias.double()
    w_err = 4 * kt.unit_roundoff(torch.float32) * (scale * (codes.double() + zero.abs()) + m.abs())
    sum_err = (IN + 2) * kt.unit_roundoff(torch.float32) * ((xd.abs() @ w.abs()) + bias.double().abs())
    magnitude = xd.abs() @ w.abs() + bias.double().abs()
    return y, xd.abs() @ w_err + sum_err, magnitude


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("split_k", [1, 3])
def test_decode_matches_float64_reference(bits, act_order, split_k):
    codes, qweight, scales, zeros, g_idx = kt.random_packed_base(bits, IN, OUT, GS, act_order, seed=20 + bits)
    gen = torch.Generator().manual_seed(bits)
    delta = (torch.randn(OUT, IN // GS, generator=gen) * 0.01).to(kt.DEVICE)
    bias = torch.randn(OUT, generator=gen).to(kt.DEVICE)
    x = torch.randn(1, IN, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    ref, _, magnitude = reference(codes, scales, zeros, g_idx, delta, x, bias)
    workspace = torch.full((4, OUT), float("nan"), dtype=torch.float64, device=kt.DEVICE)
    got = gemv_effective_weight(x, qweight, scales, zeros, g_idx, bits, IN, delta, bias, split_k=split_k,
                                workspace=workspace, block_k=16, block_n=16)
    assert got.shape == (1, OUT) and got.dtype == torch.float64 and not torch.isnan(got).any()
    # float64 accumulation: only float64 rounding of the sum
    assert ((got[0] - ref).abs() <= (IN + 2) * kt.unit_roundoff(torch.float64) * magnitude).all()
    assert not torch.isnan(workspace[:split_k]).any()  # every slice written (IN = 80: 3 slices of 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [4, 3])
def test_decode_low_precision_inputs(dtype, bits):
    """float32 accumulation, the result rounded once to ``x``'s dtype; no delta; default split and tiles."""
    codes, qweight, scales, zeros, g_idx = kt.random_packed_base(bits, 192, 70, 32, bits == 3, seed=5)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(192, generator=gen).to(dtype).to(kt.DEVICE)
    bias = torch.randn(70, generator=gen).to(kt.DEVICE)
    ref, f32_error, _ = reference(codes, scales, zeros, g_idx, None, x, bias)
    got = gemv_effective_weight(x, qweight, scales, zeros, g_idx, bits, 192, None, bias)
    assert got.shape == (70,) and got.dtype == dtype
    bound = kt.rounding_bound(ref, dtype) + f32_error * 1.01
    assert ((got.double() - ref).abs() <= bound).all()


def test_more_than_one_token_is_refused():
    _, qweight, scales, zeros, g_idx = kt.random_packed_base(4, 32, 8, 16, False, seed=1)
    with pytest.raises(ConfigError, match="one token"):
        gemv_effective_weight(torch.randn(2, 32, device=kt.DEVICE), qweight, scales, zeros, g_idx, 4, 32)
