"""A QA-LoRA adapter as a plain LoRA (docs/lora.md): the same delta, served unmerged by any LoRA runtime.

A QA-LoRA layer (``A`` ``[r, L]``, ``B`` ``[out, r]``, ``s = alpha / r``, pooling factor ``k``,
pooling group ``a(i)`` of input column ``i``; docs/design.md §2.2-2.3) adds the weight delta

    dW[o, i] = s * k * (B @ A)[o, a(i)]

A plain LoRA adds ``s * B @ A_plain``. With ``A_plain[:, i] = k * A[:, a(i)]`` (``A``'s columns
repeated across each pooling group and scaled by ``k``), ``B`` unchanged and the same ``alpha`` and
``r``, the two deltas are equal: ``(B @ A_plain)[o, i] = k * (B @ A)[o, a(i)]``. The factors are
computed in float64 and stored as float32 (or float16) by round-to-nearest-even, so each stored factor
differs from the exact one by at most half an ulp (relative ``u = 2**-24``, ``2**-11`` for float16,
plus the half subnormal ulp ``eta``); :func:`check_layer_delta` checks the stored factors against
the a-priori bound that implies.

``a(i)`` is ``i // p`` for adapters pooling consecutive columns (PEFT, the official code) and the
base's ``g_idx[i]`` for adapters pooling over the quantization groups (this project's trainer): for
those the base's ``g_idx`` is needed, since on an act-order base the groups are not consecutive.

Integer-zero adapters (``train --integer-zeros``) are refused: their forward rounds the zero shift
(docs/design.md §2.4), a delta no low-rank factorisation expresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from qalora_export.core.adapter import QALoRAAdapter, adapter_delta, pooling_factor
from qalora_export.errors import AdapterError, FormatLimitError

#: Storage dtypes of the plain factors and their rounding: (unit roundoff u, half the smallest subnormal eta, max).
STORAGE_DTYPES: dict[str, tuple[torch.dtype, float, float, float]] = {
    "float32": (torch.float32, 2.0 ** -24, 2.0 ** -150, float(torch.finfo(torch.float32).max)),
    "float16": (torch.float16, 2.0 ** -11, 2.0 ** -25, 65504.0),
}
# float64 evaluation of both deltas (r-term sums): relative slack on s * (|B| @ |A_plain|)
FLOAT64_SLACK = 1e-12


@dataclass
class PlainLoRALayer:
    """One layer's plain LoRA factors as stored: ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor


@dataclass
class PlainLoRA:
    """A whole plain LoRA: per-module factors, ``alpha`` and ``rank`` (scale ``alpha / rank``), and
    ``provenance``: how the QA-LoRA convention was resolved (pooling, ``k``, pooling groups and
    where they came from), written beside the factors for people, ignored by runtimes."""

    layers: dict[str, PlainLoRALayer]
    rank: int
    alpha: float
    target_modules: list[str]
    dtype: str = "float32"
    provenance: dict = field(default_factory=dict)


def check_convertible(adapter: QALoRAAdapter) -> None:
    """Refuse adapters whose forward is not a linear function of ``B @ A``.

    Raises:
        AdapterError: an integer-zero adapter (its zero shift is rounded in the forward).
    """
    if adapter.integer_zero_range is not None:
        raise AdapterError(
            "the adapter was trained with --integer-zeros: its forward rounds the zero shift to whole code "
            "units, a delta no plain LoRA (a low-rank product) expresses; export it folded instead "
            "(`merge --to gptq`, bit-exact for such adapters), or train without --integer-zeros")


