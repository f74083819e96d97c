"""Reading a GPTQ artifact back: every layer decoded a row block at a time, the merge record, the
layer it declares it holds, and ``inspect``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import CHECKPOINT_FORMATS
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.record import QuantizedLinear
from qalora_export.core.weight_rows import WeightRows
from qalora_export.formats.gptq.encode import integer_zeros
from qalora_export.formats.gptq.spec import META_KEY


def read_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode every quantized layer of the checkpoint at ``path``: (module, float64 ``[out, in]``)."""
    for name, rows in read_weight_rows(path):
        yield name, rows.whole()


def read_weight_rows(path: Path) -> Iterator[tuple[str, WeightRows]]:
    """:func:`read_weights` a row block at a time: each layer's codes are unpacked (uint8) and
    dequantized to float64 only block by block."""
    ckpt = GPTQCheckpoint(path)
    for layer in ckpt.iter_layers():
        yield layer.name, WeightRows(tuple(layer.codes.shape),
                                     lambda start, stop, layer=layer: layer.dequantize(torch.float64, slice(start, stop)))


def merge_metadata(path: Path) -> dict:
    """The ``meta.qalora_export`` record of a checkpoint this converter wrote ({} otherwise)."""
    ckpt = GPTQCheckpoint(path)
    qcfg = ckpt.model_config.get("quantization_config") or {}
    return dict((qcfg.get("meta") or {}).get(META_KEY) or {})


def declared_layer(model: MergedView, name: str, artifact_meta: dict) -> QuantizedLinear:
    """The record the artifact must hold for layer ``name``: the fold, rounded as its metadata declares."""
    folded, _ = model.read_layer(name)
    if artifact_meta.get("exact", True) and artifact_meta.get("zeros_moved", 0) == 0:
        return folded
    fmt = artifact_meta.get("checkpoint_format") or model.base.config.checkpoint_format
    rounded, _ = integer_zeros(folded, fmt if fmt in CHECKPOINT_FORMATS else "gptq_v2",
                               clamp=artifact_meta.get("zeros_clamped", 0) > 0)
    return rounded


def declared_weight(model: MergedView, name: str, artifact_meta: dict) -> torch.Tensor:
    """:func:`declared_layer` dequantized: float64 ``[out, in]``."""
    return declared_layer(model, name, artifact_meta).dequantize(torch.float64)


def inspect(path: Path) -> dict:
    """``inspect`` of a GPTQ checkpoint: quantization settings, zero range, files, fingerprint."""
    ckpt = GPTQCheckpoint(path)
    zmin, zmax, act_order, params = None, None, False, 0
    shapes = Counter()
    for name in ckpt.quantized_modules:  # zeros, scales and g_idx only: codes stay packed on disk
        layer = ckpt.read_layer(name, with_codes=False)
        lo, hi = float(layer.zeros.min()), float(layer.zeros.max())
        zmin = lo if zmin is None else min(zmin, lo)
        zmax = hi if zmax is None else max(zmax, hi)
        act_order |= layer.is_act_order
        params += layer.out_features * layer.in_features
        shapes[f"{layer.out_features}x{layer.in_features}"] += 1
    qcfg = ckpt.model_config.get("quantization_config", {})
    return {
        "kind": "gptq checkpoint",
        "path": str(path),
        "model_type": ckpt.model_config.get("model_type"),
        "bits": ckpt.config.bits,
        "group_size": ckpt.config.group_size,
        "checkpoint_format": ckpt.config.checkpoint_format,
        "desc_act": ckpt.config.desc_act,
        "act_order_g_idx": act_order,
        "quantized_layers": len(ckpt.quantized_modules),
        "quantized_params": params,
        "layer_shapes": dict(shapes),
        "true_zero_range": [zmin, zmax],
        "float_tensors": len(ckpt.other_tensor_names()),
        "weight_files": sorted({p.name for p in ckpt.tensor_files.values()}),
        "bytes": sum(p.stat().st_size for p in set(ckpt.tensor_files.values())),
        "fingerprint": ckpt.fingerprint(),
        "qalora_export": (qcfg.get("meta") or {}).get("qalora_export"),
    }
