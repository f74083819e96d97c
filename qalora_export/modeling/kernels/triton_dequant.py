"""Triton dequantization of packed GPTQ codes with the QA-LoRA delta folded in (docs/design.md §2, §7).

One pass over the packed base writes the effective weight

    W_eff[o, i] = scale[g(i), o] * (q[o, i] - zero[g(i), o]) + M[o, g(i)]

where ``M = s * k * (B @ A)`` (``[out, G]``, computed by the caller with torch: it is tiny) is the
QA-LoRA delta, constant inside each (row, group) — the fold of ``fold.py`` done at every step, so
that the adapter costs no full-size elementwise pass of its own and a training step is one GEMM
per direction.

Inputs, as :class:`qalora_export.modeling.qalora_linear.QALoRALinear` holds them:

- ``qweight`` int32 ``[packed_length(in, b), out]``: codes packed along ``in``, LSB-first, one
  little-endian bit stream per column (``packing.py``); code ``i`` occupies stream bits
  ``[b*i, b*i + b)``, i.e. word ``b*i // 32`` at offset ``b*i % 32``. For b = 3 codes 10 and 21 of
  every 32-code cycle straddle into the next word; for b in {2, 4, 8} no code straddles.
- ``scales`` ``[G, out]`` (float32), ``zeros`` ``[G, out]`` (any float dtype, float64 in the layer;
  fractional zeros — a folded layer — work), ``g_idx`` integer ``[in]`` (contiguous or act-order).
- ``M`` optional ``[out, G]``.

Arithmetic: float32 (``(q - zero_f32) * scale`` then ``+ M``, the reference layer's float32
operations plus the delta), rounded once to the output dtype; float64 throughout when the output
is float64 (for exact tests).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qalora_export.core.packing import SUPPORTED_BITS, packed_length
from qalora_export.errors import ConfigError

# Tile of the dequant pass: BLOCK_K codes along ``in`` by BLOCK_N output rows. Writes are
# coalesced along ``out`` (the packed words' contiguous axis). Not tuned on a GPU yet
# (docs/kernels.md).
DEQUANT_BLOCK_K = 32
DEQUANT_BLOCK_N = 128
DEQUANT_NUM_WARPS = 4


@triton.jit
def unpack_codes_tile(qw_ptr, stride_qk, stride_qn, offs_k, offs_n, mask, BITS: tl.constexpr):
    """Codes ``q[offs_k, offs_n]`` (int32, shape ``[BK, BN]``) from the packed words.

    ``offs_k`` is ``[BK, 1]``, ``offs_n`` ``[1, BN]``, ``mask`` ``[BK, BN]``. Shifts are done on
    the unsigned bit pattern so that the sign bit of the int32 word never smears in.
    """
    bitpos = offs_k * BITS
    word = bitpos // 32
    shift = bitpos % 32
    lo = tl.load(qw_ptr + word * stride_qk + offs_n * stride_qn, mask=mask, other=0)
    code = lo.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
    if BITS == 3:
        # The high bits of a straddling code come from the next word; a shift of 32 is undefined
        # on the GPU, so the non-straddling lanes shift by 0 a masked-off (zero) word instead.
        straddles = (shift + BITS) > 32
        hi = tl.load(qw_ptr + (word + 1) * stride_qk + offs_n * stride_qn, mask=mask & straddles, other=0)
        hi_shift = tl.where(straddles, 32 - shift, 0)
        code = code | (hi.to(tl.uint32, bitcast=True) << hi_shift.to(tl.uint32))
    return (code & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def dequant_tile(qw_ptr, scales_ptr, zeros_ptr, m_ptr, gidx_ptr,
                 stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_mn, stride_mg,
                 offs_k, offs_n, mask_k, mask_n,
                 BITS: tl.constexpr, HAS_M: tl.constexpr, F64: tl.constexpr):
    """``W_eff`` tile ``[BK, BN]`` (rows: input columns ``offs_k`` ``[BK]``, cols: outputs ``offs_n`` ``[BN]``).

    Float32 (float64 if ``F64``); masked-off lanes hold garbage-free zeros-derived values and must
    not be stored.
    """
    k2 = offs_k[:, None]
    n2 = offs_n[None, :]
    mask = mask_k[:, None] & mask_n[None, :]
    code = unpack_codes_tile(qw_ptr, stride_qk, stride_qn, k2, n2, mask, BITS)
    g = tl.load(gidx_ptr + offs_k, mask=mask_k, other=0)[:, None]
    scale = tl.load(scales_ptr + g * stride_sg + n2 * stride_sn, mask=mask, other=0.0)
    zero = tl.load(zeros_ptr + g * stride_zg + n2 * stride_zn, mask=mask, other=0.0)
    if F64:
        w = scale.to(tl.float64) * (code.to(tl.float64) - zero.to(tl.float64))
    else:
        w = (code.to(tl.float32) - zero.to(tl.float32)) * scale.to(tl.float32)
    if HAS_M:
        m = tl.load(m_ptr + n2 * stride_mn + g * stride_mg, mask=mask, other=0.0)
        w = w + m.to(w.dtype)
    return w


@triton.jit
def _dequant_kernel(qw_ptr, scales_ptr, zeros_ptr, m_ptr, gidx_ptr, out_ptr, K, N,
                    stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_mn, stride_mg,
                    stride_ok, stride_on,
                    BITS: tl.constexpr, HAS_M: tl.constexpr, F64: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_k = offs_k < K
    mask_n = offs_n < N
    w = dequant_tile(qw_ptr, scales_ptr, zeros_ptr, m_ptr, gidx_ptr,
                     stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_mn, stride_mg,
                     offs_k, offs_n, mask_k, mask_n, BITS, HAS_M, F64)
    out_ptrs = out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


def check_packed_base(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, in_features: int, delta: Optional[torch.Tensor] = None) -> None:
    """Shape/dtype checks shared by the kernels (typed errors naming the tensor and the rule)."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"bits={bits} is not supported by the kernels; use one of {SUPPORTED_BITS}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ConfigError(f"qweight must be a 2-D int32 tensor [in*bits/32, out], got {qweight.dtype} "
                          f"{tuple(qweight.shape)}")
    out = qweight.shape[1]
    if qweight.shape[0] != packed_length(in_features, bits):
        raise ConfigError(f"qweight has {qweight.shape[0]} rows; {in_features} {bits}-bit codes need "
                          f"{packed_length(in_features, bits)}")
    if scales.dim() != 2 or scales.shape[1] != out or zeros.shape != scales.shape:
        raise ConfigError(f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be [G, {out}]")
    if g_idx.shape != (in_features,) or g_idx.dtype.is_floating_point:
        raise ConfigError(f"g_idx must be an integer tensor [{in_features}], got {g_idx.dtype} {tuple(g_idx.shape)}")
    if delta is not None and tuple(delta.shape) != (out, scales.shape[0]):
        raise ConfigError(f"the adapter delta M must be [out, G] = [{out}, {scales.shape[0]}], got "
                          f"{tuple(delta.shape)}")
    devices = {t.device for t in (qweight, scales, zeros, g_idx) + ((delta,) if delta is not None else ())}
    if len(devices) != 1:
        raise ConfigError(f"the packed base and adapter delta must be on one device, got {sorted(map(str, devices))}")


def dequantize_effective_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                g_idx: torch.Tensor, bits: int, in_features: int,
                                delta: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.bfloat16,
                                transpose: bool = True, out: Optional[torch.Tensor] = None,
                                block_k: int = DEQUANT_BLOCK_K, block_n: int = DEQUANT_BLOCK_N) -> torch.Tensor:
    """``W_eff`` from the packed base in one Triton pass.

    Args:
        qweight / scales / zeros / g_idx / bits / in_features: the packed base (module docstring).
        delta: ``M = s * k * (B @ A)`` ``[out, G]`` or None (plain ``W_hat``).
        dtype: output dtype (bfloat16, float16, float32 or float64).
        transpose: True writes ``W_eff.T`` ``[in, out]`` (the packed layout: coalesced, and what
            ``x @ W_eff.T`` reads as a plain ``[in, out]`` operand); False writes ``[out, in]``.
        out: optional preallocated output of that shape and dtype (any strides).
        block_k / block_n: tile sizes (powers of two; tests use small ones).

    Returns:
        ``[in, out]`` (``transpose``) or ``[out, in]`` tensor of ``dtype``.

    Example (on CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)::

        wt = dequantize_effective_weight(m.qweight, m.scales, m.zeros, m.g_idx, m.bits, m.in_features,
                                         delta, dtype=torch.bfloat16)
        y = x @ wt
    """
    check_packed_base(qweight, scales, zeros, g_idx, bits, in_features, delta)
    n_out = qweight.shape[1]
    shape = (in_features, n_out) if transpose else (n_out, in_features)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=qweight.device)
    elif tuple(out.shape) != shape or out.dtype != dtype:
        raise ConfigError(f"out must be {shape} {dtype}, got {tuple(out.shape)} {out.dtype}")
    stride_ok, stride_on = (out.stride(0), out.stride(1)) if transpose else (out.stride(1), out.stride(0))
    m = delta if delta is not None else scales  # a valid pointer; never read when HAS_M is False
    grid = (triton.cdiv(in_features, block_k), triton.cdiv(n_out, block_n))
    _dequant_kernel[grid](
        qweight, scales, zeros, m, g_idx, out, in_features, n_out,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        m.stride(0), m.stride(1), stride_ok, stride_on,
        BITS=bits, HAS_M=delta is not None, F64=dtype == torch.float64,
        BLOCK_K=block_k, BLOCK_N=block_n, num_warps=DEQUANT_NUM_WARPS)
    return out
