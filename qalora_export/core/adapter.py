"""QA-LoRA adapter records: the factors of each layer, the pooling conventions, the weight delta.

A QA-LoRA adapter on a layer with ``in`` input features, rank ``r`` and pooling group size ``p``
(``L = in / p`` pooled features) is ``A`` float ``[r, L]``, ``B`` float ``[out, r]`` and scale
``s = alpha / r``; it adds ``s * (pool(x) @ A.T) @ B.T`` to the layer's output. The pooling
convention says what ``pool`` is (docs/design.md §2.2) and is a constant factor ``k`` per layer:

    ==========  =====================================  =================
    convention  pool(x)[g]                             k (weight factor)
    ==========  =====================================  =================
    mean        mean of x over pooling group g         1 / p
    sum         sum over group g                       1
    peft        mean over group g, times L             L / p
    ==========  =====================================  =================

so the adapter is the weight delta ``dW[o, i] = s * k * (B @ A)[o, a(i)]``, with ``a(i)`` the
pooling group of input column ``i``: ``i // p`` ("consecutive", PEFT and the official code) or the
base's quantization group ``g_idx[i]`` ("quantization", what this project's trainer uses so that
act-order bases stay foldable).

On disk: ``qalora_export.checkpoint.adapter_files`` (PEFT's layout).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch

from qalora_export.errors import AdapterError

Pooling = Literal["mean", "sum", "peft"]
PoolGroups = Literal["consecutive", "quantization"]
POOLINGS: tuple[str, ...] = ("mean", "sum", "peft")
# qalora_export.json fields of an adapter trained with integer zero shifts (docs/design.md §2.4)
INTEGER_ZEROS_KEY = "integer_zeros"
ZERO_RANGE_KEY = "zero_range"

@dataclass
class AdapterLayer:
    """The trained factors of one adapted layer: ``A`` ``[r, L]``, ``B`` ``[out, r]``."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def pooled_features(self) -> int:
        return int(self.lora_A.shape[1])


@dataclass
class QALoRAAdapter:
    """A whole QA-LoRA adapter: per-module factors plus what is needed to interpret them.

    Attributes:
        layers: module path (``model.layers.0.self_attn.q_proj``) to its factors: a dict, or
            an :class:`AdapterFactors` that reads them from the file one module at a time.
        rank: ``r``.
        alpha: ``lora_alpha``; the adapter's scale is ``alpha / rank``.
        pooling: the convention that trained it (see the module docstring).
        pool_group_size: input columns per pooling group ``p``; 0 when not recorded (then each
            layer's ``p`` is ``in / L``, see :meth:`layer_pool_group_size`).
        pool_groups: "consecutive" (``i // p``) or "quantization" (the base's ``g_idx``).
        base_fingerprint: fingerprint of the quantized base it was trained on, if known.
        target_modules: the projection names it adapts (``q_proj``, ...).
        extra: further metadata of ``qalora_export.json``, kept as written; the integer-zero
            fields are read through :attr:`integer_zero_range`.
    """

    layers: Mapping[str, AdapterLayer]
    rank: int
    alpha: float
    pooling: Pooling
    pool_group_size: int
    pool_groups: PoolGroups = "consecutive"
    base_fingerprint: Optional[str] = None
    target_modules: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def integer_zero_range(self) -> Optional[tuple[int, int]]:
        """``(lo, hi)``, the true-zero range an integer-zero adapter was trained for (metadata
        ``integer_zeros: true``, ``zero_range: [lo, hi]``), else None.

        Raises:
            AdapterError: the metadata says integer zeros but its range is not two integers lo <= hi.
        """
        if not self.extra.get(INTEGER_ZEROS_KEY):
            return None
        value = self.extra.get(ZERO_RANGE_KEY)
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or value[0] > value[1]):
            raise AdapterError(
                f"adapter metadata says integer_zeros but its zero_range is {value!r}; it must be two "
                f"integers [lo, hi] with lo <= hi (the GPTQ format's true-zero range)"
            )
        return int(value[0]), int(value[1])

    def layer_pool_group_size(self, name: str, in_features: int) -> int:
        """Pooling group size ``p`` of layer ``name``, checked against ``A``'s shape ``[r, in / p]``."""
        pooled = self.layers[name].pooled_features
        if pooled <= 0 or in_features % pooled:
            raise AdapterError(
                f"adapter layer {name}: lora_A has {pooled} pooled features, which does not divide "
                f"the layer's {in_features} input features; the adapter belongs to another model"
            )
        p = in_features // pooled
        if self.pool_group_size and p != self.pool_group_size:
            raise AdapterError(
                f"adapter layer {name}: lora_A has {pooled} pooled features, so its pooling group "
                f"size is {p}, but the adapter records {self.pool_group_size}; the adapter does not "
                f"match this base (different layer widths or group size)"
            )
        return p


def pooling_factor(pooling: str, in_features: int, pool_group_size: int) -> float:
    """Weight-space factor ``k`` of a pooling convention (module docstring)."""
    if pooling == "mean":
        return 1.0 / pool_group_size
    if pooling == "sum":
        return 1.0
    if pooling == "peft":
        return (in_features // pool_group_size) / pool_group_size
    raise AdapterError(f"unknown pooling convention {pooling!r}; choose one of {POOLINGS}")


def adapter_delta(adapter: QALoRAAdapter, name: str, in_features: int) -> torch.Tensor:
    """The per-pooling-group weight delta ``s * k * (B @ A)`` of layer ``name``: float64 ``[out, L]``."""
    layer = adapter.layers[name]
    p = adapter.layer_pool_group_size(name, in_features)
    ba = layer.lora_B.to(torch.float64) @ layer.lora_A.to(torch.float64)
    return ba * (adapter.scale * pooling_factor(adapter.pooling, in_features, p))
