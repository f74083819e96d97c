"""The QA-LoRA linear layer: a frozen packed quantized base plus a pooled low-rank adapter.

Forward, for ``x`` ``[..., in]`` (docs/design.md §2):

    y = x @ W_hat.T + bias + s * k * (pool_sum(x) @ A.T) @ B.T

with ``W_hat[o, i] = scale[g(i), o] * (q[o, i] - zero[g(i), o])``, ``pool_sum(x)[..., a]`` the sum
of ``x`` over the columns of pooling group ``a``, ``s = alpha / r`` and ``k`` the convention's
factor (``adapter.pooling_factor``). The adapter pools over the base's quantization groups, so
the layer stays foldable on act-order bases; on contiguous bases that is PEFT's ``i // p``.

The base is stored packed (``qweight`` int32 ``[in * b / 32, out]``, as in the checkpoint) and
dequantized at every forward; nothing but ``lora_A``/``lora_B`` takes gradients.

On CUDA with triton installed (``use_kernels="auto"``) the forward and backward run the fused
kernels of :mod:`qalora_export.modeling.kernels` (the adapter delta folded into one dequant pass, one GEMM
per direction; a GEMV for one token); this module's PyTorch path is the reference they are tested
against, and what runs on CPU.

**Integer-zero mode** (``zero_range`` given; ``train --integer-zeros``): the adapter acts in
weight space through the zero-points. The shift ``s * k * (B @ A)[o, g] / scale[g, o]`` (code
units, float64) is rounded with a straight-through estimator and clamped so that the effective
zero ``zero - shift`` stays in ``zero_range`` (:func:`qalora_export.core.fold.round_zero_shift`), and
the forward is one GEMM with ``W_eff = scale * (q - (zero - round_shift))`` — exactly the weight
the fold of the saved adapter gives. The Triton kernels do not implement this mode; it always
takes the PyTorch path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qalora_export.core.adapter import AdapterLayer, pooling_factor
from qalora_export.core.fold import round_zero_shift
from qalora_export.core.packing import pack_codes, unpack_codes_torch
from qalora_export.core.record import QuantizedLinear
from qalora_export.modeling.kernels import check_kernel_mode, kernels_selected


class QALoRALinear(nn.Module):
    """A quantized linear layer with an optional QA-LoRA adapter.

    Args:
        layer: the quantized base record (integral or float zeros).
        rank: adapter rank ``r`` (0 = no adapter).
        alpha: ``lora_alpha``.
        pooling: convention used for ``k`` ("mean", "sum", "peft").
        compute_dtype: dtype of the dequantized weight and the matmul.
        use_kernels: "auto" (Triton kernels when the tensors are on CUDA and triton is installed),
            "never" (the PyTorch reference path), "always" (the kernels; on CPU only under
            ``TRITON_INTERPRET=1``). See :mod:`qalora_export.modeling.kernels`.
        zero_range: integer-zero mode (module docstring): the inclusive range ``(lo, hi)`` of true
            zero-points of the target GPTQ format; None (default) for the float-zero adapter.
    """

    def __init__(self, layer: QuantizedLinear, rank: int = 0, alpha: float = 0.0,
                 pooling: str = "peft", compute_dtype: torch.dtype = torch.float32, use_kernels: str = "auto",
                 zero_range: Optional[tuple[int, int]] = None):
        super().__init__()
        self.zero_range = None if zero_range is None else (int(zero_range[0]), int(zero_range[1]))
        self.use_kernels = check_kernel_mode(use_kernels)
        self.name = layer.name
        self.bits = layer.bits
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.num_groups = layer.num_groups
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", pack_codes(layer.codes.T, layer.bits, dim=0), persistent=False)
        self.register_buffer("scales", layer.scales.to(torch.float32).contiguous(), persistent=False)
        self.register_buffer("zeros", layer.zeros.to(torch.float64).contiguous(), persistent=False)
        self.register_buffer("g_idx", layer.g_idx.to(torch.int64).contiguous(), persistent=False)
        self.contiguous_groups = not layer.is_act_order
        self._weight_cache: Optional[torch.Tensor] = None  # see cache_dequantized_weight
        self.register_buffer("bias", None if layer.bias is None else layer.bias.clone(), persistent=False)
        self.rank = rank
        self.pooling = pooling
        self.scaling = alpha / rank if rank else 0.0
        self.k = pooling_factor(pooling, self.in_features, self.in_features // self.num_groups) if rank else 0.0
        if rank:
            self.lora_A = nn.Parameter(torch.empty(rank, self.num_groups, dtype=torch.float32))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32))
            nn.init.kaiming_uniform_(self.lora_A, a=5 ** 0.5)
        else:
            self.lora_A = None
            self.lora_B = None

    def load_adapter(self, adapter_layer: AdapterLayer) -> None:
        """Copy trained factors in (shapes checked by the caller's adapter validation)."""
        with torch.no_grad():
            self.lora_A.copy_(adapter_layer.lora_A.to(self.lora_A.dtype))
            self.lora_B.copy_(adapter_layer.lora_B.to(self.lora_B.dtype))

    def integer_zero_points(self) -> torch.Tensor:
        """Integer-zero mode: the effective zeros ``zero - round_shift`` float64 ``[G, out]``
        (differentiable in ``A``, ``B`` through the straight-through rounding)."""
        delta = (self.lora_B.to(torch.float64) @ self.lora_A.to(torch.float64)) * (self.scaling * self.k)  # [out, G]
        shift = delta.T / self.scales.to(torch.float64)
        return self.zeros - round_zero_shift(shift, self.zeros, self.zero_range)

    def effective_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Integer-zero mode: ``W_eff = scale * (q - (zero - round_shift))`` ``[out, in]``, with grad."""
        zeros = self.integer_zero_points()
        codes = unpack_codes_torch(self.qweight, self.bits, self.in_features)  # [in, out]
        if dtype == torch.float64:
            return (self.scales.to(torch.float64)[self.g_idx] * (codes.to(torch.float64) - zeros[self.g_idx])).T
        # The same float32 elementwise operations as dequantized_weight, out of place (autograd).
        w = codes.to(torch.float32)
        zero = zeros.to(torch.float32)
        if self.contiguous_groups:
            w = ((w.view(self.num_groups, -1, self.out_features) - zero.unsqueeze(1))
                 * self.scales.unsqueeze(1)).reshape(self.in_features, self.out_features)
        else:
            w = (w - zero[self.g_idx]) * self.scales[self.g_idx]
        return w.T.to(dtype or self.compute_dtype)

    @property
    def integer_zeros(self) -> bool:
        return bool(self.rank) and self.zero_range is not None

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``W_hat`` ``[out, in]``: computed in float32 (float64 zeros applied exactly), then cast."""
        codes = unpack_codes_torch(self.qweight, self.bits, self.in_features)  # [in, out]
        if dtype == torch.float64:
            scale = self.scales[self.g_idx]  # [in, out]
            zero = self.zeros[self.g_idx]
            return (scale.to(torch.float64) * (codes.to(torch.float64) - zero)).T
        # float32, then cast: the same elementwise float32 operations as
        # ``scale[g_idx] * (codes - zero[g_idx])`` (so the same bits), done in place and, for
        # contiguous groups, broadcast per group instead of gathering [in, out] scale/zero copies:
        # this runs for every layer at every forward.
        w = codes.to(torch.float32)
        zero = self.zeros.to(torch.float32)  # [G, out]
        if self.contiguous_groups:
            grouped = w.view(self.num_groups, -1, self.out_features)  # [G, group_size, out]
            grouped.sub_(zero.unsqueeze(1)).mul_(self.scales.unsqueeze(1))
        else:
            w.sub_(zero[self.g_idx]).mul_(self.scales[self.g_idx])
        return w.T.to(dtype or self.compute_dtype)

    def cache_dequantized_weight(self, enabled: bool = True) -> None:
        """Keep ``W_hat`` (compute dtype) between forwards instead of dequantizing at every one.

        For inference loops that run every layer once per token (greedy generation), where the
        dequant pass, not the tiny GEMM, is the cost. Exact: the cached tensor is the one the
        forward would compute. Costs one float weight per layer until disabled; call it after
        moving the model to its device, and disable it before the codes or zeros change.
        The Triton kernel path (CUDA) ignores the cache. In integer-zero mode the cached tensor is
        the effective weight (adapter included), so the cache is for inference only.
        """
        if not enabled:
            self._weight_cache = None
            return
        with torch.no_grad():
            w = self.effective_weight(self.compute_dtype) if self.integer_zeros else self.dequantized_weight(self.compute_dtype)
        self._weight_cache = w.detach()

    def pool_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` ``[..., in]`` over each quantization group: ``[..., G]``."""
        if self.contiguous_groups:
            return x.unflatten(-1, (self.num_groups, -1)).sum(-1)
        out = x.new_zeros(x.shape[:-1] + (self.num_groups,))
        return out.index_add(-1, self.g_idx, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer_zeros:  # one GEMM with the adapter in the zero-points; no kernel path
            w = self._weight_cache if self._weight_cache is not None else self.effective_weight(self.compute_dtype)
            y = torch.nn.functional.linear(x.to(self.compute_dtype), w,
                                           None if self.bias is None else self.bias.to(self.compute_dtype))
            return y.to(x.dtype)
        if self.use_kernels != "never" and kernels_selected(self.use_kernels, self.qweight, x):
            from qalora_export.modeling.kernels.fused_linear import qalora_forward  # imports triton

            return qalora_forward(self, x)
        w = self._weight_cache if self._weight_cache is not None else self.dequantized_weight(self.compute_dtype)
        y = torch.nn.functional.linear(x.to(self.compute_dtype), w,
                                       None if self.bias is None else self.bias.to(self.compute_dtype))
        if self.rank:
            pooled = self.pool_sum(x.to(self.lora_A.dtype)) * (self.k * self.scaling)
            y = y + ((pooled @ self.lora_A.T) @ self.lora_B.T).to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, groups={self.num_groups}, "
                f"rank={self.rank}, pooling={self.pooling}"
                + (f", integer_zeros={self.zero_range}" if self.integer_zeros else ""))
