"""The QA-LoRA linear layer as one autograd Function over the fused dequant kernel (docs/design.md §7).

Forward, for ``x`` ``[T, in]``, with ``M = c * (B @ A)`` ``[out, G]`` and ``c = s * k``:

    W_eff = scale * (q - zero) + M[:, g(i)]          one Triton pass (triton_dequant)
    y     = x @ W_eff.T + bias                        one GEMM

which equals the reference ``x @ W_hat.T + bias + c * (pool_sum(x) @ A.T) @ B.T`` because
``x @ M[:, g].T = pool_sum(x) @ M.T``. Backward, for ``gy`` ``[T, out]``:

    dx    = gy @ W_eff                                one GEMM (W_eff re-dequantized, not kept)
    dL/dM = gy.T @ pool_sum(x)                        [out, G], a thin GEMM
    dB    = c * dL/dM @ A.T,   dA = c * B.T @ dL/dM   tiny

Only ``pool_sum(x)`` (``[T, G]``, ``group_size`` times smaller than ``x``) is saved for backward;
the weight is re-dequantized (0.3 ms for a 7B layer's 7 projections on an H100, docs/design.md §7)
rather than kept, unless ``keep_weight=True``.

Dtypes: the weight and both GEMMs run in ``compute_dtype``; ``M`` and the adapter gradients are
float32 (float64 when computing in float64); ``pool_sum`` accumulates in float32. Autocast is
switched off inside the Function (``train`` runs under bf16 autocast on CUDA), so that these
dtypes hold there too: otherwise ``B @ A`` would be rounded to bf16 before it is folded in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from qalora_export.modeling.kernels.triton_dequant import dequantize_effective_weight


@dataclass(frozen=True)
class PackedBase:
    """The frozen packed base of one layer, as :class:`QALoRALinear` holds it."""

    qweight: torch.Tensor  # int32 [packed_length(in, bits), out]
    scales: torch.Tensor  # [G, out]
    zeros: torch.Tensor  # [G, out]
    g_idx: torch.Tensor  # int [in]
    bits: int
    in_features: int
    num_groups: int
    contiguous_groups: bool

    @classmethod
    def of(cls, module) -> "PackedBase":
        return cls(module.qweight, module.scales, module.zeros, module.g_idx, module.bits, module.in_features,
                   module.num_groups, module.contiguous_groups)

    def effective_weight_t(self, delta: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """``W_eff.T`` ``[in, out]`` in ``dtype``."""
        return dequantize_effective_weight(self.qweight, self.scales, self.zeros, self.g_idx, self.bits,
                                           self.in_features, delta, dtype=dtype, transpose=True)


def pool_sum(x: torch.Tensor, base: PackedBase, dtype: torch.dtype) -> torch.Tensor:
    """Sum of ``x`` ``[T, in]`` over each quantization group: ``[T, G]`` in ``dtype`` (accumulated in it)."""
    if base.contiguous_groups:
        return x.unflatten(-1, (base.num_groups, -1)).sum(-1, dtype=dtype)
    out = torch.zeros(x.shape[:-1] + (base.num_groups,), dtype=dtype, device=x.device)
    return out.index_add_(-1, base.g_idx.to(x.device), x.to(dtype))


def adapter_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def adapter_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``M = factor * (B @ A)`` ``[out, G]``."""
    return (lora_b.to(dtype) @ lora_a.to(dtype)) * factor


