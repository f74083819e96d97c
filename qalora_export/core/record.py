"""The neutral quantized-layer record and min-max RTN quantization.

One convention, used everywhere in the project (docs/design.md §2): a linear layer ``y = x @ W.T``
with ``W`` of shape ``[out, in]`` is stored as integer codes ``q[o, i]`` in ``[0, 2**bits - 1]``,
a float ``scale[g, o]`` and a float ``zero[g, o]`` in code units, with ``g = g_idx[i]``:

    W_hat[o, i] = scale[g_idx[i], o] * (q[o, i] - zero[g_idx[i], o])

Converters consume :class:`QuantizedLinear` and know nothing of where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from qalora_export.core.packing import SUPPORTED_BITS
from qalora_export.errors import ConfigError


@dataclass
class QuantizedLinear:
    """One group-quantized linear layer, unpacked.

    Attributes:
        name: module path, e.g. ``model.layers.0.self_attn.q_proj``.
        bits: code width, one of 2, 3, 4, 8.
        group_size: input columns per quantization group (``in`` for one group per row).
        codes: uint8 ``[out, in]`` integer codes.
        scales: float32 ``[G, out]`` (the values a checkpoint's fp16 ``scales`` hold, widened).
        zeros: float64 ``[G, out]`` zero-points in code units; integral for a GPTQ base, fractional
            after a float fold.
        g_idx: int64 ``[in]`` group of each input column (``i // group_size`` unless act-order).
        bias: float32 ``[out]`` or None.
    """

    name: str
    bits: int
    group_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bias: Optional[torch.Tensor] = None

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[0])

    @property
    def is_act_order(self) -> bool:
        """True when ``g_idx`` is not the contiguous ``i // group_size`` assignment."""
        return not torch.equal(self.g_idx, contiguous_g_idx(self.in_features, self.group_size))

    def dequantize(self, dtype: torch.dtype = torch.float64, rows: Optional[slice] = None) -> torch.Tensor:
        """``W_hat`` as ``[out, in]`` in ``dtype`` (computed in float64, then cast).

        ``rows``: only those output rows, ``[len(rows), in]``, equal to the same rows of the whole
        (every element is computed alone), without a whole-layer temporary.
        """
        rows = slice(None) if rows is None else rows
        g = self.g_idx
        scale = self.scales[:, rows].to(torch.float64)[g].T  # [rows, in]
        zero = self.zeros[:, rows].to(torch.float64)[g].T
        return (scale * (self.codes[rows].to(torch.float64) - zero)).to(dtype)

    def with_zeros(self, zeros: torch.Tensor) -> "QuantizedLinear":
        """A copy sharing codes and scales, with new zero-points ``[G, out]``."""
        return replace(self, zeros=zeros)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of the float tensor ``t`` is finite (no NaN, no infinity).

    float32/float64 go through numpy's ``isfinite`` (one vectorised pass); other float types
    through ``max |t|`` (NaN propagates). ``torch.isfinite(t).all()`` did the same with a bool
    temporary and intra-op threads: on two busy cores that made checking a 7B adapter's 448
    factors take seconds.
    """
    if t.dtype in (torch.float32, torch.float64) and t.device.type == "cpu":
        return bool(np.isfinite(t.detach().numpy()).all())
    return t.numel() == 0 or bool(torch.isfinite(t.detach().abs().amax()))


def contiguous_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The non-act-order group assignment ``i // group_size`` as int64 ``[in]``."""
    return torch.arange(in_features, dtype=torch.int64) // group_size


def check_quant_args(name: str, in_features: int, bits: int, group_size: int) -> None:
    """Raise :class:`ConfigError` unless ``bits`` and ``group_size`` fit a layer of ``in_features``."""
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"--bits {bits} is not supported; choose one of {SUPPORTED_BITS}")
    if group_size <= 0 or in_features % group_size:
        raise ConfigError(
            f"--group-size {group_size} does not divide the {in_features} input features of {name}; "
            f"choose a group size that divides every layer's input width"
        )


def quantize_rtn(name: str, weight: torch.Tensor, bits: int, group_size: int,
                 bias: Optional[torch.Tensor] = None, g_idx: Optional[torch.Tensor] = None,
                 min_zero: int = 0) -> QuantizedLinear:
    """Min-max round-to-nearest, asymmetric, group-wise (the QA-LoRA paper's quantizer).

    Per group: ``lo = min(w.min(), 0)``, ``hi = max(w.max(), 0)`` (the grid contains 0, as GPTQ's
    does), ``scale = (hi - lo) / (2**bits - 1)``, ``zero = round(-lo / scale)``,
    ``q = clamp(round(w / scale + zero), 0, 2**bits - 1)``. The scale is rounded to fp16 first,
    since that is what a checkpoint stores, so codes are chosen for the stored scale.

    Args:
        weight: float ``[out, in]``.
        g_idx: optional int ``[in]`` group of each column (an act-order assignment: each group
            must have ``group_size`` columns); default ``i // group_size``.
        min_zero: smallest zero-point allowed (1 for the v1 "gptq" format, which cannot store 0).
    """
    if weight.ndim != 2:
        raise ConfigError(f"{name}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_quant_args(name, in_features, bits, group_size)
    n_groups = in_features // group_size
    if g_idx is None:
        g_idx = contiguous_g_idx(in_features, group_size)
    g_idx = g_idx.to(torch.int64)
    # bincount needs a 1-D non-negative input: check those first, so bad input is a ConfigError.
    valid = g_idx.shape == (in_features,) and (in_features == 0 or int(g_idx.min()) >= 0)
    counts = torch.bincount(g_idx, minlength=n_groups) if valid else torch.empty(0)
    if not valid or len(counts) != n_groups or bool((counts != group_size).any()):
        raise ConfigError(f"{name}: g_idx must assign exactly {group_size} columns to each of {n_groups} groups")
    order = torch.argsort(g_idx, stable=True)  # columns grouped: order[g*gs:(g+1)*gs] are group g
    maxq = (1 << bits) - 1
    w = weight.detach().to(torch.float64)[:, order].reshape(out_features, n_groups, group_size)
    lo = w.amin(dim=2).clamp(max=0)
    hi = w.amax(dim=2).clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: any scale works
    scale = scale.to(torch.float16).to(torch.float64)
    # fp16 rounding or underflow of tiny scales must not produce 0 or inf.
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.full_like(scale, 2.0 ** -14))
    zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    q = torch.round(w / scale[..., None] + zero[..., None]).clamp(0, maxq).reshape(out_features, in_features)
    codes = torch.empty_like(q)
    codes[:, order] = q
    return QuantizedLinear(
        name=name,
        bits=bits,
        group_size=group_size,
        codes=codes.to(torch.uint8),
        scales=scale.T.contiguous().to(torch.float32),
        zeros=zero.T.contiguous(),
        g_idx=g_idx,
        bias=None if bias is None else bias.detach().to(torch.float32),
    )
