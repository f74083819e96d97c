"""ONNX export: a LLaMA-family decoder whose quantized projections are ``com.microsoft.MatMulNBits``.

Each folded :class:`QuantizedLinear` becomes one MatMulNBits node with its integer codes
unchanged (3-bit codes in a 4-bit container) and the folded zero-points stored

- as float zero-points (default, ``zero_points="float"``): exact up to fp32 rounding of the float64
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
refused (``onnx_spec.block_size_for``).

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
from typing import Iterator, Optional

import numpy as np
import torch

from qalora_export.extras import Requirement
from qalora_export.formats.onnx.runtime import RUNTIME as ONNXRUNTIME
from qalora_export.errors import CheckpointError, ConfigError, FormatLimitError, UnsupportedModelError
from qalora_export.storage.atomic import atomic_output_dir
from qalora_export.checkpoint.merged_view import single_threaded_torch
from qalora_export.core.record import QuantizedLinear
from qalora_export.checkpoint.tokenizer_check import check_tokenizer_matches
from qalora_export.core.weight_rows import WeightRows, row_ranges

from qalora_export.formats.onnx import spec as spec
from qalora_export.formats.onnx.genai import GENAI_CONFIG_FILE, MODEL_FILE, write_genai_config
from qalora_export.formats.onnx.spec import WEIGHT_TOLERANCE  # noqa: F401  (the converter contract's name)

FORMAT = "onnx"
# Optional packages: the writer builds the graph with onnx; verify runs onnxruntime and onnxruntime-genai.
EXPORT_REQUIRES = (Requirement("onnx", ("onnx",)),)
RUNTIME_REQUIRES = (Requirement("onnx", ("onnx", "onnxruntime", "onnxruntime_genai")),)
RUNTIME = ONNXRUNTIME
DATA_FILE = MODEL_FILE + ".data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
METADATA_VERSION = "1"
MERGE_METADATA_KEY = "qalora_export.merge"  # metadata_props entry: JSON of what the export rounded


# ------------------------------------------------------------------------------------ encoding

def column_permutation(layer: QuantizedLinear) -> Optional[np.ndarray]:
    """``perm`` int64 ``[in]`` that makes the groups of an act-order layer contiguous, or None.

    Raises :class:`FormatLimitError` when a group does not hold exactly ``group_size`` columns
    (then no permutation gives whole blocks).
    """
    if not layer.is_act_order:
        return None
    g_idx = layer.g_idx.to(torch.int64)
    counts = torch.bincount(g_idx, minlength=layer.num_groups)
    if len(counts) != layer.num_groups or bool((counts != layer.group_size).any()):
        raise FormatLimitError(
            f"{layer.name}: act-order g_idx puts {int(counts.min())}..{int(counts.max())} columns in a group, "
            f"not {layer.group_size} each, so its columns cannot be permuted into whole MatMulNBits blocks; "
            f"re-quantize the base without act-order (desc_act=false)"
        )
    return torch.argsort(g_idx, stable=True).numpy()


def relayable(layer: QuantizedLinear) -> bool:
    """Whether ``B`` of ``layer`` is its GPTQ ``qweight`` re-laid (``onnx_spec.b_from_qweight``):
    codes whose width is their container's and that divide a byte, in contiguous groups."""
    return (layer.bits in spec.RELAYABLE_BITS and spec.container_bits(layer.bits) == layer.bits
            and not layer.is_act_order)