def column_pools(adapter: QALoRAAdapter, name: str, in_features: int,
                 g_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """``a(i)`` for every input column of layer ``name``: int64 ``[in]``.

    Args:
        g_idx: the base layer's quantization group of each column, int64 ``[in]``; needed (and only
            used) when the adapter pools over the quantization groups.

    Raises:
        AdapterError: ``g_idx`` is needed and missing, or does not fit the adapter's ``A``.
    """
    pooled = adapter.layers[name].pooled_features
    if adapter.pool_groups == "consecutive":
        p = adapter.layer_pool_group_size(name, in_features)
        return torch.arange(in_features, dtype=torch.int64) // p
    if g_idx is None:
        raise AdapterError(
            f"{name}: the adapter pools over the base's quantization groups (pool_groups: quantization), so its "
            f"columns follow the base's g_idx; pass the GPTQ base it was trained on (--base BASE)")
    g_idx = g_idx.to(torch.int64)
    if tuple(g_idx.shape) != (in_features,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= pooled:
        raise AdapterError(
            f"{name}: the base's g_idx ({tuple(g_idx.shape)} columns, groups {int(g_idx.min())}.."
            f"{int(g_idx.max())}) does not fit the adapter's {pooled} pooled features over {in_features} "
            f"columns; the adapter was trained on another base")
    return g_idx


def plain_factors(adapter: QALoRAAdapter, name: str, pools: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float64 plain factors of layer ``name``: ``A_plain`` ``[r, in]`` and ``B`` ``[out, r]``.

    ``pools``: ``a(i)`` int64 ``[in]`` (:func:`column_pools`).
    """
    layer = adapter.layers[name]
    in_features = int(pools.shape[0])
    k = pooling_factor(adapter.pooling, in_features, adapter.layer_pool_group_size(name, in_features))
    a_plain = layer.lora_A.to(torch.float64)[:, pools] * k
    return a_plain, layer.lora_B.to(torch.float64)


def store(t: torch.Tensor, dtype: str, what: str) -> torch.Tensor:
    """``t`` (float64) rounded to the storage ``dtype`` (round to nearest even).

    Raises:
        FormatLimitError: a value overflows the storage dtype.
    """
    torch_dtype, _, _, largest = STORAGE_DTYPES[dtype]
    biggest = float(t.abs().max()) if t.numel() else 0.0
    if biggest > largest:
        raise FormatLimitError(f"{what}: a factor of magnitude {biggest:.4g} overflows {dtype} (max {largest:g}); "
                               f"store the LoRA as --dtype float32")
    return t.to(torch_dtype).contiguous()


def check_layer_delta(adapter: QALoRAAdapter, name: str, stored: PlainLoRALayer, pools: torch.Tensor,
                      dtype: str) -> dict:
    """The stored plain LoRA's delta against the QA-LoRA delta of layer ``name``, in float64.

    ``dW_plain = s * B_stored @ A_stored`` against ``dW[o, i] = s * k * (B @ A)[o, a(i)]`` computed from the
    adapter (``adapter_delta``, independent of :func:`plain_factors`). Storage rounding bounds each stored
    factor by ``|x_stored - x| <= u |x| + eta``; so, elementwise,

        |dW_plain - dW| <= s * ((u|B| + eta) @ |A_p| + |B| @ (u|A_p| + eta) + (u|B| + eta) @ (u|A_p| + eta))
                          + FLOAT64_SLACK * s * |B| @ |A_p|

    with ``A_p`` the exact plain ``A``. A layout error (wrong ``a(i)``, ``k``, transposition) breaks it.

    Returns:
        ``{"max_abs_error", "max_abs_delta", "allowed_margin", "passed"}``; ``allowed_margin`` is the
        smallest ``bound - error`` over the layer (>= 0 when passed).
    """
    _, u, eta, _ = STORAGE_DTYPES[dtype]
    s = adapter.scale
    in_features = int(pools.shape[0])
    reference = adapter_delta(adapter, name, in_features)[:, pools]  # [out, in]
    plain = s * (stored.lora_B.to(torch.float64) @ stored.lora_A.to(torch.float64))
    error = (plain - reference).abs()
    a_exact, b_exact = plain_factors(adapter, name, pools)
    abs_a, abs_b = a_exact.abs(), b_exact.abs()
    err_a, err_b = u * abs_a + eta, u * abs_b + eta
    bound = s * (err_b @ abs_a + abs_b @ err_a + err_b @ err_a + FLOAT64_SLACK * (abs_b @ abs_a)) + 1e-300
    margin = float((bound - error).min()) if error.numel() else 0.0
    return {"max_abs_error": float(error.max()) if error.numel() else 0.0,
            "max_abs_delta": float(reference.abs().max()) if reference.numel() else 0.0,
            "allowed_margin": margin, "passed": bool(margin >= 0.0)}
