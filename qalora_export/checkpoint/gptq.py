"""The AutoGPTQ checkpoint format: layout spec, codec, and a streaming reader.

This is the project's input format (quantized bases) as well as an output format (written by
``qalora_export/formats/gptq/format.py`` with the codec below), so its spec lives here, once.

Per quantized linear ``<module>`` with ``in`` inputs, ``out`` outputs, ``G = in / group_size``
groups and ``b`` bits (packing: ``packing.py``, 32-bit words, LSB-first bit stream):

============================  =======  ==================================================
tensor                        dtype    shape / meaning
============================  =======  ==================================================
``<module>.qweight``          int32    ``[in * b / 32, out]``: codes packed along ``in``
``<module>.qzeros``           int32    ``[G, ceil(out * b / 32)]``: zero-points packed along out
``<module>.scales``           float16  ``[G, out]``
``<module>.g_idx``            int32    ``[in]``: group of each input column (act-order)
``<module>.bias``             float16  ``[out]``, optional
============================  =======  ==================================================

For b = 3 the runtimes load only layers whose ``in`` and ``out`` are multiples of 32 (whole
packing cycles); the writer refuses other widths, the reader accepts whole-cycle padding.

Zero convention, from ``checkpoint_format`` in the quantization config: ``"gptq"`` (v1) stores
``zero - 1``; ``"gptq_v2"`` stores ``zero``. Both store the value in ``b`` bits, so v1 holds true
zeros ``1 .. 2**b - 1`` (a true zero of 0 would be stored as -1, which wraps and decodes wrong in
every v1 runtime) and v2 holds ``0 .. 2**b - 1``.

Configuration: ``config.json`` carries ``quantization_config`` (``quant_method: "gptq"``, bits,
group_size, desc_act, sym, checkpoint_format, pack_dtype); ``quantize_config.json`` repeats it.
Weights live in ``model.safetensors`` or in shards listed by ``model.safetensors.index.json``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from safetensors import safe_open

from qalora_export.errors import CheckpointError, ConfigError, FormatLimitError
from qalora_export.storage.atomic import read_json
from qalora_export.core.packing import SUPPORTED_BITS, cycle_codes, pack_codes, unpack_codes
from qalora_export.core.record import QuantizedLinear, all_finite
from qalora_export.storage.safetensors_stream import (StoredTensor, TensorSpec, write_tensor_bytes, plan_shards, shard_file_names, write_file,
                                 write_index)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
FINGERPRINT_CHUNK = 8 << 20  # bytes per read while hashing a tensor (GPTQCheckpoint.fingerprint)


def _hash_file_range(h, path: Path, offset: int, length: int, buffer: bytearray) -> None:
    """``h.update`` with ``length`` bytes of ``path`` from ``offset``, read ``len(buffer)`` at a time."""
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length:
            n = f.readinto(view[:min(len(view), length)])
            if not n:
                raise CheckpointError(f"{path} ended at byte {f.tell()} while reading a tensor; the file is truncated")
            h.update(view[:n])
            length -= n

CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Exactness of this format (DESIGN.md §3): zero-points are integers in b bits.
STORED_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
# 3-bit layers: GPTQModel registers ceil(n * 3 / 32) words but decodes whole 3-word cycles, so only
# widths that are multiples of 32 load (checked by loading in transformers + GPTQModel).
THREE_BIT_WIDTH_MULTIPLE = 32
# GPTQCheckpoint.fingerprint: 2 also hashes checkpoint_format and each tensor's dtype and shape.
FINGERPRINT_VERSION = 2


def zero_range(bits: int, checkpoint_format: str) -> tuple[int, int]:
    """Inclusive range of *true* zero-points the format can hold without wrapping."""
    offset = STORED_ZERO_OFFSET[checkpoint_format]
    return offset, (1 << bits) - 1


@dataclass(frozen=True)
class GPTQConfig:
    """The quantization fields of an AutoGPTQ checkpoint that decoding depends on."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str

    def to_json(self) -> dict:
        """The ``quantization_config`` block transformers, GPTQModel and vLLM read."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "lm_head": False,
            "format": self.checkpoint_format,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "true_sequential": True,
            "meta": {"quantizer": ["qalora-export"]},
        }


def parse_gptq_config(obj: dict, source: Path) -> GPTQConfig:
    """Validate a ``quantization_config`` / ``quantize_config.json`` object."""
    method = obj.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointError(f"{source}: quant_method is {method!r}; only GPTQ checkpoints are read")
    bits = obj.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:  # 4.0 == 4, True == 1
        raise CheckpointError(f"{source}: bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")
    group_size = obj.get("group_size")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size == 0 or group_size < -1:
        raise CheckpointError(f"{source}: group_size={group_size!r} must be a positive integer (or -1)")
    fmt = obj.get("checkpoint_format", obj.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS:
        raise CheckpointError(
            f"{source}: checkpoint_format={fmt!r} is not readable; supported: {CHECKPOINT_FORMATS} "
            f"(convert marlin/bitblas/awq checkpoints to gptq first)"
        )
    pack_dtype = obj.get("pack_dtype", "int32")
    if pack_dtype != "int32":
        raise CheckpointError(f"{source}: pack_dtype={pack_dtype!r}; only int32 packing is supported")
    for flag in ("desc_act", "sym"):
        if not isinstance(obj.get(flag, False), bool):
            raise CheckpointError(f"{source}: {flag}={obj.get(flag)!r} must be true or false")
    return GPTQConfig(bits=bits, group_size=group_size, desc_act=obj.get("desc_act", False),
                      sym=obj.get("sym", True), checkpoint_format=fmt)


# --------------------------------------------------------------------------------------- codec


def encode_layer(layer: QuantizedLinear, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """Pack a record whose zero-points are integral into the format's tensors (suffix -> tensor).

    Raises:
        FormatLimitError: a zero-point is fractional or outside :func:`zero_range`; a 3-bit layer
            whose widths are not multiples of 32.
    """
    if layer.bits == 3 and (layer.in_features % THREE_BIT_WIDTH_MULTIPLE or layer.out_features % THREE_BIT_WIDTH_MULTIPLE):
        raise FormatLimitError(
            f"{layer.name}: 3-bit GPTQ packs {THREE_BIT_WIDTH_MULTIPLE} codes into 3 words, so the layer's "
            f"widths must be multiples of {THREE_BIT_WIDTH_MULTIPLE}, but it is {layer.out_features}x"
            f"{layer.in_features} (out x in); GPTQModel and AutoGPTQ cannot load such a checkpoint. "
            f"Use --bits 2, 4 or 8 for this model"
        )
    qzeros = encode_zero_points(layer, checkpoint_format)
    tensors = {
        "qweight": pack_codes(layer.codes.T, layer.bits, dim=0),
        "qzeros": qzeros,
        "scales": layer.scales.to(torch.float16).contiguous(),
        "g_idx": layer.g_idx.to(torch.int32).contiguous(),
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.to(torch.float16).contiguous()
    return tensors


def encode_zero_points(layer: QuantizedLinear, checkpoint_format: str) -> torch.Tensor:
    """``qzeros`` int32 ``[G, ceil(out * b / 32)]`` of a record whose zero-points are integral.

    Needs only the record's zeros (codes may be a :func:`codes_placeholder`).

    Raises:
        FormatLimitError: a zero-point is fractional or outside :func:`zero_range`.
    """
    zeros = layer.zeros.to(torch.float64)
    if not torch.equal(zeros, torch.round(zeros)):
        raise FormatLimitError(f"{layer.name}: GPTQ zero-points must be integers; round them first")
    lo, hi = zero_range(layer.bits, checkpoint_format)
    if zeros.numel() and (float(zeros.min()) < lo or float(zeros.max()) > hi):
        raise FormatLimitError(
            f"{layer.name}: zero-points span [{float(zeros.min()):g}, {float(zeros.max()):g}] but "
            f"{checkpoint_format} {layer.bits}-bit holds [{lo}, {hi}]"
            + (" (v1 stores zero - 1, so a zero of 0 cannot be stored: use --checkpoint-format gptq_v2)"
               if checkpoint_format == "gptq" and float(zeros.min()) >= 0 else "")
        )
    stored = zeros.to(torch.int64) - STORED_ZERO_OFFSET[checkpoint_format]
    return pack_codes(stored, layer.bits, dim=1)


def decode_layer(name: str, tensors: dict[str, torch.Tensor], config: GPTQConfig,
                 in_features: Optional[int] = None) -> QuantizedLinear:
    """Unpack a layer's tensors (suffix -> tensor) into a :class:`QuantizedLinear`.

    ``in_features`` defaults to what ``qweight`` implies (``rows * 32 / bits``).
    """
    missing = [s for s in ("qweight", "qzeros", "scales") if s not in tensors]
    if missing:
        raise CheckpointError(f"{name}: missing tensors {', '.join(name + '.' + m for m in missing)}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for suffix, t, dtypes in (("qweight", qweight, (torch.int32,)), ("qzeros", qzeros, (torch.int32,)),
                              ("scales", scales, (torch.float16, torch.bfloat16, torch.float32))):
        if t.dtype not in dtypes or t.ndim != 2:
            raise CheckpointError(f"{name}.{suffix}: expected a 2-D {dtypes[0]} tensor, got {t.dtype} {tuple(t.shape)}")
    bits = config.bits
    out_features = int(qweight.shape[1])
    words_per_cycle = cycle_codes(bits) * bits // 32
    if qweight.shape[0] % words_per_cycle:
        raise CheckpointError(
            f"{name}.qweight: {qweight.shape[0]} rows is not a whole number of {bits}-bit packing cycles "
            f"({words_per_cycle} words each); the tensor does not hold {bits}-bit codes (check `bits` in the config)"
        )
    in_features = in_features or int(qweight.shape[0]) * 32 // bits
    group_size = in_features if config.group_size == -1 else config.group_size
    if in_features % group_size:
        raise CheckpointError(f"{name}: group_size {group_size} does not divide in_features {in_features}")
    n_groups = in_features // group_size
    if "g_idx" in tensors:
        g_idx = tensors["g_idx"].to(torch.int64)
        if g_idx.shape != (in_features,):
            raise CheckpointError(f"{name}.g_idx: shape {tuple(g_idx.shape)}, expected ({in_features},)")
    else:
        g_idx = torch.arange(in_features) // group_size
    n_groups = max(n_groups, int(g_idx.max()) + 1 if g_idx.numel() else 0)
    if scales.shape != (n_groups, out_features):
        raise CheckpointError(f"{name}.scales: shape {tuple(scales.shape)}, expected ({n_groups}, {out_features})")
    if g_idx.numel() and int(g_idx.min()) < 0:
        raise CheckpointError(f"{name}.g_idx: negative group index {int(g_idx.min())}")
    if not all_finite(scales):
        raise CheckpointError(f"{name}.scales: contains NaN or inf; the checkpoint is corrupt")
    try:
        if qweight.is_meta:  # read_layer(with_codes=False): shape only, see codes_placeholder
            codes = codes_placeholder(out_features, in_features)
        else:
            codes = unpack_codes(qweight, bits, dim=0, n_codes=in_features).T.contiguous()
        zeros = decode_zeros(qzeros, bits, out_features, config.checkpoint_format).to(torch.float64)
    except FormatLimitError as exc:
        raise CheckpointError(f"{name}: packed tensors do not match {bits}-bit, {in_features}x{out_features}: {exc}") from exc
    if zeros.shape[0] != n_groups:
        raise CheckpointError(f"{name}.qzeros: {zeros.shape[0]} rows, expected {n_groups} groups")
    bias = tensors.get("bias")
    return QuantizedLinear(
        name=name, bits=bits, group_size=group_size, codes=codes,
        scales=scales.to(torch.float32), zeros=zeros, g_idx=g_idx,
        bias=None if bias is None else bias.to(torch.float32),
    )


def codes_placeholder(out_features: int, in_features: int) -> torch.Tensor:
    """A zero-stride uint8 ``[out, in]`` stand-in for codes that were not read (no memory).

    Records read with ``with_codes=False`` carry it: everything but the codes (shapes, scales,
    zeros, g_idx) is real, so the zero-point fold works on them; the codes stay packed in the file.
    """
    return torch.zeros((1, 1), dtype=torch.uint8).expand(out_features, in_features)


def decode_zeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """True zero-points int64 ``[G, out]`` from packed ``qzeros``, as the runtimes compute them.

    v1 ("gptq") adds 1 the way GPTQModel's kernels do: for 2/4/8 bits one add of ``0x...0101`` to
    each packed word, whose carry out of a field that stored -1 (all ones) bumps the neighbouring
    field; for 3 bits field by field, modulo ``2**b``. So a v1 checkpoint holding a true zero of 0
    decodes here to what the runtimes compute, wrong values included; writers never produce one.
    """
    if checkpoint_format == "gptq_v2":
        return unpack_codes(qzeros, bits, dim=1, n_codes=out_features).to(torch.int64)
    if bits == 3:
        stored = unpack_codes(qzeros, bits, dim=1, n_codes=out_features).to(torch.int64)
        return (stored + 1) % (1 << bits)
    ones = 0
    for j in range(32 // bits):
        ones |= 1 << (bits * j)
    words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF  # carry out of the word is lost
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return unpack_codes(words, bits, dim=1, n_codes=out_features).to(torch.int64)


# --------------------------------------------------------------------------------------- reader


class GPTQCheckpoint:
    """A streaming reader of an AutoGPTQ checkpoint directory.

    Opening reads only JSON and safetensors headers; tensors are read one layer at a time.

    Example::

        ckpt = GPTQCheckpoint("base_dir")
        for name in ckpt.quantized_modules:
            layer = ckpt.read_layer(name)   # QuantizedLinear
    """

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory (expected an AutoGPTQ checkpoint directory)")
        config_path = self.directory / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{self.directory} has no {CONFIG_FILE}; it is not a Hugging Face checkpoint")
        self.model_config = read_json(config_path, CheckpointError)
        qcfg = self.model_config.get("quantization_config")
        qpath = config_path
        if qcfg is None and (self.directory / QUANTIZE_CONFIG_FILE).is_file():
            qpath = self.directory / QUANTIZE_CONFIG_FILE
            qcfg = read_json(qpath, CheckpointError)
        if not isinstance(qcfg, dict):
            raise CheckpointError(
                f"{self.directory} is not a GPTQ checkpoint: {CONFIG_FILE} has no quantization_config "
                f"and there is no {QUANTIZE_CONFIG_FILE} (quantize it with `qalora-export quantize`)"
            )
        self.config = parse_gptq_config(qcfg, qpath)
        self.tensor_files = _index_tensors(self.directory)
        modules = sorted({k[: -len(".qweight")] for k in self.tensor_files if k.endswith(".qweight")})
        if not modules:
            raise CheckpointError(f"{self.directory}: no *.qweight tensors; the weights are not GPTQ-quantized")
        self.quantized_modules: list[str] = modules
        self._handles: dict[Path, object] = {}
        self._fingerprints: dict[int, str] = {}
        self._raw_headers: dict[Path, tuple[dict, int]] = {}

    # -- tensors
    def _handle(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
            self._handles[path] = handle
        return handle

    def read_tensor(self, key: str, rows: Optional[slice] = None) -> torch.Tensor:
        """One tensor by its full name; with ``rows``, only that slice of its first axis (a row
        block of an embedding table, without reading the rest)."""
        path = self.tensor_files.get(key)
        if path is None:
            raise CheckpointError(f"{self.directory}: tensor {key} is missing")
        try:
            # A fresh handle per read: safetensors maps the whole file, and every page a read
            # touches counts in this process's RSS until the mapping goes, so a cached handle would
            # grow RSS to the size of the checkpoint. Closing it after one tensor keeps one tensor.
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: tensor {key} cannot be read ({exc}); the file is truncated or corrupt") from exc

    def tensor_spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of one tensor, from its file's header (no data read)."""
        path = self.tensor_files.get(key)
        if path is None:
            raise CheckpointError(f"{self.directory}: tensor {key} is missing")
        try:
            view = self._handle(path).get_slice(key)
            dtype = _SAFETENSORS_DTYPES[view.get_dtype()]
            return dtype, tuple(int(d) for d in view.get_shape())
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: tensor {key} has an unreadable header entry ({exc})") from exc

    def stored_tensor(self, key: str) -> Optional[StoredTensor]:
        """Where the bytes of tensor ``key`` lie in its file, for copying them without reading
        (``safetensors_stream.copy_stored_bytes``); None when the header does not say plainly
        (then read the tensor, whose reader names any problem)."""
        path = self.tensor_files.get(key)
        if path is None:
            return None
        try:
            header, data_start = self._raw_headers[path]
        except KeyError:
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header, data_start = json.loads(f.read(length)), 8 + length
            except (OSError, ValueError, struct.error):
                return None
            self._raw_headers[path] = header, data_start
        entry = header.get(key) if isinstance(header, dict) else None
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            dtype, shape = self.tensor_spec(key)
        except (TypeError, KeyError, ValueError, CheckpointError):
            return None
        stored = StoredTensor(path, data_start + begin, dtype, shape)
        return stored if end - begin == stored.nbytes else None

    def read_layer(self, name: str, with_codes: bool = True) -> QuantizedLinear:
        """Decode the quantized linear ``name`` (without suffix) into a record.

        ``with_codes=False`` reads everything but ``qweight`` (its shape comes from the header) and
        gives the record a :func:`codes_placeholder`: enough for the zero-point fold, which never
        changes codes, at a fraction of the I/O and none of the unpacking.
        """
        tensors = {s: self.read_tensor(f"{name}.{s}") for s in QUANT_SUFFIXES + ("bias",)
                   if f"{name}.{s}" in self.tensor_files and (with_codes or s != "qweight")}
        if not with_codes:
            dtype, shape = self.tensor_spec(f"{name}.qweight")
            tensors["qweight"] = torch.empty(shape, dtype=dtype, device="meta")
        return decode_layer(name, tensors, self.config)

    def iter_layers(self) -> Iterator[QuantizedLinear]:
        for name in self.quantized_modules:
            yield self.read_layer(name)

    def other_tensor_names(self) -> list[str]:
        """Names of the tensors that are not part of a quantized linear (norms, embeddings, ...)."""
        quant = {f"{m}.{s}" for m in self.quantized_modules for s in QUANT_SUFFIXES + ("bias",)}
        return sorted(k for k in self.tensor_files if k not in quant)

    def fingerprint(self, version: int = FINGERPRINT_VERSION, cancel: Optional[threading.Event] = None) -> str:
        """sha256 over what decoding depends on: the config and every quantized tensor, in name order.

        Independent of sharding and file layout; identifies the base an adapter was trained on.
        Version 2 (``sha256:v2:<hex>``, written by this release) hashes bits, group size,
        checkpoint format and each tensor's name, dtype, shape and bytes, so a base relabelled
        (v1/v2 zeros, scales re-declared as bfloat16, a reshaped tensor) no longer matches.
        Version 1 (``sha256:<hex>``, older adapters) hashes bits, group size, names and bytes only;
        :meth:`matches_fingerprint` still checks such records, with that weaker guarantee.
        Reads every quantized tensor once (plain reads of its bytes in the file, a buffer of
        :data:`FINGERPRINT_CHUNK` at a time); the result is kept for later calls. ``cancel``: an event
        that stops the read (CheckpointError) when set, for a check run in the background.
        """
        if version not in (1, 2):
            raise ValueError(f"fingerprint version {version} is not 1 or 2")
        if version in self._fingerprints:
            return self._fingerprints[version]
        h = hashlib.sha256()
        if version == 1:
            h.update(json.dumps([self.config.bits, self.config.group_size], sort_keys=True).encode())
        else:
            h.update(json.dumps([self.config.bits, self.config.group_size, self.config.checkpoint_format]).encode())
        buffer = bytearray(FINGERPRINT_CHUNK)
        for name in self.quantized_modules:
            for s in QUANT_SUFFIXES:
                key = f"{name}.{s}"
                if key not in self.tensor_files:
                    continue
                if cancel is not None and cancel.is_set():
                    raise CheckpointError(f"{self.directory}: fingerprint cancelled")
                stored = self.stored_tensor(key)
                h.update(key.encode())
                if stored is not None and stored.path.stat().st_size >= stored.offset + stored.nbytes:
                    # the tensor's bytes as they lie in the file (safetensors is little-endian, as
                    # the tensor's bytes are here): plain reads into one buffer, no mapping, no copy
                    if version == 2:
                        h.update(json.dumps([str(stored.dtype), list(stored.shape)]).encode())
                    _hash_file_range(h, stored.path, stored.offset, stored.nbytes, buffer)
                    continue
                t = self.read_tensor(key).contiguous()  # names any problem with the file
                if version == 2:
                    h.update(json.dumps([str(t.dtype), list(t.shape)]).encode())
                h.update(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")
                del t
        prefix = "sha256:" if version == 1 else "sha256:v2:"
        self._fingerprints[version] = prefix + h.hexdigest()
        return self._fingerprints[version]

    def matches_fingerprint(self, recorded: str, cancel: Optional[threading.Event] = None) -> bool:
        """Whether ``recorded`` (an adapter's ``base_fingerprint``, any version) is this base's."""
        version = 2 if recorded.startswith("sha256:v2:") else 1
        return self.fingerprint(version, cancel) == recorded

    def close(self) -> None:
        self._handles.clear()


_SAFETENSORS_DTYPES = {"I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "I32": torch.int32,
                       "BF16": torch.bfloat16, "F16": torch.float16, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _index_tensors(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it, checking the index."""
    index_path = directory / INDEX_FILE
    single = directory / SINGLE_WEIGHTS_FILE
    if index_path.is_file():
        index = read_json(index_path, CheckpointError)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: weight_map is missing or empty")
        files: dict[str, Path] = {}
        headers: dict[str, set[str]] = {}
        for key, fname in weight_map.items():
            if not isinstance(fname, str) or not fname or Path(fname).name != fname or fname in (".", ".."):
                raise CheckpointError(
                    f"{index_path}: {key} maps to {fname!r}, which is not a file name inside {directory}"
                )
            path = directory / fname
            if str(fname) not in headers:
                headers[str(fname)] = set(_header_keys(path))
            if key not in headers[str(fname)]:
                raise CheckpointError(f"{index_path} says {key} is in {fname}, but that shard does not hold it")
            files[key] = path
        return files
    if single.is_file():
        return {k: single for k in _header_keys(single)}
    shards = sorted(directory.glob("*.safetensors"))
    if len(shards) == 1:
        return {k: shards[0] for k in _header_keys(shards[0])}
    raise CheckpointError(
        f"{directory} has no {SINGLE_WEIGHTS_FILE} and no {INDEX_FILE}"
        + (f" ({len(shards)} .safetensors files without an index)" if shards else "")
    )


def _header_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return [k for k in f.keys()]
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it is truncated or corrupt") from exc


def check_writable_zeros(layer: QuantizedLinear, checkpoint_format: str) -> None:
    """Raise :class:`ConfigError` if integral zeros fall outside the format's range (pre-flight)."""
    lo, hi = zero_range(layer.bits, checkpoint_format)
    z = layer.zeros
    if z.numel() and (float(z.min()) < lo or float(z.max()) > hi):
        raise ConfigError(f"{layer.name}: zero-points outside [{lo}, {hi}] for {checkpoint_format}")


# --------------------------------------------------------------------------------------- writer

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SHARD_METADATA = {"format": "pt"}


class CheckpointWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes`` (then an index).

    Each added tensor's bytes go straight to a spool file; when a shard is full, its safetensors
    file is written from the spool (header first, then the tensors in ``save_file``'s order, one
    at a time) and the spool is deleted. Memory stays at one tensor, whatever the shard size; the
    files are byte-identical to ``safetensors.torch.save_file``'s. When every tensor's dtype and
    shape are known up front, :func:`write_checkpoint` avoids the spool's second copy.

    States: open -> (add_tensor)* -> finish. Call it inside ``atomic_output_dir`` so that a
    failure leaves no partial checkpoint.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[TensorSpec] = []
        self._pending_bytes = 0
        self._spool = None  # open file of the pending shard's tensor bytes, in arrival order
        self._spool_offsets: dict[str, int] = {}
        self._shards: list[list[TensorSpec]] = []
        self._finished = False
        self.total_bytes = 0

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if self._finished:
            raise RuntimeError("CheckpointWriter.add_tensor called after finish()")
        spec = TensorSpec.of(name, tensor)
        if self._pending and self._pending_bytes + spec.nbytes > self.max_shard_bytes:
            self._flush()
        if self._spool is None:
            self._spool = open(self.directory / f".spool-{len(self._shards) + 1:05d}", "w+b")
        self._spool_offsets[name] = self._spool.tell()
        write_tensor_bytes(self._spool, tensor)
        self._pending.append(spec)
        self._pending_bytes += spec.nbytes
        self.total_bytes += spec.nbytes

    def _from_spool(self, name: str) -> torch.Tensor:
        spec = next(s for s in self._pending if s.name == name)
        self._spool.seek(self._spool_offsets[name])
        data = bytearray(self._spool.read(spec.nbytes))
        if not data:
            return torch.empty(spec.shape, dtype=spec.dtype)
        return torch.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)

    def _flush(self) -> None:
        index = len(self._shards) + 1
        if self._spool is not None:
            self._spool.flush()
        write_file(self.directory / f".shard-{index:05d}.safetensors", self._pending, self._from_spool,
                   metadata=SHARD_METADATA)
        if self._spool is not None:
            self._spool.close()
            Path(self._spool.name).unlink()
        self._spool, self._spool_offsets = None, {}
        self._shards.append(self._pending)
        self._pending = []
        self._pending_bytes = 0

    def finish(self) -> list[str]:
        """Write the last shard and, for several shards, the index; return the file names."""
        if self._finished:
            raise RuntimeError("CheckpointWriter.finish called twice; the checkpoint is already written")
        if self._pending or not self._shards:
            self._flush()
        self._finished = True
        names = shard_file_names(len(self._shards), SINGLE_WEIGHTS_FILE)
        for i, fname in enumerate(names, start=1):
            (self.directory / f".shard-{i:05d}.safetensors").rename(self.directory / fname)
        if len(names) > 1:
            write_index(self.directory / INDEX_FILE, self._shards, names, self.total_bytes)
        return names


def write_checkpoint(directory: Path, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor],
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[list[str], int]:
    """Write the tensors ``specs`` (in this order) as shards of ``directory``, streaming.

    ``produce(name)`` is asked for each tensor when its shard reaches it (shards in order; inside
    a shard in safetensors' order), so one tensor is in memory at a time and no byte is written
    twice. Same files as :class:`CheckpointWriter` given the same tensors in the same order.

    Returns the weight file names and the total tensor bytes.
    """
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards), SINGLE_WEIGHTS_FILE)
    total = 0
    for shard, fname in zip(shards, names):
        total += write_file(Path(directory) / fname, shard, produce, metadata=SHARD_METADATA)
    if len(names) > 1:
        write_index(Path(directory) / INDEX_FILE, shards, names, total)
    return names, total


def write_configs(directory: Path, model_config: dict, config: GPTQConfig, extra_meta: Optional[dict] = None) -> None:
    """``config.json`` with ``quantization_config`` and ``quantize_config.json``, as loaders expect."""
    qcfg = config.to_json()
    if extra_meta:
        qcfg["meta"] = {**qcfg["meta"], **extra_meta}
    full = {k: v for k, v in model_config.items() if k != "quantization_config"}
    full["quantization_config"] = qcfg
    full.setdefault("torch_dtype", "float16")
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    (Path(directory) / QUANTIZE_CONFIG_FILE).write_text(json.dumps(qcfg, indent=2) + "\n")
