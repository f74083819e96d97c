"""Folding a QA-LoRA adapter into the zero-points of its quantized layer.

The adapter's weight delta is constant inside each pooling group (see ``adapter.py``):
``dW[o, i] = D[o, a(i)]`` with ``D = s * k * (B @ A)`` ``[out, L]``. When every quantization
group ``g`` lies inside one pooling group ``a_g``, the delta is constant inside each
quantization group too, and

    scale[g, o] * (q[o, i] - zero[g, o]) + D[o, a_g]
        = scale[g, o] * (q[o, i] - (zero[g, o] - D[o, a_g] / scale[g, o]))

so ``zero'[g, o] = zero[g, o] - D[o, a_g] / scale[g, o]`` and the codes never change. The fold
runs in float64; the result is fractional in general, and each output format decides (in its
own module) whether it can hold it exactly.

**Integer-zero adapters** (trained with ``train --integer-zeros``; metadata ``integer_zeros:
true`` and ``zero_range: [lo, hi]``, the true-zero range of the GPTQ format they target) were
trained with the shift rounded to an integer and clamped so that ``zero - shift`` stays in
``[lo, hi]`` (:func:`round_zero_shift`). Their fold applies the same rounding and clamp, so the
folded zeros are integral and in range by construction and equal, exactly, to the zero-points
the training forward used; ``merge --to gptq --require-exact`` then succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from qalora_export.core.adapter import QALoRAAdapter, adapter_delta
from qalora_export.core.record import QuantizedLinear, all_finite
from qalora_export.errors import FoldError


@dataclass
class FoldStats:
    """What one layer's fold did: size of the zero shift, in code units."""

    name: str
    max_abs_shift: float
    integral: bool


def round_zero_shift(shift: torch.Tensor, zeros: torch.Tensor, zero_range: tuple[int, int]) -> torch.Tensor:
    """The integer-zero shift: ``shift`` ``[G, out]`` (code units) rounded, then clamped so that
    ``zeros - result`` lies in ``zero_range``.

    The rounding is a straight-through estimator (forward ``round(shift)``, gradient identity),
    so the same function serves the training forward and the fold. With integral ``zeros`` (every
    GPTQ checkpoint's) the result and ``zeros - result`` are integral.
    """
    rounded = shift + (torch.round(shift) - shift).detach()
    lo, hi = zero_range
    return torch.clamp(rounded, min=zeros - hi, max=zeros - lo)


def pooling_group_of_quant_groups(layer: QuantizedLinear, adapter: QALoRAAdapter) -> torch.Tensor:
    """``a_g`` for every quantization group: int64 ``[G]``.

    Raises :class:`FoldError` when a quantization group spans two pooling groups (the adapter's
    delta would then vary inside the group and no zero-point can hold it).
    """
    name = layer.name
    p = adapter.layer_pool_group_size(name, layer.in_features)
    if adapter.pool_groups == "quantization":
        pooled = adapter.layers[name].pooled_features
        if pooled != layer.num_groups:
            raise FoldError(
                f"{name}: the adapter pools over the base's quantization groups but has {pooled} "
                f"pooled features for {layer.num_groups} groups; it was trained on another base"
            )
        return torch.arange(layer.num_groups, dtype=torch.int64)
    column_pool = torch.arange(layer.in_features, dtype=torch.int64) // p  # a(i), consecutive
    g_idx = layer.g_idx.to(torch.int64)
    G = layer.num_groups
    lo = torch.full((G,), torch.iinfo(torch.int64).max, dtype=torch.int64).scatter_reduce(
        0, g_idx, column_pool, reduce="amin")
    hi = torch.full((G,), -1, dtype=torch.int64).scatter_reduce(0, g_idx, column_pool, reduce="amax")
    empty = hi < 0
    if bool(((lo != hi) & ~empty).any()):
        bad = int(torch.nonzero((lo != hi) & ~empty)[0])
        detail = (
            "the base is act-order (desc_act): its groups are not runs of consecutive columns"
            if layer.is_act_order else
            f"the pooling group size {p} is smaller than, or not a multiple of, the quantization "
            f"group size {layer.group_size}"
        )
        raise FoldError(
            f"{name}: quantization group {bad} spans pooling groups {int(lo[bad])}..{int(hi[bad])}, "
            f"so the adapter's delta is not constant inside it and cannot be folded into a "
            f"zero-point ({detail}). Train the adapter with this tool on this base, whose pooling "
            f"follows the quantization groups"
        )
    return torch.where(empty, torch.zeros_like(lo), lo)


