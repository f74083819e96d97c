"""``--to gptq``: a merged model as an AutoGPTQ checkpoint (transformers, GPTQModel, vLLM).

Layout and zero conventions: ``qalora_export/checkpoint/gptq.py`` (the format is also the project's
input format, so its spec lives in the core, once).

What this format holds exactly (DESIGN.md §3): codes and fp16 scales are copied from the base,
so the fold is bit-exact when every folded zero-point is an integer inside the format's range
(``gptq_format.zero_range``). Otherwise:

- fractional zeros are rounded to the nearest integer; the summary says how many moved and the
  largest change (in code units; the weight moves by at most ``scale / 2`` per element), and
  ``require_exact=True`` makes that an error;
- zeros outside the range are an error naming the layer and the fix (``gptq_v2`` for a zero of 0
  in v1; ``clamp_zeros=True`` to clamp, reported) — never wrapped.

The merge is recorded in ``quantization_config.meta.qalora_export`` so that ``verify`` knows which
reference the artifact must equal (the exact fold, or the declared rounding of it).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from qalora_export.errors import FoldError, FormatLimitError
from qalora_export.extras import Requirement
from qalora_export.formats.gptq.runtime import RUNTIME as GPTQ_RUNTIME
from qalora_export.core.packing import WORD_BITS
from qalora_export.checkpoint.gptq import (CHECKPOINT_FORMATS, CONFIG_FILE, DEFAULT_MAX_SHARD_BYTES, INDEX_FILE,
                                       QUANTIZE_CONFIG_FILE, THREE_BIT_WIDTH_MULTIPLE, GPTQCheckpoint,
                                       GPTQConfig, encode_layer, encode_zero_points, write_checkpoint,
                                       write_configs, zero_range)
from qalora_export.storage.atomic import atomic_output_dir
from qalora_export.checkpoint.merged_view import MergedModel, single_threaded_torch
from qalora_export.core.record import QuantizedLinear, contiguous_g_idx
from qalora_export.storage.safetensors_stream import StoredTensor, TensorSpec
from qalora_export.core.weight_rows import WeightRows

FORMAT = "gptq"
# Optional packages: writing needs none; verify runs transformers + GPTQModel (with optimum).
EXPORT_REQUIRES: tuple[Requirement, ...] = ()
RUNTIME_REQUIRES = (Requirement("gptq", ("gptqmodel", "optimum")),)
RUNTIME = GPTQ_RUNTIME
META_KEY = "qalora_export"

# Weight level (verify): the decoded artifact must equal the declared merge (exact fold, or the
# rounded/clamped fold) to float64 round-off; fp16 scales are copied, codes are integers.
WEIGHT_TOLERANCE = 1e-9  # relative to the layer's max |W|


@dataclass
class ZeroPolicyResult:
    """What writing one layer's zeros as integers did."""

    moved: int = 0  # zeros changed by rounding
    max_change: float = 0.0  # largest |rounded - folded|, code units
    clamped: int = 0


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