class FusedQALoRALinearFunction(torch.autograd.Function):
    """Autograd over the fused kernel; inputs ``(x [T, in], lora_A, lora_B, bias, base, factor, compute_dtype,
    keep_weight)``; ``lora_A``/``lora_B`` may be None (no adapter). ``x`` must already be in ``compute_dtype``."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, base: PackedBase, factor: float, compute_dtype: torch.dtype,
                keep_weight: bool = False):
        with torch.autocast(x.device.type, enabled=False):
            return FusedQALoRALinearFunction._forward(ctx, x, lora_a, lora_b, bias, base, factor, compute_dtype,
                                                      keep_weight)

    @staticmethod
    def _forward(ctx, x, lora_a, lora_b, bias, base, factor, compute_dtype, keep_weight):
        has_adapter = lora_a is not None
        mdtype = adapter_dtype(compute_dtype)
        delta = adapter_delta(lora_a, lora_b, factor, mdtype) if has_adapter else None
        wt = base.effective_weight_t(delta, compute_dtype)  # [in, out]
        y = torch.addmm(bias.to(compute_dtype), x, wt) if bias is not None else x @ wt
        adapter_grad = has_adapter and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        pooled = pool_sum(x, base, mdtype) if adapter_grad else None
        ctx.base, ctx.factor, ctx.compute_dtype = base, factor, compute_dtype
        ctx.has_adapter, ctx.adapter_grad = has_adapter, adapter_grad
        ctx.save_for_backward(pooled, lora_a, lora_b, wt if keep_weight and ctx.needs_input_grad[0] else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        with torch.autocast(gy.device.type, enabled=False):
            return FusedQALoRALinearFunction._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        pooled, lora_a, lora_b, wt = ctx.saved_tensors
        base, factor, compute_dtype = ctx.base, ctx.factor, ctx.compute_dtype
        gy = gy.to(compute_dtype)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            if wt is None:
                mdtype = adapter_dtype(compute_dtype)
                delta = adapter_delta(lora_a, lora_b, factor, mdtype) if ctx.has_adapter else None
                wt = base.effective_weight_t(delta, compute_dtype)
            dx = gy @ wt.T
        if ctx.adapter_grad:
            # dL/dM[o, g] = sum_t gy[t, o] * pool_sum(x)[t, g]; the thin [T, G] operand is cast to
            # gy's dtype (never the other way: gy is [T, out], as large as the activations).
            d_m = (gy.T @ pooled.to(gy.dtype)).to(pooled.dtype) * factor
            if ctx.needs_input_grad[1]:
                da = (lora_b.to(d_m.dtype).T @ d_m).to(lora_a.dtype)
            if ctx.needs_input_grad[2]:
                db = (d_m @ lora_a.to(d_m.dtype).T).to(lora_b.dtype)
        return dx, da, db, None, None, None, None, None


def fused_qalora_linear(x: torch.Tensor, base: PackedBase, lora_a: Optional[torch.Tensor],
                        lora_b: Optional[torch.Tensor], factor: float, bias: Optional[torch.Tensor] = None,
                        compute_dtype: torch.dtype = torch.bfloat16, keep_weight: bool = False) -> torch.Tensor:
    """``x @ W_hat.T + bias + factor * (pool_sum(x) @ A.T) @ B.T`` through the fused kernel.

    Args:
        x: ``[..., in]``; cast to ``compute_dtype`` (the result is cast back to ``x.dtype``).
        base: the packed base (:meth:`PackedBase.of` a :class:`QALoRALinear`).
        lora_a / lora_b: ``[r, G]`` / ``[out, r]`` or both None.
        factor: ``s * k`` (``alpha / r`` times the pooling convention's ``k``).
        keep_weight: keep ``W_eff`` from forward for backward instead of re-dequantizing.
    """
    n_out = base.qweight.shape[1]
    x2d = x.reshape(-1, base.in_features).to(compute_dtype)
    y = FusedQALoRALinearFunction.apply(x2d, lora_a, lora_b, bias, base, factor, compute_dtype, keep_weight)
    return y.reshape(x.shape[:-1] + (n_out,)).to(x.dtype)


def qalora_forward(module, x: torch.Tensor) -> torch.Tensor:
    """The Triton forward of a :class:`QALoRALinear` (what its ``forward`` calls when kernels are selected).

    One token without autograd (decode) goes through the GEMV kernel; everything else through
    :class:`FusedQALoRALinearFunction`.
    """
    base = PackedBase.of(module)
    has_adapter = bool(module.rank)
    lora_a, lora_b = (module.lora_A, module.lora_B) if has_adapter else (None, None)
    factor = module.k * module.scaling if has_adapter else 0.0
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or (has_adapter and (lora_a.requires_grad or lora_b.requires_grad)))
    if x.numel() == module.in_features and not needs_grad:
        from qalora_export.modeling.kernels.triton_gemv import gemv_effective_weight

        delta = adapter_delta(lora_a, lora_b, factor, adapter_dtype(module.compute_dtype)) if has_adapter else None
        y = gemv_effective_weight(x.to(module.compute_dtype), base.qweight, base.scales, base.zeros, base.g_idx,
                                  base.bits, base.in_features, delta, module.bias)
        return y.to(x.dtype)
    return fused_qalora_linear(x, base, lora_a, lora_b, factor, module.bias, module.compute_dtype)