def encode_linear(layer: QuantizedLinear, zero_points: str = "float", dtype: str = "fp32",
                  allow_rounding: bool = False,
                  qweight: Optional[np.ndarray] = None) -> tuple["onnx_graph.NBitsLinear", dict]:
    """One folded layer as MatMulNBits inputs, and what storing it lost.

    Args:
        qweight: the layer's packed GPTQ ``qweight`` (int32 ``[in * bits / 32, out]``) for a
            :func:`relayable` layer: ``B`` is then re-laid from its words and ``layer.codes`` is not
            read, so a record from ``read_layer(with_codes=False)`` does. Same bytes as packing
            the unpacked codes (the fold never changes codes).

    Returns:
        the :class:`onnx_graph.NBitsLinear` and ``{"name", "max_abs_error", "rel_error",
        "rounded"}`` where the errors compare the stored weight with the record's float64
        ``scale * (q - zero)``.
    """
    from qalora_export.formats.onnx.graph import NBitsLinear

    bits = spec.container_bits(layer.bits)
    block_size = spec.block_size_for(layer.group_size)
    reps = layer.group_size // block_size
    perm = column_permutation(layer)
    g_of_block = np.arange(layer.num_groups).repeat(reps)  # group of each block after sorting
    if qweight is not None:
        if not relayable(layer):
            raise ValueError(f"{layer.name}: {layer.bits}-bit{' act-order' if perm is not None else ''} codes "
                             f"cannot be re-laid from qweight; pass the record with its codes")
        b = spec.BFromQweight(qweight, bits, block_size)  # laid out a row block at a time as it is written
    else:
        codes = layer.codes.numpy()
        b = spec.pack_b(codes if perm is None else codes[:, perm], bits, block_size)
    scales64 = layer.scales.to(torch.float64).numpy().T[:, g_of_block]  # [N, k_blocks]
    zeros64 = layer.zeros.to(torch.float64).numpy().T[:, g_of_block]
    io = spec.DTYPES[dtype]
    scales = scales64.astype(io)
    if not np.array_equal(scales.astype(np.float64), scales64):
        raise FormatLimitError(f"{layer.name}: a scale is not representable in {dtype}; export with --dtype fp32")

    residual = None
    if zero_points == "float":
        if bits not in spec.FLOAT_ZERO_POINT_BITS:
            raise FormatLimitError(
                f"{layer.name}: {layer.bits}-bit codes use MatMulNBits bits={bits}, whose onnxruntime CPU kernel "
                f"refuses float zero-points; export with --zero-points split (exact for any folded zero-points) "
                f"or --zero-points uint8 (exact when they are integral, e.g. no adapter)"
            )
        stored = zeros64.astype(io)
        stored64 = stored.astype(np.float64)
    elif zero_points == "split":
        # W = scale * (q - zi) - scale * (zero - zi): the second term is constant per (row, group),
        # so x @ W.T = MatMulNBits(x; zi) - pool_sum(x) @ R with R[g, n] = scale * (zero - zi).
        stored = np.clip(np.round(zeros64), 0, (1 << bits) - 1).astype(np.uint8)
        frac = (zeros64 - stored.astype(np.float64))[:, ::reps]  # [N, G]
        if np.any(frac != 0):
            residual = np.ascontiguousarray((scales64[:, ::reps] * frac).T.astype(io))  # [G, N]
            held = residual.astype(np.float64).T.repeat(reps, axis=1) / scales64  # zero part R holds
        else:
            held = 0.0
        stored64 = stored.astype(np.float64) + held
    elif zero_points == "uint8":
        rounded = np.round(zeros64)
        lo, hi = float(zeros64.min()), float(zeros64.max())
        if rounded.min() < 0 or rounded.max() > (1 << bits) - 1:
            raise FormatLimitError(
                f"{layer.name}: folded zero-points span [{lo:.3f}, {hi:.3f}], outside the {bits}-bit packed "
                f"zero-point range [0, {(1 << bits) - 1}]; export with --zero-points split or float"
            )
        stored = rounded.astype(np.uint8)
        stored64 = rounded
    else:
        raise ConfigError(f"--zero-points {zero_points!r} is not one of {spec.ZERO_POINT_KINDS}")

    # Error of the stored weight: scale * |zero_stored - zero| (codes and scales are exact).
    max_err = float(np.abs(scales64 * (stored64 - zeros64)).max()) if zeros64.size else 0.0
    w_max = max_abs_weight(b, bits, scales64, zeros64) if max_err > 0 else 0.0  # only a ratio of 0 needs none
    rel = max_err / w_max if w_max > 0 else 0.0
    is_rounded = rel > spec.WEIGHT_TOLERANCE
    if is_rounded and not allow_rounding:
        frac = float(np.abs(zeros64 - np.round(zeros64)).max())
        how = ("the folded zero-points are fractional (up to {:.4f} code units from an integer)".format(frac)
               if zero_points == "uint8" else f"{dtype} cannot hold the folded zero-points")
        fix = ("--zero-points split (or float)" if zero_points == "uint8" else "--dtype fp32")
        raise FormatLimitError(
            f"{layer.name}: {how}; storing them as {zero_points} zero-points would change the weight by up to "
            f"{max_err:.3g} ({rel:.2e} of its range, tolerance {spec.WEIGHT_TOLERANCE:g}). Export with {fix} "
            f"to stay exact, or pass --allow-rounding to round them and have the error reported"
        )

    if zero_points in ("uint8", "split"):
        zp = spec.pack_zero_points(stored, bits)
    else:
        zp = np.ascontiguousarray(stored)
    lin = NBitsLinear(
        k=layer.in_features, n=layer.out_features, bits=bits, block_size=block_size,
        b=b, scales=np.ascontiguousarray(scales), zero_points=zp,
        perm=perm, bias=None if layer.bias is None else layer.bias.numpy().astype(io),
        zero_residual=residual, residual_group=layer.group_size,
    )
    moved = int((stored64 != zeros64).sum()) if is_rounded else 0
    return lin, {"name": layer.name, "max_abs_error": max_err, "rel_error": rel, "rounded": bool(is_rounded),
                 "zeros_moved": moved}


