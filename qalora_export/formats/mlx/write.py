"""``--to mlx``: the folded model as an mlx-lm directory (``config.json``, ``model*.safetensors`` and an index
when sharded, the tokenizer files), written atomically, one tensor in memory at a time.

Per quantized layer: ``weight`` (the base's codes packed as MLX packs them), ``scales``, ``biases``
(``-scale * zero'``, docs/design.md §2.3) and the linear's float ``bias`` if any; the other float
tensors (embeddings, norms, an untied ``lm_head``) in the export's dtype. The merge is recorded in
``config.json`` under ``spec.META_KEY`` so that verify knows what the artifact declares.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qalora_export.checkpoint.merged_view import MergedView, single_threaded_torch
from qalora_export.errors import ConfigError
from qalora_export.formats.mlx import spec
from qalora_export.formats.mlx.config import mlx_config
from qalora_export.formats.mlx.encode import TORCH_DTYPES, encode_scales_biases, encode_weight, preflight
from qalora_export.storage.atomic import atomic_output_dir
from qalora_export.storage.safetensors_stream import TensorSpec, plan_shards, shard_file_names, write_file, write_index


@dataclass
class MLXExportSummary:
    format: str
    path: str
    bits: int
    group_size: int
    dtype: str
    layers: int
    exact: bool
    max_bias_rounding: float = 0.0
    max_scale_rounding: float = 0.0
    max_fold_shift: float = 0.0
    files: list = field(default_factory=list)
    bytes: int = 0
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def export(model: MergedView, out: Path, *, dtype: str = spec.DEFAULT_DTYPE, overwrite: bool = False,
           max_shard_bytes: int = spec.DEFAULT_MAX_SHARD_BYTES,
           progress: Callable[[str], None] | None = None) -> dict:
    """Write ``model`` (base with the adapter folded in) as an mlx-lm directory at ``out``.

    Args:
        dtype: of scales, biases and float tensors (``spec.DTYPES``); float32 holds the fold exactly,
            float16/bfloat16 round the biases (reported, ``exact: false``).
        max_shard_bytes: largest safetensors shard (a bigger single tensor gets a shard of its own).
    Returns:
        :class:`MLXExportSummary` as a dict.
    Raises:
        ConfigError: an unknown ``dtype``.
        FormatLimitError: a layer MLX cannot hold (bits, group size, act-order), before writing.
        UnsupportedModelError: a model mlx-lm would compute differently (rope variant, head_dim).
    """
    if dtype not in spec.DTYPES:
        raise ConfigError(f"--mlx-dtype {dtype!r} is not one of {list(spec.DTYPES)}")
    shapes = preflight(model)
    group_sizes = [gs for _, _, gs in shapes.values()]
    top_gs = max(set(group_sizes), key=group_sizes.count) if group_sizes else model.group_size
    others = {name: gs for name, (_, _, gs) in shapes.items() if gs != top_gs}
    summary = MLXExportSummary(format="mlx", path=str(out), bits=model.bits, group_size=top_gs, dtype=dtype,
                               layers=len(shapes), exact=True)
    config, notes = mlx_config(model.model_config, model.bits, top_gs, dtype, others)  # refusals before writing
    summary.notes = notes
    specs, float_keys = planned_tensors(model, shapes, dtype, tied=config["tie_word_embeddings"])
    folded: dict[str, dict[str, torch.Tensor]] = {}

    def produce(key: str) -> torch.Tensor:
        """One output tensor: scales and biases from the folded record (kept per layer until both are
        written), codes from the base (the fold never changes them), float tensors cast."""
        module, _, suffix = key.rpartition(".")
        if key in float_keys:
            return model.read_tensor(float_keys[key]).to(TORCH_DTYPES[dtype]).contiguous()
        if suffix == "weight":
            return encode_weight(model.base.read_layer(module).codes, model.bits)
        if module not in folded:
            layer, fold = model.read_layer(module, with_codes=False)
            scales, biases, stats = encode_scales_biases(layer, dtype)
            folded[module] = {"scales": scales, "biases": biases}
            summary.max_bias_rounding = max(summary.max_bias_rounding, stats.max_bias_rounding)
            summary.max_scale_rounding = max(summary.max_scale_rounding, stats.max_scale_rounding)
            summary.max_fold_shift = max(summary.max_fold_shift, fold.max_abs_shift)
            if progress:
                progress(module)
        tensor = folded[module].pop(suffix)
        if not folded[module]:
            del folded[module]
        return tensor

    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards), spec.SINGLE_WEIGHTS_FILE)
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp, single_threaded_torch():
        with model.fingerprint_checked():
            for shard, fname in zip(shards, names):
                summary.bytes += write_file(tmp / fname, shard, produce, metadata=spec.SHARD_METADATA)
        if len(names) > 1:
            write_index(tmp / spec.INDEX_FILE, shards, names, summary.bytes)
        # fp16 checkpoint scales are exact in float32 and float16: only the biases' rounding counts there
        summary.exact = dtype == "float32" or (summary.max_bias_rounding == 0 and summary.max_scale_rounding == 0)
        meta = {"merged": model.adapter is not None, "exact": summary.exact, "dtype": dtype,
                "biases": "-scale * zero' (float64), rounded once to " + dtype,
                "max_bias_rounding": summary.max_bias_rounding, "max_scale_rounding": summary.max_scale_rounding}
        config, _ = mlx_config(model.model_config, model.bits, top_gs, dtype, others, meta)
        (tmp / spec.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(model.tokenizer_dir, tmp)
    summary.files = names
    return summary.to_json()


def planned_tensors(model: MergedView, shapes: dict[str, tuple[int, int, int]], dtype: str,
                    tied: bool) -> tuple[list[TensorSpec], dict[str, str]]:
    """Every tensor of the artifact in writing order (per layer ``weight``, ``scales``, ``biases``,
    ``bias``; then the float tensors), from the base's headers alone; and ``output name -> base name``
    of the float tensors (a tied model's ``lm_head`` and rotary caches are left out, as mlx-lm drops them)."""
    float_dtype = TORCH_DTYPES[dtype]
    specs: list[TensorSpec] = []
    for name, (out_f, in_f, gs) in shapes.items():
        specs += [TensorSpec(f"{name}.weight", torch.uint32, (out_f, spec.packed_words(in_f, model.bits))),
                  TensorSpec(f"{name}.scales", float_dtype, (out_f, in_f // gs)),
                  TensorSpec(f"{name}.biases", float_dtype, (out_f, in_f // gs))]
    float_keys: dict[str, str] = {}
    for name in shapes:
        if f"{name}.bias" in model.base.tensor_files:
            float_keys[f"{name}.bias"] = f"{name}.bias"
    for key in model.other_tensor_names():
        if key.endswith(spec.IGNORED_TENSOR_SUFFIX) or (tied and key == "lm_head.weight"):
            continue
        float_keys[key] = key
    for key in float_keys:
        specs.append(TensorSpec(key, float_dtype, tuple(model.base.tensor_spec(key)[1])))
    return specs, float_keys


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer, generation config and chat template (everything but weights and configs)."""
    for item in Path(src).iterdir():
        if item.is_file() and item.name not in spec.NOT_COPIED and not item.name.endswith(".safetensors") \
                and not item.name.startswith("."):
            shutil.copy2(item, Path(dst) / item.name)
