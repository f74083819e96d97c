"""The fold's float zero-points as the integers GPTQ stores (docs/design.md §3.1).

Codes and fp16 scales are copied from the base, so the fold is bit-exact when every folded zero is an
integer inside the format's range (``zero_range``). Otherwise fractional zeros are rounded to the
nearest integer (the summary says how many moved and the largest change, in code units; the weight
moves by at most ``scale / 2`` per element; ``require_exact=True`` makes that an error), and zeros
outside the range are an error naming the layer and the fix (``gptq_v2`` for a zero of 0 in v1;
``clamp_zeros=True`` to clamp, reported), never wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qalora_export.checkpoint.gptq_config import zero_range
from qalora_export.core.record import QuantizedLinear
from qalora_export.errors import FormatLimitError


@dataclass
class ZeroPolicyResult:
    """What writing one layer's zeros as integers did."""

    moved: int = 0  # zeros changed by rounding
    max_change: float = 0.0  # largest |rounded - folded|, code units
    clamped: int = 0



def integer_zeros(layer: QuantizedLinear, checkpoint_format: str, clamp: bool) -> tuple[QuantizedLinear, ZeroPolicyResult]:
    """Round ``layer``'s float zeros and enforce the format's range (see module docstring)."""
    zeros = layer.zeros.to(torch.float64)
    rounded = torch.round(zeros)
    result = ZeroPolicyResult()
    diff = (rounded - zeros).abs()
    result.moved = int((diff > 0).sum())
    result.max_change = float(diff.max()) if diff.numel() else 0.0
    lo, hi = zero_range(layer.bits, checkpoint_format)
    outside = (rounded < lo) | (rounded > hi)
    if bool(outside.any()):
        if not clamp:
            n = int(outside.sum())
            hint = ("; the v1 'gptq' format stores zero - 1 and cannot hold a zero of 0: use "
                    "--checkpoint-format gptq_v2" if checkpoint_format == "gptq" and float(rounded.min()) == lo - 1 else "")
            raise FormatLimitError(
                f"{layer.name}: {n} folded zero-point(s) fall outside [{lo}, {hi}], the range "
                f"{checkpoint_format} {layer.bits}-bit can hold (min {float(rounded.min()):g}, max "
                f"{float(rounded.max()):g}){hint}. Pass --clamp-zeros to clamp them (the weights "
                f"of those groups then change; the summary reports it), or train with a smaller "
                f"adapter / more bits"
            )
        result.clamped = int(outside.sum())
        final = rounded.clamp(lo, hi)
        result.max_change = float((final - zeros).abs().max())
        rounded = final
    return layer.with_zeros(rounded), result