#: Blocks whose codes :func:`max_abs_weight` reads before it can stop (the largest bounds first).
MAX_WEIGHT_CANDIDATES = 256


def max_abs_weight(b: np.ndarray, bits: int, scales64: np.ndarray, zeros64: np.ndarray) -> float:
    """``max |scale * (q - zero)|`` over the layer, reading the codes of only a few blocks of ``B``.

    Args:
        b: uint8 ``[N, k_blocks, blob]`` (or a :class:`~onnx_spec.BFromQweight`);
            scales64, zeros64: float64 ``[N, k_blocks]``.

    Equals the maximum over blocks of ``max(|scale * (min_q - zero)|, |scale * (max_q - zero)|)``
    bit for bit. A block's value is at most ``|scale| * max(|0 - zero|, |2**bits - 1 - zero|)``
    (its codes lie in ``0 .. 2**bits - 1`` and rounding is monotonic), so the exact values of the
    :data:`MAX_WEIGHT_CANDIDATES` blocks with the largest bounds settle it whenever the best of
    them reaches the next bound; that is the usual case (RTN and GPTQ groups use code 0 or the
    top code), and otherwise every block is read. This replaces a min/max pass over every code.
    """
    if not zeros64.size:
        return 0.0
    n_rows, k_blocks, _ = b.shape
    bound = (np.abs(scales64) * np.maximum(np.abs(0.0 - zeros64), np.abs(float((1 << bits) - 1) - zeros64))).ravel()
    split = bound.size - min(MAX_WEIGHT_CANDIDATES, bound.size)  # blocks [split:] of the partition are read
    if split:
        order = np.argpartition(bound, split - 1)
        top, rest = order[split:], bound[order[split - 1]]  # rest: the largest bound not read
    else:
        top, rest = np.arange(bound.size), -np.inf
    rows, blocks = np.divmod(top, k_blocks)
    picked = b.take(rows, blocks) if isinstance(b, spec.BFromQweight) else b[rows, blocks]
    best = _blocks_max_abs(picked, bits, scales64[rows, blocks], zeros64[rows, blocks])
    if best >= rest:
        return best
    return _blocks_max_abs(np.asarray(b), bits, scales64, zeros64)


