"""ONNX export (``write``): a LLaMA-family decoder whose quantized projections are ``com.microsoft.MatMulNBits``.

Each folded :class:`QuantizedLinear` becomes one MatMulNBits node with its integer codes
unchanged (3-bit codes in a 4-bit container) and the folded zero-points stored

- by default (``zero_points="auto"``) as ``split`` below, whose residual is left out of every node
  whose folded zeros are integral and in range (then it is ``uint8``) and, where the residual
  around the base's own integer zeros is low rank (the adapter's delta), stored as ``U @ V``
  (``lowrank.py``), with q/k/v and gate/up packed into one node each (``pack.py``): exact, and the
  fastest exact form on onnxruntime's CPU;
- as float zero-points (``zero_points="float"``): exact up to fp32 rounding of the float64
  fold, which is inside :data:`WEIGHT_TOLERANCE`; onnxruntime's CPU kernel runs them for 2 and
  4-bit containers only, so 8-bit codes need ``zero_points="uint8"``;
- as packed uint8 zero-points (``zero_points="uint8"``, the prepacked fast path of onnxruntime's
  CPU kernel): exact when the folded zeros are integral (an adapter trained with integer zero
  shifts, or no adapter); otherwise refused unless ``allow_rounding``, and the rounding error
  is measured and reported;
- split (``zero_points="split"``): the integer part of each folded zero as packed uint8 and the
  rest as a per-group residual, ``MatMulNBits(x; round(zero)) - pool_sum(x) @ R`` with
  ``R[g, n] = scale[g, n] * (zero[g, n] - round(zero[g, n]))`` ``[G, N]``: exact for any folded
  zeros (8-bit included) and on onnxruntime's fast prepacked kernel path; the residual is a
  ``G x N`` matrix (``G = in / group_size``), not a copy of the weight.

Act-order bases (``g_idx`` not ``i // group_size``) are exported exactly: the columns of each
weight are sorted by group (``perm = argsort(g_idx)``, stable), which makes the groups contiguous,
and a ``Gather(x, perm, axis=-1)`` in front of the node feeds it the activations in the same order
(``x[..., perm] @ W[:, perm].T == x @ W.T``). MatMulNBits' own ``g_idx`` input is deprecated
and not used. Group sizes that are not a whole number of power-of-two blocks of 16..256 are
refused (``spec.block_size_for``).

Files (``OUT_DIR``): ``model.onnx`` (graph only), ``model.onnx.data`` (every initializer larger than
1 KiB, always external so that no model hits protobuf's 2 GB limit and the layout is the same at
every size), ``genai_config.json``, the tokenizer files of the base. The MatMulNBits node of a
projection is named by its transformers module path (``model.layers.0.self_attn.q_proj``), which
is how :func:`read_weights` maps it back; a split residual is the initializer
``<module>.MatMulNBits.zero_residual``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from qalora_export.checkpoint.merged_view import single_threaded_torch
from qalora_export.checkpoint.tokenizer_check import check_tokenizer_matches
from qalora_export.core.families import LLAMA_PROJECTIONS as PROJECTIONS
from qalora_export.core.weight_rows import row_ranges
from qalora_export.errors import CheckpointError, ConfigError, UnsupportedModelError
from qalora_export.formats.onnx import spec as spec
from qalora_export.formats.onnx.encode import encode_linear, relayable
from qalora_export.formats.onnx.genai import write_genai_config
from qalora_export.formats.onnx.spec import DATA_FILE, MERGE_METADATA_KEY, METADATA_VERSION, MODEL_FILE, TOKENIZER_FILES
from qalora_export.storage.atomic import atomic_output_dir

# ------------------------------------------------------------------------------------ export

def _check_options(zero_points: str, accuracy_level: int, dtype: str) -> None:
    if zero_points not in spec.ZERO_POINT_KINDS:
        raise ConfigError(f"--zero-points {zero_points!r} is not one of {list(spec.ZERO_POINT_KINDS)}")
    if accuracy_level not in spec.ACCURACY_LEVELS:
        raise ConfigError(f"--accuracy-level {accuracy_level!r} is not one of {list(spec.ACCURACY_LEVELS)}")
    if dtype not in spec.DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {list(spec.DTYPES)}")


#: Bytes of one row block when a float table is read (see :func:`_tensor_np`).
READ_BLOCK_BYTES = 32 << 20


def _tensor_np(model, name: str) -> np.ndarray:
    """A float tensor of the base as numpy (bfloat16 widened to float32).

    2-D tables (embeddings, lm head) are read a row block at a time into one array: a whole-table
    read keeps every page of the mapped file resident while it copies, which at 70B is a second
    0.5 GB next to the table itself.
    """
    dtype, shape = model.base.tensor_spec(name)
    if len(shape) != 2 or not shape[0]:
        return _as_numpy(model.read_tensor(name))
    out = None
    for start, stop in row_ranges(shape[0], shape[1] * dtype.itemsize, READ_BLOCK_BYTES):
        block = _as_numpy(model.read_tensor(name, slice(start, stop)))
        if out is None:
            out = np.empty(shape, dtype=block.dtype)
        out[start:start + len(block)] = block
    return out


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.to(torch.float32) if t.dtype == torch.bfloat16 else t).numpy()


def _write_artifact(model, out: Path, linear, dtype: str, accuracy_level: int, overwrite: bool,
                    metadata: dict, late_metadata=None, pack: bool = False, head=None) -> dict:
    """Build the graph with ``linear`` (module name -> Linear) and write OUT_DIR atomically.

    ``late_metadata()`` is called after the graph is built (when every layer has been encoded)
    and its entries are added to ``metadata_props``.
    """
    import onnx

    from qalora_export.formats.onnx.decoder import decoder_config
    from qalora_export.formats.onnx.graph import ExternalData, build_decoder

    cfg = decoder_config(model.model_config)
    out = Path(out)
    # a deferred base-fingerprint check (MergedView.open(defer_fingerprint=True), as the CLI opens
    # it) hashes the base while the layers are encoded; a mismatch removes the output
    with atomic_output_dir(out, overwrite) as tmp, single_threaded_torch(), model.fingerprint_checked():
        external = ExternalData(tmp / DATA_FILE)
        try:
            proto = build_decoder(model.model_config, linear, lambda n: _tensor_np(model, n), external,
                                  dtype=dtype, accuracy_level=accuracy_level, metadata=metadata, pack=pack,
                                  head=head)
        except BaseException:
            external.abort()
            raise
        external.close()
        for key, value in (late_metadata() if late_metadata else {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(tmp / MODEL_FILE))
        copied = []
        for fname in TOKENIZER_FILES:
            src = Path(model.tokenizer_dir) / fname
            if src.is_file():
                shutil.copyfile(src, tmp / fname)
                copied.append(fname)
        gen_path = Path(model.tokenizer_dir) / "generation_config.json"
        generation = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        write_genai_config(tmp, cfg, model.model_config, generation, Path(model.tokenizer_dir))
        sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    return {"files": sizes, "tokenizer_files": copied,
            "onnx_bytes": sizes[MODEL_FILE] + sizes[DATA_FILE]}


def read_for_encoding(model, name: str):
    """``(folded record, fold stats, qweight or None)`` of ``name`` for :func:`encode_linear`.

    A :func:`relayable` layer comes without its codes, plus its packed ``qweight`` as stored
    (int32 numpy): the fold never changes codes, and unpacking them to re-pack them was most of
    the export's time. Other layers (3-bit, act-order) come with their codes.
    """
    layer, fold = model.read_layer(name, with_codes=False)
    if relayable(layer):
        return layer, fold, model.read_tensor(f"{name}.qweight").numpy()
    layer, fold = model.read_layer(name)
    return layer, fold, None


def _graph_modules(model_config: dict) -> list[str]:
    n = int(model_config["num_hidden_layers"])
    return [f"model.layers.{i}.{p}" for i in range(n) for p in PROJECTIONS] + ["lm_head"]


def export(model, out: Path, *, zero_points: str = "auto", accuracy_level: int = 0, dtype: str = "fp32",
           overwrite: bool = False, allow_rounding: bool = False, lm_head: str = "float") -> dict:
    """Write ``model`` (a :class:`MergedView`) as an ONNX MatMulNBits decoder in ``out``.

    Args:
        model: the base with its adapter folded (``MergedView.open(base, adapter)``).
        out: output directory; refused if it exists unless ``overwrite``.
        zero_points: "auto" (default: exact and fast; "split" per node, a node's residual omitted
            where its folded zeros are integral and in range, q/k/v and gate/up packed into one
            node each), "float" (exact, slow on CPU), "split" (exact) or "uint8" (integral zeros
            only, else ``allow_rounding``).
        accuracy_level: MatMulNBits ``accuracy_level`` attribute (0 exact .. 4 int8 activations).
        dtype: activation / scale dtype, "fp32" or "fp16".
        allow_rounding: store zero-points a format cannot hold exactly, rounded, and report it.
        lm_head: "float" (default: the base's float head, exact) or "int8"/"int4": the head (a tied
            embedding's table) requantized by RTN into a MatMulNBits node for decode speed, not exact,
            recorded under ``lm_head`` in the merge record (``head.py``).

    Returns:
        a JSON-able summary: options, bits / container / block size, act-order layers permuted,
        per-format rounding (``max_weight_error``, ``rounded_layers``), file sizes.

    Example::

        summary = export(MergedView.open("base", "adapter"), Path("out_onnx"))
    """
    from qalora_export.formats.onnx.decoder import decoder_config
    from qalora_export.formats.onnx.graph import FloatLinear

    _check_options(zero_points, accuracy_level, dtype)
    head, head_info = _requantized_head(model, lm_head)
    decoder_config(model.model_config)  # unsupported architecture: refuse before any work
    check_tokenizer_matches(model.base, model.tokenizer_dir)  # the export copies it next to the model
    spec.container_bits(model.bits)
    spec.block_size_for(model.group_size)
    quantized = set(model.quantized_modules)
    unused = sorted(quantized - set(_graph_modules(model.model_config)))
    if unused:
        raise UnsupportedModelError(
            f"the base quantizes {len(unused)} module(s) the LLaMA decoder graph has no place for "
            f"(first: {unused[0]}); the ONNX export supports q/k/v/o, gate/up/down and lm_head")
    others = set(model.other_tensor_names())
    stats: list[dict] = []
    fold_shift = 0.0
    permuted: list[str] = []

    def linear(name: str):
        nonlocal fold_shift
        if name in quantized:
            layer, fold, qweight = read_for_encoding(model, name)
            fold_shift = max(fold_shift, fold.max_abs_shift)
            # auto: the base's integer zeros, around which the fold's residual is the adapter's low-rank delta
            base_zeros = (model.base.read_layer(name, with_codes=False).zeros
                          if zero_points == "auto" and model.adapter is not None else None)
            lin, st = encode_linear(layer, zero_points, dtype, allow_rounding, qweight, base_zeros)
            stats.append(st)
            if lin.perm is not None:
                permuted.append(name)
            return lin
        if f"{name}.weight" not in others:
            raise CheckpointError(f"{model.base.directory}: tensor {name}.weight is missing (neither quantized nor float)")
        bias = _tensor_np(model, f"{name}.bias") if f"{name}.bias" in others else None
        return FloatLinear(_tensor_np(model, f"{name}.weight"), bias)

    metadata = {"qalora_export.format_version": METADATA_VERSION, "qalora_export.bits": model.bits,
                "qalora_export.group_size": model.group_size, "qalora_export.zero_points": zero_points,
                "qalora_export.dtype": dtype, "qalora_export.adapter": model.adapter is not None}
    def merge_record() -> dict:
        rounded = [s["name"] for s in stats if s["rounded"]]
        record = {
            "zero_points": zero_points,
            "dtype": dtype,
            "exact": not rounded,
            "rounded_layers": rounded,
            "zeros_moved": sum(s["zeros_moved"] for s in stats),
            "max_weight_error": max((s["max_abs_error"] for s in stats), default=0.0),
            "max_weight_rel_error": max((s["rel_error"] for s in stats), default=0.0),
        }
        if zero_points == "auto":  # the form "auto" chose, per quantized layer
            split = [s["name"] for s in stats if s["residual"]]
            record["zero_point_form"] = "split" if len(split) == len(stats) else ("uint8" if not split else "mixed")
            record["split_layers"] = len(split)
            record["low_rank_layers"] = sum(1 for s in stats if s["low_rank"])
            record["uint8_layers"] = len(stats) - len(split)
            record["packed"] = True
        if head_info:  # only then: a float head's record stays byte for byte what it was
            record["lm_head"] = head_info
        return record

    files = _write_artifact(model, out, linear, dtype, accuracy_level, overwrite, metadata,
                            lambda: {MERGE_METADATA_KEY: json.dumps(merge_record())}, pack=zero_points == "auto",
                            head=head)
    return {
        "format": "onnx",
        "path": str(out),
        "bits": model.bits,
        "container_bits": spec.container_bits(model.bits),
        "group_size": model.group_size,
        "block_size": spec.block_size_for(model.group_size),
        "zero_points": zero_points,
        "dtype": dtype,
        "accuracy_level": accuracy_level,
        "quantized_layers": len(stats),
        "act_order_permuted_layers": len(permuted),
        "max_fold_shift_code_units": fold_shift,
        **merge_record(),
        **files,
    }


def _requantized_head(model, lm_head: str):
    """``(head, info)`` for :func:`build_decoder`: ``(None, {})`` for the float head, else the node
    name and a maker of the requantized head, and the dict its record is written into (``head.py``)."""
    from qalora_export.formats.onnx.head import (HEAD_NODE, check_lm_head_option, head_linear, head_record,
                                                 head_source, quantize_head)

    check_lm_head_option(lm_head)
    if lm_head == "float":
        return None, {}
    if "lm_head" in model.quantized_modules:
        raise ConfigError(f"--lm-head {lm_head}: the base's lm_head is already quantized (its fold is exported "
                          f"as is); leave out --lm-head")
    source = head_source(model.model_config)
    info: dict = {}

    def make():
        weight = _tensor_np(model, source)
        blocks = quantize_head(weight, lm_head)
        info.update(head_record(lm_head, model.model_config, blocks, weight))
        return head_linear(blocks)
    return (HEAD_NODE, make), info


def export_float_reference(model, out: Path, *, dtype: str = "fp32", overwrite: bool = False) -> dict:
    """The same decoder with every projection a float ``MatMul`` on the effective weight.

    Not a product format: the fp32 reference for benchmarks and for telling the runtime's own
    error from the export's. Weights are the record's ``scale * (q - zero')`` in ``dtype``.
    """
    from qalora_export.formats.onnx.graph import FloatLinear

    _check_options("float", 0, dtype)
    quantized = set(model.quantized_modules)
    others = set(model.other_tensor_names())

    def linear(name: str):
        if name in quantized:
            layer, _ = model.read_layer(name)
            bias = None if layer.bias is None else layer.bias.numpy()
            return FloatLinear(layer.dequantize(torch.float64).numpy().astype(spec.DTYPES[dtype]), bias)
        bias = _tensor_np(model, f"{name}.bias") if f"{name}.bias" in others else None
        return FloatLinear(_tensor_np(model, f"{name}.weight"), bias)

    files = _write_artifact(model, out, linear, dtype, 0, overwrite,
                            {"qalora_export.format_version": METADATA_VERSION, "qalora_export.float_reference": True})
    return {"format": "onnx-float-reference", "path": str(out), "dtype": dtype, **files}
