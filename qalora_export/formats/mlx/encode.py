"""A folded layer as MLX affine tensors: codes packed as MLX packs them, ``scales = scale``,
``biases = -scale * zero'`` (docs/design.md §2.3); the codes are copied, never requantized.

What MLX cannot hold is refused with :class:`FormatLimitError` before anything is written: code
widths MLX has no kernel for, group sizes other than 32/64/128 (per-row groups included), and
act-order bases, whose groups are not runs of consecutive input columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.packing import WORD_BITS
from qalora_export.core.record import QuantizedLinear, contiguous_g_idx
from qalora_export.errors import FormatLimitError
from qalora_export.formats.mlx import spec

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LayerStats:
    """What storing one layer's scales and biases in the export's dtype rounded."""

    max_bias_rounding: float  # max |stored bias - (-scale * zero')|
    max_scale_rounding: float  # max |stored scale - scale| (0 for fp16 checkpoint scales in fp32/fp16)


def mlx_constraint(name: str, bits: int, group_size: int, in_features: int, act_order: bool) -> str | None:
    """Why MLX's affine quantization cannot hold this layer exactly, or None when it can."""
    if bits not in spec.MLX_BITS:
        return (f"{name}: {bits}-bit codes have no MLX affine kernel (MLX holds {list(spec.MLX_BITS)} bits); "
                f"quantize the base with --bits 2, 3, 4 or 8")
    if group_size not in spec.GROUP_SIZES or in_features % group_size:
        kind = "per-row groups (group size -1) of " if group_size == in_features else "group size "
        return (f"{name}: {kind}{group_size} columns cannot be held by MLX, whose affine kernels take group "
                f"sizes {list(spec.GROUP_SIZES)} only; quantize the base with --group-size 32, 64 or 128, "
                f"or export with --to onnx / --to gptq")
    if act_order:
        return (f"{name}: act-order (desc_act) groups are not runs of consecutive input columns, and MLX has no "
                f"g_idx: the input columns of a Linear cannot be permuted, since its input comes unpermuted from "
                f"the previous layer; quantize the base without --act-order, or export with --to onnx / --to gptq")
    return None


def check_layer(layer: QuantizedLinear) -> None:
    """Refuse a layer MLX cannot hold, naming the constraint."""
    problem = mlx_constraint(layer.name, layer.bits, layer.group_size, layer.in_features, layer.is_act_order)
    if problem:
        raise FormatLimitError(problem)


def preflight(model: MergedView) -> dict[str, tuple[int, int, int]]:
    """Check every quantized layer from headers and ``g_idx`` alone, before writing.

    Returns ``module -> (out, in, group_size)``.
    """
    shapes = {}
    for name in model.quantized_modules:
        _, qweight = model.base.tensor_spec(f"{name}.qweight")  # int32 [in * bits / 32, out]
        in_f, out_f = qweight[0] * WORD_BITS // model.bits, qweight[1]
        gs = model.base.config.group_size_for(in_f)
        act_order = False
        if f"{name}.g_idx" in model.base.tensor_files and gs in spec.GROUP_SIZES and not in_f % gs:
            g_idx = model.read_tensor(f"{name}.g_idx").to(torch.int64)
            # a stored g_idx equal to i // group_size is the trivial one: the groups are contiguous
            act_order = not torch.equal(g_idx, contiguous_g_idx(in_f, gs))
        problem = mlx_constraint(name, model.bits, gs, in_f, act_order)
        if problem:
            raise FormatLimitError(problem)
        shapes[name] = (out_f, in_f, gs)
    return shapes


def encode_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes uint8 ``[out, in]`` -> MLX ``weight`` uint32 ``[out, in * bits / 32]``."""
    words = spec.pack_words(codes.numpy(), bits)
    return torch.from_numpy(words.view(np.int32)).view(torch.uint32)


def encode_scales_biases(layer: QuantizedLinear, dtype: str) -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    """``scales`` and ``biases`` ``[out, G]`` in ``dtype`` from a folded record (scales ``[G, out]``,
    float64 zeros ``[G, out]``), and what storing them rounded.

    ``biases = -scale * zero'`` is computed in float64 and rounded once to ``dtype``.

    Raises:
        FormatLimitError: a value is not finite in ``dtype`` (a shift float16 cannot hold).
    """
    check_layer(layer)
    scale = layer.scales.to(torch.float64).T.contiguous()  # [out, G]
    bias = -scale * layer.zeros.to(torch.float64).T
    target = TORCH_DTYPES[dtype]
    stored_scale, stored_bias = scale.to(target), bias.to(target)
    for label, exact, stored in (("scale", scale, stored_scale), ("bias = -scale * zero'", bias, stored_bias)):
        bad = ~torch.isfinite(stored.to(torch.float64))
        if bool(bad.any()):
            row, group = (int(i) for i in bad.nonzero()[0])
            raise FormatLimitError(
                f"{layer.name}: {label} = {float(exact[row, group]):g} at row {row}, group {group} cannot be stored "
                f"as {dtype}; the adapter shifts this zero-point too far for it. Export with --mlx-dtype float32")
    stats = LayerStats(
        max_bias_rounding=float((stored_bias.to(torch.float64) - bias).abs().max()) if bias.numel() else 0.0,
        max_scale_rounding=float((stored_scale.to(torch.float64) - scale).abs().max()) if scale.numel() else 0.0,
    )
    # fresh row-major copies: a [out, 1] transpose counts as contiguous with a stride of ``out`` and
    # cannot be viewed as bytes by the safetensors writer
    return _row_major(stored_scale), _row_major(stored_bias), stats


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)


def rounded_record(layer: QuantizedLinear, dtype: str) -> QuantizedLinear:
    """The record an export in ``dtype`` holds for the folded ``layer``: its stored scales and biases
    as ``scale`` and ``zero' = -bias / scale`` (float64). For float32 that is the fold up to one
    rounding of the bias; verify declares it for float16/bfloat16 exports (``read.declared_layer``)."""
    scales, biases, _ = encode_scales_biases(layer, dtype)
    s64, b64 = scales.to(torch.float64).T, biases.to(torch.float64).T  # [G, out]
    zeros = torch.where(s64 != 0, -b64 / torch.where(s64 != 0, s64, 1.0), layer.zeros.to(torch.float64))
    # float16 and bfloat16 values are exact in float32, the record's scale dtype
    return QuantizedLinear(layer.name, layer.bits, layer.group_size, layer.codes, s64.to(torch.float32), zeros,
                           layer.g_idx, layer.bias)
