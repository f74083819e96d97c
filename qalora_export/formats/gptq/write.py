"""``--to gptq``: a merged model as an AutoGPTQ checkpoint, sharded safetensors written atomically.

The merge is recorded in ``quantization_config.meta.qalora_export`` so that ``verify`` knows which
reference the artifact must equal (the exact fold, or the declared rounding of it).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from qalora_export.checkpoint.gptq_codec import encode_layer, encode_zero_points
from qalora_export.checkpoint.gptq_config import (
    CHECKPOINT_FORMATS,
    CONFIG_FILE,
    INDEX_FILE,
    QUANTIZE_CONFIG_FILE,
    THREE_BIT_WIDTH_MULTIPLE,
    GPTQConfig,
)
from qalora_export.checkpoint.gptq_writer import DEFAULT_MAX_SHARD_BYTES, write_checkpoint, write_configs
from qalora_export.checkpoint.merged_view import MergedView, single_threaded_torch
from qalora_export.core.packing import WORD_BITS
from qalora_export.core.record import contiguous_g_idx
from qalora_export.errors import FoldError, FormatLimitError
from qalora_export.formats.gptq.encode import ZeroPolicyResult, integer_zeros
from qalora_export.formats.gptq.spec import META_KEY, OUTPUT_DTYPES
from qalora_export.storage.atomic import atomic_output_dir
from qalora_export.storage.safetensors_stream import StoredTensor, TensorSpec


@dataclass
class GPTQExportSummary:
    format: str
    path: str
    checkpoint_format: str
    bits: int
    group_size: int
    layers: int
    exact: bool
    zeros_total: int = 0
    zeros_moved: int = 0
    max_zero_change: float = 0.0
    zeros_clamped: int = 0
    max_fold_shift: float = 0.0
    bytes: int = 0
    per_layer: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def export(model: MergedView, out: Path, *, checkpoint_format: Optional[str] = None,
           require_exact: bool = False, clamp_zeros: bool = False, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write ``model`` (base with the adapter folded in) as an AutoGPTQ checkpoint at ``out``.

    Args:
        checkpoint_format: "gptq" or "gptq_v2"; default: the base's.
        require_exact: refuse (FoldError) when any folded zero-point is fractional.
        clamp_zeros: clamp out-of-range zeros instead of refusing (reported).
    Returns:
        :class:`GPTQExportSummary` as a dict.
    """
    fmt = checkpoint_format or model.base.config.checkpoint_format
    if fmt not in CHECKPOINT_FORMATS:
        raise FormatLimitError(f"--checkpoint-format {fmt!r}: choose one of {CHECKPOINT_FORMATS}")
    base_cfg = model.base.config
    summary = GPTQExportSummary(format="gptq", path=str(out), checkpoint_format=fmt, bits=base_cfg.bits,
                                group_size=base_cfg.group_size, layers=len(model.quantized_modules), exact=True)
    out = Path(out)
    specs = planned_tensors(model, fmt)

    def produce(key: str) -> torch.Tensor | StoredTensor:
        """One output tensor. The fold changes only zero-points: qweight, scales, g_idx and bias
        are the base's (cast to the format's dtypes), copied without unpacking; stored in the
        output's dtype already, they are copied file to file without being read (as ``cp``)."""
        module, _, suffix = key.rpartition(".")
        if module not in quantized or suffix not in OUTPUT_DTYPES:
            return model.base.stored_tensor(key) or model.read_tensor(key)
        if suffix == "qzeros":
            return folded_zero_points(module)
        if suffix == "g_idx" and key not in model.base.tensor_files:  # the base relies on i // group_size
            return contiguous_g_idx(in_features[module], base_cfg.group_size_for(in_features[module])).to(torch.int32)
        stored = model.base.stored_tensor(key)
        if stored is not None and stored.dtype == OUTPUT_DTYPES[suffix]:
            return stored
        return model.read_tensor(key).to(OUTPUT_DTYPES[suffix]).contiguous()

    def folded_zero_points(name: str) -> torch.Tensor:
        folded, stats = model.read_layer(name, with_codes=False)
        layer, zres = integer_zeros(folded, fmt, clamp_zeros)
        if zres.moved and require_exact:
            raise FoldError(
                f"{name}: {zres.moved} of {folded.zeros.numel()} folded zero-points are not integers "
                f"(largest rounding {zres.max_change:.3f} code units) and --require-exact was given; "
                f"GPTQ stores integer zeros. Export to onnx or gguf (float zeros), or train with "
                f"integer zeros"
            )
        layer_stats[name] = (folded.zeros.numel(), zres, stats)
        if progress:
            progress(name)
        return encode_zero_points(layer, fmt)

    quantized = set(model.quantized_modules)
    in_features = {name: _in_features(model, name) for name in model.quantized_modules}
    layer_stats: dict[str, tuple[int, ZeroPolicyResult, object]] = {}
    with atomic_output_dir(out, overwrite=overwrite) as tmp, single_threaded_torch():
        # a deferred base-fingerprint check (MergedView.open(defer_fingerprint=True), as the CLI
        # opens it) hashes the base while the shards are copied; a mismatch removes the output
        with model.fingerprint_checked():
            _, total_bytes = write_checkpoint(tmp, specs, produce, max_shard_bytes)
        for name in model.quantized_modules:  # summary in module order, whatever the file order
            n_zeros, zres, stats = layer_stats[name]
            summary.zeros_total += n_zeros
            summary.zeros_moved += zres.moved
            summary.zeros_clamped += zres.clamped
            summary.max_zero_change = max(summary.max_zero_change, zres.max_change)
            summary.max_fold_shift = max(summary.max_fold_shift, stats.max_abs_shift)
            summary.per_layer[name] = {"moved": zres.moved, "max_change": zres.max_change,
                                       "clamped": zres.clamped, "max_fold_shift": stats.max_abs_shift}
        summary.exact = summary.zeros_moved == 0 and summary.zeros_clamped == 0
        summary.bytes = total_bytes
        meta = {
            "merged": model.adapter is not None,
            "adapter_fingerprint": _adapter_fingerprint(model),
            "base_fingerprint": model.base.fingerprint() if model.adapter is not None else None,
            "exact": summary.exact,
            "zeros_moved": summary.zeros_moved,
            "zeros_clamped": summary.zeros_clamped,
            "max_zero_change": summary.max_zero_change,
            "zero_rounding": "nearest",
        }
        config = GPTQConfig(bits=base_cfg.bits, group_size=base_cfg.group_size, desc_act=base_cfg.desc_act,
                            sym=False, checkpoint_format=fmt)
        write_configs(tmp, model.model_config, config, {META_KEY: meta})
        copy_tokenizer_files(model.tokenizer_dir, tmp)
    return summary.to_json()



