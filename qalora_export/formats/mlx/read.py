"""Reading an MLX directory back with this project's own reader (verify's weight level), a row block at a
time; the merge record; the record the artifact declares; ``inspect``.

The reader decodes as MLX's CPU kernel does (``spec.dequantize``: float32 ``scales * q + biases``);
``tests/unit/formats/mlx`` checks it bit for bit against ``mx.dequantize``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.record import QuantizedLinear
from qalora_export.core.weight_rows import WeightRows
from qalora_export.errors import CheckpointError
from qalora_export.formats.mlx import spec
from qalora_export.formats.mlx.encode import rounded_record


def read_config(path: Path | str) -> dict:
    """The artifact's ``config.json`` (CheckpointError when missing or not an mlx-lm quantized config)."""
    file = Path(path) / spec.CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be read as JSON ({exc}); export the MLX model again") from exc
    if not isinstance(config, dict) or not isinstance(config.get("quantization"), dict):
        raise CheckpointError(f"{file} has no \"quantization\" block; it is not a quantized MLX model")
    return config


def weight_files(path: Path | str) -> dict[str, Path]:
    """``tensor name -> safetensors file`` of the artifact (single file or index)."""
    path = Path(path)
    index = path / spec.INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a safetensors index ({exc})") from exc
        return {name: path / fname for name, fname in weight_map.items()}
    single = path / spec.SINGLE_WEIGHTS_FILE
    if not single.is_file():
        raise CheckpointError(f"{path} has neither {spec.SINGLE_WEIGHTS_FILE} nor {spec.INDEX_FILE}")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable


class _Tensors:
    """Lazy access to the artifact's tensors (one open file handle per shard)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles: dict[Path, object] = {}

    def slice(self, name: str):
        from safetensors import safe_open

        path = self.files[name]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        return self.handles[path].get_slice(name)


def read_weights(path: Path | str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every quantized layer decoded as MLX decodes it: ``(module name, float64 [out, in])``."""
    for name, rows in read_weight_rows(path):
        yield name, rows.whole()


def read_weight_rows(path: Path | str) -> Iterator[tuple[str, WeightRows]]:
    """:func:`read_weights` a row block at a time (rows are independent: each holds its own groups)."""
    config = read_config(path)
    bits = int(config["quantization"]["bits"])
    tensors = _Tensors(weight_files(path))
    modules = sorted(n[: -len(".scales")] for n in tensors.files if n.endswith(".scales"))
    for module in modules:
        yield module, _layer_rows(path, tensors, module, bits)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A stored tensor as numpy (bfloat16 widened to float32, exactly; uint32 words as uint32)."""
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy()
    if t.dtype == torch.uint32:
        return t.view(torch.int32).numpy().view(np.uint32)
    return t.numpy()


def _layer_rows(path: Path | str, tensors: _Tensors, module: str, bits: int) -> WeightRows:
    try:
        w, s, b = (tensors.slice(f"{module}.{k}") for k in ("weight", "scales", "biases"))
        (out_f, n_words), (s_rows, groups) = w.get_shape(), s.get_shape()
        if w.get_dtype() != "U32" or s_rows != out_f or b.get_shape() != s.get_shape():
            raise ValueError(f"weight {w.get_dtype()} {w.get_shape()}, scales {s.get_shape()}, "
                             f"biases {b.get_shape()}")
        in_f = n_words * spec.WORD_BITS // bits
        if groups == 0 or in_f % groups:
            raise ValueError(f"{in_f} inputs do not split into {groups} groups")
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the tensors of {module} are inconsistent or missing ({exc}); "
                              f"the artifact is corrupt") from exc
    group_size = in_f // groups

    def rows(start: int, stop: int) -> torch.Tensor:
        words = _as_numpy(w[start:stop])
        decoded = spec.dequantize(words, _as_numpy(s[start:stop]), _as_numpy(b[start:stop]), bits, group_size)
        if not np.isfinite(decoded).all():
            raise CheckpointError(f"{path}: {module} decodes to NaN or inf; the artifact is corrupt")
        return torch.from_numpy(decoded.astype(np.float64))
    return WeightRows((int(out_f), int(in_f)), rows)


def merge_metadata(path: Path | str) -> dict:
    """What the export recorded in ``config.json`` (``{}`` for an MLX model not written by this tool)."""
    return dict(read_config(path).get(spec.META_KEY) or {})


def declared_layer(model: MergedView, name: str, meta: dict) -> QuantizedLinear:
    """The exact fold for a float32 export; for float16/bfloat16 the fold with the scales and biases
    rounded as the export stored them (``meta["dtype"]``)."""
    layer = model.read_layer(name)[0]
    dtype = meta.get("dtype", spec.DEFAULT_DTYPE)
    if meta.get("exact", True) and dtype == spec.DEFAULT_DTYPE:
        return layer
    return rounded_record(layer, dtype)


def inspect(path: Path) -> dict:
    """``inspect`` of an MLX directory: quantization, dtype, files and the merge record."""
    config = read_config(path)
    files = weight_files(path)
    modules = sum(1 for n in files if n.endswith(".scales"))
    shards = sorted({p.name for p in files.values()})
    return {"kind": "mlx", "path": str(path), "model_type": config.get("model_type"),
            "quantization": {k: v for k, v in config["quantization"].items() if not isinstance(v, dict)},
            "dtype": config.get("dtype"), "quantized_layers": modules, "tensors": len(files), "files": shards,
            "bytes": sum((Path(path) / s).stat().st_size for s in shards), "merge": config.get(spec.META_KEY)}
