"""A streaming reader of AutoGPTQ checkpoint directories: the project's input format (quantized bases).

The layout is specified once, beside it: ``gptq_config`` (files, zero convention, the quantization
config), ``gptq_codec`` (tensors of one layer <-> :class:`QuantizedLinear`), ``gptq_writer`` (sharded
safetensors out). The output format ``qalora_export.formats.gptq`` writes with the same codec.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open

from qalora_export.checkpoint.gptq_codec import decode_layer
from qalora_export.checkpoint.gptq_config import (
    CONFIG_FILE,
    INDEX_FILE,
    QUANT_SUFFIXES,
    QUANTIZE_CONFIG_FILE,
    SINGLE_WEIGHTS_FILE,
    parse_gptq_config,
)
from qalora_export.core.record import QuantizedLinear
from qalora_export.errors import CheckpointError
from qalora_export.storage.atomic import read_json
from qalora_export.storage.safetensors_stream import StoredTensor

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

# GPTQCheckpoint.fingerprint: 2 also hashes checkpoint_format and each tensor's dtype and shape.
FINGERPRINT_VERSION = 2

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