def _blocks_max_abs(b: np.ndarray, bits: int, scales64: np.ndarray, zeros64: np.ndarray) -> float:
    """``max |scale * (q - zero)|`` over blocks ``b`` ``[..., blob]`` with scales, zeros ``[...]``."""
    lo, hi = spec.block_code_range(b, bits)
    return float(np.maximum(np.abs(scales64 * (lo - zeros64)), np.abs(scales64 * (hi - zeros64))).max())


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
                    metadata: dict, late_metadata=None) -> dict:
    """Build the graph with ``linear`` (module name -> Linear) and write OUT_DIR atomically.

    ``late_metadata()`` is called after the graph is built (when every layer has been encoded)
    and its entries are added to ``metadata_props``.
    """
    import onnx

    from qalora_export.formats.onnx.graph import ExternalData, build_decoder, decoder_config

    cfg = decoder_config(model.model_config)
    out = Path(out)
    # a deferred base-fingerprint check (MergedModel.open(defer_fingerprint=True), as the CLI opens
    # it) hashes the base while the layers are encoded; a mismatch removes the output
    with atomic_output_dir(out, overwrite) as tmp, single_threaded_torch(), model.fingerprint_checked():
        external = ExternalData(tmp / DATA_FILE)
        try:
            proto = build_decoder(model.model_config, linear, lambda n: _tensor_np(model, n), external,
                                  dtype=dtype, accuracy_level=accuracy_level, metadata=metadata)
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
        write_genai_config(tmp, cfg, model.model_config, generation)
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


def export(model, out: Path, *, zero_points: str = "float", accuracy_level: int = 0, dtype: str = "fp32",
           overwrite: bool = False, allow_rounding: bool = False) -> dict:
    """Write ``model`` (a :class:`MergedModel`) as an ONNX MatMulNBits decoder in ``out``.

    Args:
        model: the base with its adapter folded (``MergedModel.open(base, adapter)``).
        out: output directory; refused if it exists unless ``overwrite``.
        zero_points: "float" (exact, default) or "uint8" (packed; integral zeros only, else
            ``allow_rounding``).
        accuracy_level: MatMulNBits ``accuracy_level`` attribute (0 exact .. 4 int8 activations).
        dtype: activation / scale dtype, "fp32" or "fp16".
        allow_rounding: store zero-points a format cannot hold exactly, rounded, and report it.

    Returns:
        a JSON-able summary: options, bits / container / block size, act-order layers permuted,
        per-format rounding (``max_weight_error``, ``rounded_layers``), file sizes.

    Example::

        summary = export(MergedModel.open("base", "adapter"), Path("out_onnx"))
    """
    from qalora_export.formats.onnx.graph import FloatLinear, decoder_config

    _check_options(zero_points, accuracy_level, dtype)
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
            lin, st = encode_linear(layer, zero_points, dtype, allow_rounding, qweight)
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
                "qalora_export.dtype": dtype, "qalora_export.core.adapter": model.adapter is not None}
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
        return record

    files = _write_artifact(model, out, linear, dtype, accuracy_level, overwrite, metadata,
                            lambda: {MERGE_METADATA_KEY: json.dumps(merge_record())})
    return {
        "format": FORMAT,
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


# ------------------------------------------------------------------------------------ reading

def _load_model_proto(out_dir: Path):
    import onnx

    path = Path(out_dir) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{out_dir} has no {MODEL_FILE}; it is not an ONNX export of this tool")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable ONNX model: {exc}") from exc


def _initializer_array(tensor, base_dir: Path) -> np.ndarray:
    """An initializer's value, reading external data by offset/length (our own reader).

    Raises :class:`CheckpointError` for anything a damaged file can hold: unknown data types,
    negative dims, missing or out-of-directory ``location``, bad offsets, short data.
    """
    from onnx import TensorProto, helper, numpy_helper

    if any(d < 0 for d in tensor.dims):
        raise CheckpointError(f"{base_dir}: initializer {tensor.name} has negative dims {list(tensor.dims)}")
    try:
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except Exception as exc:  # unknown data_type, raw_data of the wrong size, ...
        raise CheckpointError(
            f"{base_dir}: initializer {tensor.name} cannot be decoded ({type(exc).__name__}: {exc}); "
            f"the model file is corrupt") from exc
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    if not location or Path(location).name != location or location in (".", ".."):
        raise CheckpointError(
            f"{base_dir}: initializer {tensor.name} has external data location {location!r}; expected a file "
            f"name inside the model directory (this reader does not follow paths out of it)")
    path = base_dir / location
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", -1))
    except ValueError as exc:
        raise CheckpointError(f"{path}: initializer {tensor.name} has a non-integer offset/length ({exc})") from exc
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    if offset < 0 or count * dtype.itemsize != length:
        raise CheckpointError(
            f"{path}: initializer {tensor.name} has {length} bytes at offset {offset} for shape "
            f"{list(tensor.dims)} of {dtype}; the model file is corrupt")
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as exc:
        raise CheckpointError(f"cannot read external data of {tensor.name} from {path}: {exc}") from exc
    if len(data) != length:
        raise CheckpointError(f"{path} is truncated: initializer {tensor.name} needs bytes {offset}..{offset + length}")
    return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))