def export(model: MergedModel, out: Path, *, checkpoint_format: Optional[str] = None,
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
    summary = GPTQExportSummary(format=FORMAT, path=str(out), checkpoint_format=fmt, bits=base_cfg.bits,
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
            group_size = base_cfg.group_size if base_cfg.group_size > 0 else in_features[module]
            return contiguous_g_idx(in_features[module], group_size).to(torch.int32)
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
        # a deferred base-fingerprint check (MergedModel.open(defer_fingerprint=True), as the CLI
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


# dtypes of a layer's tensors in this format's output (gptq_format's table); qzeros is re-encoded.
OUTPUT_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32,
                 "bias": torch.float16}


def _in_features(model: MergedModel, name: str) -> int:
    _, shape = model.base.tensor_spec(f"{name}.qweight")
    return shape[0] * WORD_BITS // model.bits


def planned_tensors(model: MergedModel, checkpoint_format: str) -> list[TensorSpec]:
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


def _adapter_fingerprint(model: MergedModel) -> Optional[str]:
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


def declared_layer(model: MergedModel, name: str, artifact_meta: dict) -> QuantizedLinear:
    """The record the artifact must hold for layer ``name``: the fold, rounded as its metadata declares."""
    folded, _ = model.read_layer(name)
    if artifact_meta.get("exact", True) and artifact_meta.get("zeros_moved", 0) == 0:
        return folded
    fmt = artifact_meta.get("checkpoint_format") or model.base.config.checkpoint_format
    rounded, _ = integer_zeros(folded, fmt if fmt in CHECKPOINT_FORMATS else "gptq_v2",
                               clamp=artifact_meta.get("zeros_clamped", 0) > 0)
    return rounded


def declared_weight(model: MergedModel, name: str, artifact_meta: dict) -> torch.Tensor:
    """:func:`declared_layer` dequantized: float64 ``[out, in]``."""
    return declared_layer(model, name, artifact_meta).dequantize(torch.float64)


# --------------------------------------------------------------------------------------- runtime

# Runtime level (DESIGN.md §4): GPTQModel's torch kernel dequantizes in fp16, so even the plain
# base differs from our float64-exact PyTorch model by a floor measured in the same run (base in
# GPTQModel vs base in PyTorch). The artifact must stay within FLOOR_FACTOR x that floor (+ eps
# for floors that are exactly 0, as with 2-bit codes whose fp16 products are exact).
FLOOR_FACTOR = 4.0
FLOOR_EPS_LOGIT = 1e-3
FLOOR_EPS_KL = 1e-6
MIN_TOP1 = 0.98
GREEDY_TOKENS = 12


def verify_runtime(model: MergedModel, artifact: Path, prompts: list[list[int]], workdir: Path,
                   device: str = "cpu") -> dict:
    """Load ``artifact`` in transformers + GPTQModel and compare it with the unmerged model.

    Three comparisons, all on the same prompts:

    - ``floor``: the base checkpoint in GPTQModel vs the base in our PyTorch model;
    - ``artifact_vs_declared``: the artifact in GPTQModel vs our PyTorch model of the weights the
      merge declared (the exact fold, or its announced rounding) — gated against the floor;
    - ``artifact_vs_unmerged``: vs the unmerged model (base + adapter) — gated against the floor
      too, whether the merge was exact or rounded: a rounded artifact passes only if rounding did
      not move it measurably away from the trained model.
    """
    from qalora_export.training.evaluate import cached_base_weights
    from qalora_export.runtimes.compare import compare_logits, greedy_match, within_floor
    from qalora_export.modeling.model import build_model
    from qalora_export.formats.gptq.runtime import load_gptq_model, model_greedy, model_logits

    meta = merge_metadata(artifact)
    exact = bool(meta.get("exact", True))

    unmerged = build_model(model.base, model.adapter)
    with cached_base_weights(unmerged):  # dequantize once, not once per generated token
        ref_logits = model_logits(unmerged, prompts)
        ref_greedy = model_greedy(unmerged, prompts, GREEDY_TOKENS)
    del unmerged
    if model.adapter is not None:
        plain = build_model(model.base, None)
        with cached_base_weights(plain):
            base_logits = model_logits(plain, prompts)
        del plain
    else:
        base_logits = ref_logits

    runtime_base = load_gptq_model(model.base.directory, device)
    floor = compare_logits(base_logits, model_logits(runtime_base, prompts))
    del runtime_base

    runtime = load_gptq_model(artifact, device)
    art_logits = model_logits(runtime, prompts)
    art_greedy = model_greedy(runtime, prompts, GREEDY_TOKENS)
    del runtime

    if exact:
        declared_logits = ref_logits
    else:
        declared = build_model(artifact, None)
        with cached_base_weights(declared):
            declared_logits = model_logits(declared, prompts)
        del declared
    vs_declared = compare_logits(declared_logits, art_logits)
    vs_unmerged = compare_logits(ref_logits, art_logits)

    def gate(cmp) -> bool:
        return (within_floor(cmp.max_abs_logit_diff, floor.max_abs_logit_diff, FLOOR_FACTOR, FLOOR_EPS_LOGIT)
                and within_floor(cmp.mean_kl, floor.mean_kl, FLOOR_FACTOR, FLOOR_EPS_KL)
                and cmp.top1_agreement >= MIN_TOP1 * floor.top1_agreement)

    declared_ok = gate(vs_declared)
    # The artifact must be the trained model: a rounded merge is judged against the unmerged model
    # like an exact one (its rounding is declared and reported, but a tolerance failure is a failure).
    unmerged_ok = gate(vs_unmerged)
    return {
        "runtime": f"transformers + GPTQModel ({'gptq_torch, float32' if device == 'cpu' else device})",
        "exact_merge": exact,
        "floor": floor.to_json(),
        "artifact_vs_declared": {**vs_declared.to_json(), "passed": declared_ok},
        "artifact_vs_unmerged": {**vs_unmerged.to_json(), "passed": unmerged_ok,
                                 "greedy_match": greedy_match(ref_greedy, art_greedy)},
        "rule": f"max|dlogit| <= {FLOOR_FACTOR} x floor + {FLOOR_EPS_LOGIT}, KL <= {FLOOR_FACTOR} x floor + "
                f"{FLOOR_EPS_KL}, top-1 >= {MIN_TOP1} x floor's",
        "passed": bool(declared_ok and unmerged_ok),
        **({} if exact or unmerged_ok else {"note": (
            f"the merge rounded {meta.get('zeros_moved')} zero-points to integers and the artifact no longer "
            f"computes the trained model; train with --integer-zeros for an exact GPTQ fold, or export "
            f"onnx/gguf, which hold fractional zeros")}),
    }