def fold_into_zero_points(layer: QuantizedLinear, adapter: QALoRAAdapter) -> tuple[QuantizedLinear, FoldStats]:
    """Return ``layer`` with the adapter folded into its zero-points (float64 ``[G, out]``).

    Layers the adapter does not touch come back unchanged (zero shift). Codes, scales and g_idx
    are shared with the input, which is never modified. Integer-zero adapters
    (:attr:`QALoRAAdapter.integer_zero_range`) fold their rounded, clamped shift (module docstring).
    """
    if layer.name not in adapter.layers:
        return layer, FoldStats(layer.name, 0.0, True)
    a_g = pooling_group_of_quant_groups(layer, adapter)
    delta = adapter_delta(adapter, layer.name, layer.in_features)  # [out, L]
    if delta.shape[0] != layer.out_features:
        raise FoldError(
            f"{layer.name}: adapter lora_B has {delta.shape[0]} output rows but the layer has "
            f"{layer.out_features}; the adapter belongs to another model"
        )
    scales = layer.scales.to(torch.float64)
    if bool((scales == 0).any()):
        raise FoldError(f"{layer.name}: a scale is zero, so the zero-point cannot absorb a weight shift")
    shift = delta[:, a_g].T / scales  # [G, out]
    base_zeros = layer.zeros.to(torch.float64)
    zero_range = adapter.integer_zero_range
    if zero_range is not None:
        shift = round_zero_shift(shift, base_zeros, zero_range)
    zeros = base_zeros - shift
    if not all_finite(zeros):
        raise FoldError(f"{layer.name}: the folded zero-points are not finite (adapter or scales overflow)")
    stats = FoldStats(layer.name, float(shift.abs().max()) if shift.numel() else 0.0,
                      bool(torch.equal(zeros, torch.round(zeros))))
    return layer.with_zeros(zeros), stats


def effective_weight(layer: QuantizedLinear, adapter: QALoRAAdapter | None,
                     rows: Optional[slice] = None) -> torch.Tensor:
    """The unmerged effective weight ``W_hat + dW`` as float64 ``[out, in]`` (the verify reference).

    Computed from the adapter's delta directly (not through the fold), so that it checks the fold.
    For an integer-zero adapter it is what its training forward computed:
    ``scale * (q - (zero - round_zero_shift(...)))`` (pooling over the quantization groups).
    ``rows``: only those output rows (equal to the same rows of the whole).
    """
    return effective_weight_rows(layer, adapter)(rows)


def effective_weight_rows(layer: QuantizedLinear,
                          adapter: QALoRAAdapter | None) -> Callable[[Optional[slice]], torch.Tensor]:
    """:func:`effective_weight` as a function of the output rows, with the adapter's per-group
    delta (``[out, L]``, small) computed once: verify compares a layer a row block at a time."""
    if adapter is None or layer.name not in adapter.layers:
        return lambda rows=None: layer.dequantize(torch.float64, rows)
    zero_range = adapter.integer_zero_range
    if zero_range is not None:
        if adapter.pool_groups != "quantization":
            raise FoldError(f"{layer.name}: an integer-zero adapter must pool over the quantization groups")
        delta = adapter_delta(adapter, layer.name, layer.in_features)
        zeros = layer.zeros.to(torch.float64)
        shift = round_zero_shift(delta.T / layer.scales.to(torch.float64), zeros, zero_range)
        shifted = layer.with_zeros(zeros - shift)
        return lambda rows=None: shifted.dequantize(torch.float64, rows)
    delta = adapter_delta(adapter, layer.name, layer.in_features)
    if adapter.pool_groups == "quantization":
        column_pool = layer.g_idx.to(torch.int64)
    else:
        p = adapter.layer_pool_group_size(layer.name, layer.in_features)
        column_pool = torch.arange(layer.in_features) // p

    def rows_of(rows: Optional[slice] = None) -> torch.Tensor:
        rows = slice(None) if rows is None else rows
        return layer.dequantize(torch.float64, rows) + delta[rows][:, column_pool]
    return rows_of