def merge_metadata(out_dir: Path) -> dict:
    """What the export stored and rounded (``metadata_props``): zero_points, dtype, exact,
    rounded_layers, zeros_moved, max_weight_error. Empty for a file this tool did not write."""
    proto = _load_model_proto(Path(out_dir))
    for entry in proto.metadata_props:
        if entry.key == MERGE_METADATA_KEY:
            try:
                record = json.loads(entry.value)
            except (ValueError, RecursionError) as exc:
                raise CheckpointError(f"{out_dir}: metadata {MERGE_METADATA_KEY} is not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise CheckpointError(f"{out_dir}: metadata {MERGE_METADATA_KEY} must be a JSON object")
            return record
    return {}


def declared_layer(model, name: str, meta: dict) -> QuantizedLinear:
    """The record the artifact declares it holds for ``name``: the folded record with its
    zero-points stored as the export stored them (rounded to integers for uint8, to the io dtype
    for float zero-points)."""
    layer, _ = model.read_layer(name)
    zeros = layer.zeros.to(torch.float64)
    if meta.get("zero_points") == "uint8":
        zeros = torch.round(zeros)
    else:
        zeros = zeros.to(torch.float16 if meta.get("dtype") == "fp16" else torch.float32).to(torch.float64)
    return layer.with_zeros(zeros)


def declared_weight(model, name: str, meta: dict) -> torch.Tensor:
    """:func:`declared_layer` dequantized: float64 ``[out, in]``."""
    return declared_layer(model, name, meta).dequantize(torch.float64)


def read_weights(out_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode every MatMulNBits node of ``out_dir/model.onnx`` into (module name, float64 ``[out, in]``).

    Reads ``B``, scales and zero-points with this module's codec (``onnx_spec``), undoes an
    act-order input ``Gather`` permutation, and yields the effective weight the node computes with.
    """
    for name, rows in read_weight_rows(out_dir):
        yield name, rows.whole()


def read_weight_rows(out_dir: Path) -> Iterator[tuple[str, WeightRows]]:
    """:func:`read_weights` with each weight decoded on demand, a row block at a time (verify);
    everything but the values is checked before a node is yielded."""
    from onnx import helper

    out_dir = Path(out_dir)
    proto = _load_model_proto(out_dir)
    inits = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}

    def value(name: str, node_name: str) -> np.ndarray:
        if name not in inits:
            raise CheckpointError(f"{out_dir}: input {name} of MatMulNBits node {node_name} is not an initializer")
        return _initializer_array(inits[name], out_dir)

    for node in proto.graph.node:
        if node.op_type != spec.OP_TYPE or node.domain != spec.OP_DOMAIN:
            continue
        try:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        except Exception as exc:
            raise CheckpointError(f"{out_dir}: attributes of {node.name} cannot be read ({exc})") from exc
        k, n, bits, block_size = (_int_attr(attrs, a, node.name, out_dir) for a in ("K", "N", "bits", "block_size"))
        if bits not in spec.KERNEL_BITS or block_size not in spec.BLOCK_SIZES:
            raise CheckpointError(
                f"{out_dir}: {node.name} has bits={bits}, block_size={block_size}; MatMulNBits takes bits in "
                f"{list(spec.KERNEL_BITS)} and block sizes {list(spec.BLOCK_SIZES)}")
        if len(node.input) < 3:
            raise CheckpointError(f"{out_dir}: {node.name} has {len(node.input)} inputs; MatMulNBits needs A, B, scales")
        k_blocks = -(-k // block_size)
        b = value(node.input[1], node.name)
        if b.dtype != np.uint8 or b.shape != (n, k_blocks, block_size * bits // 8):
            raise CheckpointError(f"{out_dir}: {node.name} B is {b.dtype} {list(b.shape)}, expected uint8 "
                                  f"{[n, k_blocks, block_size * bits // 8]}")
        scales = value(node.input[2], node.name)
        if scales.size != n * k_blocks or scales.dtype.kind != "f":
            raise CheckpointError(f"{out_dir}: {node.name} scales are {scales.dtype} {list(scales.shape)}, "
                                  f"expected {n * k_blocks} floats ([{n}, {k_blocks}])")
        scales = scales.astype(np.float64).reshape(n, k_blocks)
        if len(node.input) > 3 and node.input[3]:
            zp = value(node.input[3], node.name)
            if zp.dtype == np.uint8 and zp.size == n * (-(-k_blocks * bits // 8)):
                zeros = spec.unpack_zero_points(zp.reshape(n, -1), bits, k_blocks)
                if not np.array_equal(spec.pack_zero_points(zeros, bits), zp.reshape(n, -1)):
                    raise CheckpointError(f"{out_dir}: {node.name} zero_points have bits set in the padding after "
                                          f"the last of {k_blocks} blocks; the model file is corrupt")
            elif zp.dtype.kind == "f" and zp.size == n * k_blocks:
                zeros = zp.reshape(n, k_blocks)
            else:
                raise CheckpointError(f"{out_dir}: {node.name} zero_points are {zp.dtype} {list(zp.shape)}, which "
                                      f"is neither packed uint8 nor float [{n}, {k_blocks}]")
        else:
            zeros = np.full((n, k_blocks), 1 << (bits - 1))
        residual_name = f"{node.name}.MatMulNBits.zero_residual"
        r = None
        if residual_name in inits:  # "split" zero-points: W -= R[g(i), n] over runs of K / G columns
            r = _initializer_array(inits[residual_name], out_dir).astype(np.float64)  # [G, N]
            if r.ndim != 2 or r.shape[1] != n or r.shape[0] == 0 or k % r.shape[0]:
                raise CheckpointError(f"{out_dir}: {residual_name} is {list(r.shape)}, expected [G, {n}] with G dividing {k}")
        perm = None
        src = producers.get(node.input[0])
        if src is not None and src.op_type == "Gather" and len(src.input) > 1 and src.input[1] in inits:
            perm = _initializer_array(inits[src.input[1]], out_dir)
            if perm.dtype.kind not in "iu" or perm.shape != (k,) or not np.array_equal(np.sort(perm), np.arange(k)):
                raise CheckpointError(f"{out_dir}: the input permutation of {node.name} ({src.input[1]}) is not a "
                                      f"permutation of 0..{k - 1}; the model file is corrupt")
            perm = perm.astype(np.int64)
        yield node.name, WeightRows((n, k), _node_rows(out_dir, node.name, k, bits, block_size, b, scales, zeros, r, perm))


def _node_rows(out_dir: Path, node: str, k: int, bits: int, block_size: int, b: np.ndarray, scales: np.ndarray,
               zeros: np.ndarray, residual: Optional[np.ndarray], perm: Optional[np.ndarray]):
    """``(start, stop) -> float64`` rows of the weight one MatMulNBits node computes with: codes
    dequantized, the split residual ``R`` ``[G, N]`` subtracted, the input permutation undone."""
    def decode(start: int, stop: int) -> torch.Tensor:
        w = spec.dequantize(spec.unpack_b(b[start:stop], bits, k), scales[start:stop], zeros[start:stop], block_size)
        if residual is not None:
            w = w - np.repeat(residual.T[start:stop], k // residual.shape[0], axis=1)
        if perm is not None:
            unpermuted = np.empty_like(w)
            unpermuted[:, perm] = w
            w = unpermuted
        if not np.isfinite(w).all():
            raise CheckpointError(f"{out_dir}: {node} decodes to NaN or inf; the model file is corrupt")
        return torch.from_numpy(np.ascontiguousarray(w))
    return decode


def _int_attr(attrs: dict, name: str, node: str, out_dir: Path) -> int:
    value = attrs.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{out_dir}: {node} attribute {name}={value!r}; expected a positive integer")
    return value


# ------------------------------------------------------------------------------------ verify

def _greedy_check(ref_tokens: list[int], margins: list[float], got: list[int], tie_limit: float) -> dict:
    """Compare a greedy continuation with the reference's: identical, or diverging at a near-tie."""
    first = next((i for i, (a, b) in enumerate(zip(ref_tokens, got)) if a != b), None)
    if first is None and len(ref_tokens) != len(got):
        first = min(len(ref_tokens), len(got))
    if first is None:
        return {"match": True, "near_tie": False, "tokens": got}
    near_tie = first < len(margins) and margins[first] <= tie_limit
    return {"match": False, "near_tie": bool(near_tie), "diverges_at": first,
            "reference_margin": margins[first] if first < len(margins) else None, "tokens": got}


def _strip_eos(tokens: list[int], eos: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def _retie(check: dict, tie_limit: float) -> dict:
    """Re-judge a greedy check once the near-tie limit is known (margins kept in the check)."""
    margins = check.pop("reference_margins", None)
    if check.get("match") is False and margins is not None:
        at = check["diverges_at"]
        check["near_tie"] = bool(at < len(margins) and margins[at] <= tie_limit)
    return check


def verify_runtime(model, artifact: Path, prompts: list[list[int]], workdir: Path,
                   max_new_tokens: int = 8) -> dict:
    """Run the artifact in onnxruntime (accuracy level 0) and onnxruntime-genai against the
    unmerged PyTorch model ``build_model(model.base, model.adapter)``.

    Measures, over ``prompts``: max |Δlogit| (absolute and relative to max |logit|), mean and max
    KL(torch || onnx), top-1 agreement, KV-cache decoding vs full recomputation, and greedy
    continuations (onnxruntime loop with KV cache, and onnxruntime-genai) vs the PyTorch greedy
    continuation. An artifact exported at another accuracy level runs through a level-0 view
    in ``workdir`` (same weights). ``passed`` applies the tolerances of ``onnx_spec``: a top-1 or
    greedy disagreement passes only at a near-tie (reference top-2 margin within
    ``NEAR_TIE_FACTOR`` times the measured max |Δlogit|).
    """
    from qalora_export.training.evaluate import cached_base_weights
    from qalora_export.modeling.model import build_model
    from qalora_export.formats.onnx import runtime as onnxrt

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("verify needs at least one non-empty prompt")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    view = onnxrt.at_accuracy_level(Path(artifact), 0, workdir / "onnx_level0")
    ref = build_model(model.base, model.adapter)
    eos = onnxrt.eos_ids(view)
    pad = onnxrt.pad_id(view)
    decoder = onnxrt.OrtDecoder(view)
    ref_all, ort_all, kv_all, greedy = [], [], [], []
    # The reference's frozen base is dequantized once for the whole run, not once per greedy step.
    with cached_base_weights(ref):
        _run_prompts(prompts, ref, decoder, view, eos, pad, max_new_tokens, ref_all, ort_all, kv_all, greedy)
    return _judge(prompts, ref_all, ort_all, kv_all, greedy)


def _run_prompts(prompts, ref, decoder, view, eos, pad, max_new_tokens, ref_all, ort_all, kv_all, greedy) -> None:
    """Collect reference and onnxruntime logits, KV-cache logits and greedy continuations per prompt."""
    from qalora_export.formats.onnx import runtime as onnxrt

    try:
        for prompt in prompts:
            with torch.no_grad():
                ref_all.append(ref(torch.tensor([prompt])).logits[0].to(torch.float64).numpy())
            ort_all.append(decoder.logits(prompt).astype(np.float64))
            kv_all.append(decoder.incremental_logits(prompt, prefill=max(1, len(prompt) // 2)).astype(np.float64))
            ref_tokens, margins = onnxrt.torch_greedy(ref, prompt, max_new_tokens, eos)
            ort_tokens = decoder.greedy(prompt, max_new_tokens, eos)
            # onnxruntime-genai masks every prompt token equal to pad_token_id out of the attention
            # (often pad == eos, e.g. <|im_end|> inside a chat prompt), which computes something
            # else; it is checked, against PyTorch, on the prompt without its pad tokens instead.
            genai_prompt = [t for t in prompt if t != pad] if pad in prompt else prompt
            if not genai_prompt:
                genai = {"skipped": f"prompt is all pad_token_id {pad}"}
            else:
                g_ref, g_margins = ((ref_tokens, margins) if genai_prompt is prompt else
                                    onnxrt.torch_greedy(ref, genai_prompt, max_new_tokens, eos))
                # genai ends a sequence at eos without returning the eos token: compare without it
                g_out = _strip_eos(onnxrt.genai_greedy(view, genai_prompt, max_new_tokens), eos)
                genai = _greedy_check(_strip_eos(g_ref, eos), g_margins, g_out, 0.0)
                genai["prompt_tokens"] = len(genai_prompt)
                genai["reference_margins"] = g_margins
            greedy.append((ref_tokens, margins, ort_tokens, genai))
    finally:
        decoder.close()


def _judge(prompts, ref_all, ort_all, kv_all, greedy) -> dict:
    """Apply ``onnx_spec``'s tolerances to what :func:`_run_prompts` collected."""
    from qalora_export.runtimes.compare import compare_logits
    from qalora_export.formats.onnx import runtime as onnxrt

    logits = compare_logits(ref_all, ort_all)
    kv = compare_logits(ort_all, kv_all)
    logit_scale = max(float(np.abs(r).max()) for r in ref_all) or 1.0
    tie_limit = spec.NEAR_TIE_FACTOR * logits.max_abs_logit_diff
    # top-1 disagreements only at positions whose reference top-2 margin is a near-tie
    top1_bad = 0
    for r, o in zip(ref_all, ort_all):
        top2 = np.sort(r, axis=-1)[:, -2:]
        bad = (r.argmax(-1) != o.argmax(-1)) & ((top2[:, 1] - top2[:, 0]) > tie_limit)
        top1_bad += int(bad.sum())
    ort_greedy = [_greedy_check(t, m, o, tie_limit) for t, m, o, _ in greedy]
    genai_greedy = [_retie(g, tie_limit) for _, _, _, g in greedy]
    checks = {
        "max_dlogit_rel": logits.max_abs_logit_diff / logit_scale <= spec.RUNTIME_MAX_DLOGIT_REL,
        "mean_kl": logits.mean_kl <= spec.RUNTIME_MAX_KL,
        "top1": top1_bad == 0,
        "kv_cache": kv.max_abs_logit_diff / logit_scale <= spec.RUNTIME_KV_MAX_DLOGIT_REL,
        "greedy_onnxruntime": all(g["match"] or g["near_tie"] for g in ort_greedy),
        "greedy_genai": all(g.get("match") or g.get("near_tie") for g in genai_greedy if "skipped" not in g),
    }
    return {
        "runtime": "onnxruntime " + _version("onnxruntime") + ", onnxruntime-genai " + _version("onnxruntime_genai"),
        "providers": list(onnxrt.default_providers()),
        "accuracy_level": 0,
        "prompts": len(prompts),
        "logits": {**logits.to_json(), "max_abs_logit_diff_rel": logits.max_abs_logit_diff / logit_scale},
        "kv_cache_vs_full": {"max_abs_logit_diff": kv.max_abs_logit_diff,
                             "max_abs_logit_diff_rel": kv.max_abs_logit_diff / logit_scale},
        "top1_disagreements_not_near_tie": top1_bad,
        "greedy": {
            "reference": [t for t, _, _, _ in greedy],
            "onnxruntime": ort_greedy,
            "onnxruntime_genai": genai_greedy,
            "exact_match_onnxruntime": sum(g["match"] for g in ort_greedy),
            "exact_match_genai": sum(bool(g.get("match")) for g in genai_greedy),
            "genai_skipped": sum("skipped" in g for g in genai_greedy),
        },
        "tolerances": {"max_dlogit_rel": spec.RUNTIME_MAX_DLOGIT_REL, "mean_kl": spec.RUNTIME_MAX_KL,
                       "kv_max_dlogit_rel": spec.RUNTIME_KV_MAX_DLOGIT_REL, "near_tie_factor": spec.NEAR_TIE_FACTOR},
        "checks": checks,
        "passed": all(checks.values()),
    }


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a version string is informational only
        return "?"