def _in_features(model: MergedView, name: str) -> int:
    _, shape = model.base.tensor_spec(f"{name}.qweight")
    return shape[0] * WORD_BITS // model.bits


def planned_tensors(model: MergedView, checkpoint_format: str) -> list[TensorSpec]:
    """Every tensor the export writes, in writing order (per layer: qweight, qzeros, scales,
    g_idx, bias; then the float tensors), from the base's headers alone.

    Raises :class:`FormatLimitError` for 3-bit layers the runtimes cannot load (as ``encode_layer``).
    """
    base = model.base
    specs: list[TensorSpec] = []
    for name in model.quantized_modules:
        _, qweight = base.tensor_spec(f"{name}.qweight")
        _, qzeros = base.tensor_spec(f"{name}.qzeros")
        _, scales = base.tensor_spec(f"{name}.scales")
        in_f, out_f = qweight[0] * WORD_BITS // model.bits, qweight[1]
        if model.bits == 3 and (in_f % THREE_BIT_WIDTH_MULTIPLE or out_f % THREE_BIT_WIDTH_MULTIPLE):
            encode_layer(model.base.read_layer(name), checkpoint_format)  # raises the format's refusal
        specs += [TensorSpec(f"{name}.qweight", OUTPUT_DTYPES["qweight"], qweight),
                  TensorSpec(f"{name}.qzeros", OUTPUT_DTYPES["qzeros"], qzeros),
                  TensorSpec(f"{name}.scales", OUTPUT_DTYPES["scales"], scales),
                  TensorSpec(f"{name}.g_idx", OUTPUT_DTYPES["g_idx"], (in_f,))]
        if f"{name}.bias" in base.tensor_files:
            specs.append(TensorSpec(f"{name}.bias", OUTPUT_DTYPES["bias"], base.tensor_spec(f"{name}.bias")[1]))
    for key in model.other_tensor_names():
        dtype, shape = base.tensor_spec(key)
        specs.append(TensorSpec(key, dtype, shape))
    return specs


def _adapter_fingerprint(model: MergedView) -> Optional[str]:
    if model.adapter is None:
        return None
    import hashlib

    h = hashlib.sha256()
    for name in sorted(model.adapter.layers):
        layer = model.adapter.layers[name]
        h.update(name.encode())
        h.update(layer.lora_A.to(torch.float32).contiguous().numpy().tobytes())
        h.update(layer.lora_B.to(torch.float32).contiguous().numpy().tobytes())
    h.update(f"{model.adapter.alpha}/{model.adapter.rank}/{model.adapter.pooling}".encode())
    return "sha256:" + h.hexdigest()


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy everything but weights and quantization configs (tokenizer, generation config, template)."""
    skip = {CONFIG_FILE, QUANTIZE_CONFIG_FILE, INDEX_FILE}
    for item in Path(src).iterdir():
        if item.is_file() and item.name not in skip and not item.name.endswith(".safetensors") \
                and not item.name.startswith("."):
            shutil.copy2(item, Path(dst) / item.name)
