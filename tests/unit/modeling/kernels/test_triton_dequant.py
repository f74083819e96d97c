"""The Triton dequant pass (qalora_export.modeling.kernels.triton_dequant) against a float64 reference.

``W_eff = scale[g] * (q - zero[g]) + M[:, g]`` for 2/3/4/8-bit GPTQ-packed codes, contiguous and
act-order ``g_idx``, fractional zeros, every output dtype. On CPU the kernel runs in Triton's
interpreter (small shapes); the output is filled with NaN first so that an unwritten element fails.
Shapes are odd on purpose: ``out`` and ``in`` are not multiples of the tiles, and 3-bit ``in`` ends
in a partial packing cycle.
"""

from __future__ import annotations

import pytest
import torch

import kernel_testing as kt

kt.setup()

from qalora_export.errors import ConfigError  # noqa: E402
from qalora_export.modeling.kernels.triton_dequant import dequantize_effective_weight  # noqa: E402

IN, OUT, GS = 80, 37, 16  # 5 groups; tiles of 16 x 16 leave partial tiles on both axes


def reference(codes, scales, zeros, g_idx, delta):
    """float64 ``W_eff.T`` ``[in, out]`` and a bound on the float32 arithmetic's error per element."""
    scale = scales.double()[g_idx]
    zero = zeros.double()[g_idx]
    m = delta.double().T[g_idx]
    ref = scale * (codes.double() - zero) + m
    f32_error = 4 * kt.unit_roundoff(torch.float32) * (scale * (codes.double() + zero.abs()) + m.abs())
    return ref, f32_error


def check_close(got, ref, f32_error, dtype):
    assert got.dtype == dtype and not torch.isnan(got).any(), "unwritten (NaN) elements"
    err = (got.double() - ref).abs()
    # the kernel's arithmetic error: float32's; in float64 the same terms at float64's unit roundoff,
    # since the GPU compiler may contract scale * (q - zero) + M into one FMA (fewer roundings
    # than the reference's), which differs from the reference by more than one rounding of a
    # result that cancels (measured on an H100: 640x the bare rounding bound)
    arith = f32_error * (kt.unit_roundoff(torch.float64) / kt.unit_roundoff(torch.float32) if dtype == torch.float64 else 1)
    bound = kt.rounding_bound(ref, dtype) + arith
    worst = float((err / bound).max())
    assert worst <= 1.0, f"error up to {worst:.3g}x the {dtype} rounding bound"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_effective_weight_matches_float64_reference(bits, act_order, dtype):
    codes, qweight, scales, zeros, g_idx = kt.random_packed_base(bits, IN, OUT, GS, act_order, seed=bits)
    delta = torch.randn(OUT, IN // GS, generator=torch.Generator().manual_seed(7)).to(kt.DEVICE) * 0.01
    ref, f32_error = reference(codes, scales, zeros, g_idx, delta)
    out = torch.full((IN, OUT), float("nan"), dtype=dtype, device=kt.DEVICE)
    got = dequantize_effective_weight(qweight, scales, zeros, g_idx, bits, IN, delta.float(), dtype=dtype,
                                      out=out, block_k=16, block_n=16)
    assert got is out
    check_close(got, ref, f32_error, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_row_major_layout_default_tiles_and_no_delta(dtype):
    """``transpose=False`` writes ``[out, in]``; the default tiles; ``delta=None`` is plain ``W_hat``."""
    codes, qweight, scales, zeros, g_idx = kt.random_packed_base(3, 96, 45, 32, True, seed=11)
    zero_delta = torch.zeros(45, 3, dtype=torch.float64, device=kt.DEVICE)
    ref, f32_error = reference(codes, scales, zeros, g_idx, zero_delta)
    out = torch.full((45, 96), float("nan"), dtype=dtype, device=kt.DEVICE)
    got = dequantize_effective_weight(qweight, scales, zeros, g_idx, 3, 96, None, dtype=dtype, transpose=False,
                                      out=out)
    check_close(got.T, ref, f32_error, dtype)


def test_same_bits_as_the_reference_layer_in_float32():
    """Without a delta the float32 kernel does the reference layer's float32 operations: equal bits."""
    from qalora_export.modeling.qalora_linear import QALoRALinear
    from qalora_export.core.record import quantize_rtn

    gen = torch.Generator().manual_seed(5)
    g_idx = (torch.arange(64) // 16)[torch.randperm(64, generator=gen)]
    layer = quantize_rtn("l", torch.randn(21, 64, generator=gen), 4, 16, g_idx=g_idx)
    layer = layer.with_zeros(layer.zeros + 0.3125)
    module = QALoRALinear(layer).to(kt.DEVICE)
    got = dequantize_effective_weight(module.qweight, module.scales, module.zeros, module.g_idx, 4, 64,
                                      dtype=torch.float32, transpose=False, block_k=16, block_n=16)
    assert torch.equal(got, module.dequantized_weight(torch.float32))


def test_bad_input_is_refused_with_a_typed_error():
    codes, qweight, scales, zeros, g_idx = kt.random_packed_base(4, 32, 8, 16, False, seed=1)
    with pytest.raises(ConfigError, match="qweight has"):
        dequantize_effective_weight(qweight, scales, zeros, g_idx, 4, 64)
    with pytest.raises(ConfigError, match=r"delta M must be \[out, G\]"):
        dequantize_effective_weight(qweight, scales, zeros, g_idx, 4, 32, torch.zeros(2, 8, device=kt.DEVICE))
    with pytest.raises(ConfigError, match="bits=5"):
        dequantize_effective_weight(qweight, scales, zeros, g_idx, 5, 32)
