"""Batch-1 decode: ``y = W_eff @ x`` with the packed codes dequantized on the fly (Triton GEMV).

At batch 1 a linear layer is bound by reading its weight, so the kernel reads the packed codes
(``bits/16`` of a bf16 weight's bytes) plus the per-group ``scale``/``zero`` and never writes a
dequantized copy. ``W_eff`` is the same tile as the training kernel's
(:func:`.triton_dequant.dequant_tile`): float zero-points, act-order ``g_idx``, and an optional
adapter delta ``M = s * k * (B @ A)`` ``[out, G]`` folded in (the unmerged model decodes at the
merged model's cost). Written for int4 first; 2, 3 and 8 bits go through the same unpacking.

Grid: ``(cdiv(out, BLOCK_N), split_k)``. Each program accumulates ``BLOCK_N`` outputs over one
slice of ``in`` in float32 (float64 for float64 inputs) and writes a partial sum to
``[split_k, out]``; the slices are summed by torch (deterministic, no atomics). ``split_k`` is
chosen so that about two programs run per SM.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from qalora_export.errors import ConfigError
from qalora_export.modeling.kernels.triton_dequant import check_packed_base, dequant_tile

GEMV_BLOCK_K = 128
GEMV_BLOCK_N = 64
GEMV_NUM_WARPS = 4


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, m_ptr, gidx_ptr, part_ptr, K, N, K_PER_SPLIT,
                 stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_mn, stride_mg,
                 BITS: tl.constexpr, HAS_M: tl.constexpr, F64: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if F64:
        acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):  # K_PER_SPLIT is a multiple of BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = dequant_tile(qw_ptr, scales_ptr, zeros_ptr, m_ptr, gidx_ptr,
                         stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_mn, stride_mg,
                         offs_k, offs_n, mask_k, mask_n, BITS, HAS_M, F64)
        x = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(w.dtype)
        w = tl.where(mask_k[:, None], w, 0.0)
        acc += tl.sum(w * x[:, None], axis=0)
    tl.store(part_ptr + pid_s * N + offs_n, acc, mask=mask_n)


def default_split_k(k: int, n_blocks: int, block_k: int, device: torch.device) -> int:
    """About two programs per SM on CUDA; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(k, block_k), triton.cdiv(2 * sms, n_blocks)))


def gemv_effective_weight(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          g_idx: torch.Tensor, bits: int, in_features: int,
                          delta: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                          split_k: Optional[int] = None, workspace: Optional[torch.Tensor] = None,
                          block_k: int = GEMV_BLOCK_K, block_n: int = GEMV_BLOCK_N) -> torch.Tensor:
    """``x @ W_eff.T + bias`` for one token.

    Args:
        x: ``[in]`` or ``[1, in]`` (any float dtype; accumulation is float32, float64 for float64).
        qweight / scales / zeros / g_idx / bits / in_features: the packed base
            (:mod:`.triton_dequant`).
        delta: adapter delta ``M`` ``[out, G]`` or None.
        bias: ``[out]`` or None.
        split_k: slices of ``in`` run by separate programs (default: :func:`default_split_k`).
        workspace: optional float32 (float64 for float64 ``x``) buffer for the partial sums, at
            least ``[split_k, out]`` after ``split_k`` is rounded to whole ``block_k`` slices
            (reuse one across calls to avoid an allocation per token).

    Returns:
        ``[out]`` (or ``[1, out]`` for a ``[1, in]`` input) in ``x.dtype``.
    """
    check_packed_base(qweight, scales, zeros, g_idx, bits, in_features, delta)
    if x.shape[-1] != in_features or x.numel() != in_features:
        raise ConfigError(f"the decode kernel takes one token [{in_features}] or [1, {in_features}], "
                          f"got {tuple(x.shape)}")
    n_out = qweight.shape[1]
    xv = x.reshape(in_features).contiguous()
    f64 = x.dtype == torch.float64
    n_blocks = triton.cdiv(n_out, block_n)
    if split_k is None:
        split_k = default_split_k(in_features, n_blocks, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(in_features, split_k), block_k) * block_k
    split_k = triton.cdiv(in_features, k_per_split)
    acc_dtype = torch.float64 if f64 else torch.float32
    if workspace is None:
        partial = torch.empty((split_k, n_out), dtype=acc_dtype, device=x.device)
    elif workspace.dtype != acc_dtype or workspace.numel() < split_k * n_out or not workspace.is_contiguous():
        raise ConfigError(f"workspace must be a contiguous {acc_dtype} tensor of at least {split_k} x {n_out} "
                          f"elements, got {workspace.dtype} {tuple(workspace.shape)}")
    else:
        partial = workspace.view(-1)[:split_k * n_out].view(split_k, n_out)
    m = delta if delta is not None else scales  # never read when HAS_M is False
    _gemv_kernel[(n_blocks, split_k)](
        xv, qweight, scales, zeros, m, g_idx, partial, in_features, n_out, k_per_split,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        m.stride(0), m.stride(1),
        BITS=bits, HAS_M=delta is not None, F64=f64, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=GEMV_NUM_WARPS)
    y = partial[0] if split_k == 1 else partial.sum(0)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(x.shape[:-1] + (n_out,))
