"""The GGUF container without gguf-py's reader: header scans for tensor types and for every metadata
value (fast, no tensor data touched), a memory-mapped view of the tensors, and the names of split
files (``<name>-00001-of-0000N.gguf``, llama.cpp's gguf-split).
Constants come from gguf-py where it defines them."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys
from gguf.constants import GGUF_MAGIC as GGUF_MAGIC_U32

if TYPE_CHECKING:
    import numpy as np

# ------------------------------------------------------------------------------ container header

# GGUF v3 header: magic, version u32, tensor count u64, kv count u64; then kv pairs (key string,
# value type u32, value) and tensor infos (name string, n_dims u32, dims u64[n_dims], ggml type u32,
# offset u64). Strings are u64 length + utf-8 bytes; arrays are element type u32, count u64, elements.
GGUF_MAGIC = struct.pack("<I", GGUF_MAGIC_U32)  # b"GGUF"
# GGUFValueType -> bytes of one value (gguf-py's enum; strings and arrays are walked)
SCALAR_VALUE_BYTES = {int(t): struct.calcsize("<" + code) for t, code in (
    (GGUFValueType.UINT8, "B"), (GGUFValueType.INT8, "b"), (GGUFValueType.UINT16, "H"), (GGUFValueType.INT16, "h"),
    (GGUFValueType.UINT32, "I"), (GGUFValueType.INT32, "i"), (GGUFValueType.FLOAT32, "f"), (GGUFValueType.BOOL, "?"),
    (GGUFValueType.UINT64, "Q"), (GGUFValueType.INT64, "q"), (GGUFValueType.FLOAT64, "d"))}
VALUE_STRING, VALUE_ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)


def scan_tensor_types(path) -> dict[str, int]:
    """Tensor name -> ggml type id, from a GGUF header alone (skips metadata values without decoding).

    gguf-py's ``GGUFReader`` decodes every metadata field, which for a 49k-token vocabulary takes
    seconds; verify only needs the tensor types.
    """
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _scan(buf, path)


def _scan(buf, path) -> dict[str, int]:
    import struct

    if buf[:4] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24

    def u32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from("<I", buf, pos - 4)[0]

    def u64() -> int:
        nonlocal pos
        pos += 8
        return struct.unpack_from("<Q", buf, pos - 8)[0]

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == VALUE_STRING:
            length = u64()  # (read before `pos +=` evaluates pos)
            pos += length
        elif vtype == VALUE_ARRAY:
            etype, count = u32(), u64()
            if etype in SCALAR_VALUE_BYTES:
                pos += SCALAR_VALUE_BYTES[etype] * count
            else:
                for _ in range(count):
                    skip_value(etype)
        else:
            pos += SCALAR_VALUE_BYTES[vtype]

    for _ in range(n_kv):
        skip_value(VALUE_STRING)  # key
        skip_value(u32())
    types = {}
    for _ in range(n_tensors):
        n = u64()
        name = bytes(buf[pos:pos + n]).decode("utf-8")
        pos += n
        n_dims = u32()
        pos += 8 * n_dims
        types[name] = u32()
        pos += 8  # offset
    if pos > len(buf):  # a count or length that runs past the end: only a final unpack would notice
        raise ValueError(f"{path}: the GGUF header runs past the end of the file ({pos} > {len(buf)} bytes)")
    return types


_SCALAR_CODES = {int(GGUFValueType.UINT8): "B", int(GGUFValueType.INT8): "b", int(GGUFValueType.UINT16): "H",
                 int(GGUFValueType.INT16): "h", int(GGUFValueType.UINT32): "I", int(GGUFValueType.INT32): "i",
                 int(GGUFValueType.FLOAT32): "f", int(GGUFValueType.BOOL): "?", int(GGUFValueType.UINT64): "Q",
                 int(GGUFValueType.INT64): "q", int(GGUFValueType.FLOAT64): "d"}


def _parse_header(buf, path) -> tuple[dict, list[tuple[str, int, tuple[int, ...], int]], int]:
    """(metadata ``{key: (type, value)}``, tensor infos ``(name, ggml type, dims, offset)``, header end)."""
    import numpy as np

    if buf[:4] != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24

    def take(code: str):
        nonlocal pos
        value = struct.unpack_from("<" + code, buf, pos)[0]
        pos += struct.calcsize("<" + code)
        return value

    def string() -> str:
        nonlocal pos
        length = take("Q")
        if pos + length > len(buf):
            raise ValueError(f"{path}: a string runs past the end of the file")
        text = bytes(buf[pos:pos + length]).decode("utf-8")
        pos += length
        return text

    def value(vtype: int):
        nonlocal pos
        if vtype == VALUE_STRING:
            return "STRING", string()
        if vtype != VALUE_ARRAY:
            return GGUFValueType(vtype).name, take(_SCALAR_CODES[vtype])
        etype, count = take("I"), take("Q")
        name = f"ARRAY[{GGUFValueType(etype).name}]"
        if etype in _SCALAR_CODES:
            dtype = np.dtype("<" + _SCALAR_CODES[etype])
            if pos + dtype.itemsize * count > len(buf):
                raise ValueError(f"{path}: an array runs past the end of the file")
            items = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
            pos += dtype.itemsize * count
            return name, items
        if count > len(buf) - pos:  # every element takes at least one byte
            raise ValueError(f"{path}: an array runs past the end of the file")
        return name, [value(etype)[1] for _ in range(count)]

    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = tuple(take("Q") for _ in range(take("I")))
        infos.append((name, take("I"), dims, take("Q")))
    return metadata, infos, pos


def read_header(path) -> tuple[dict[str, tuple[str, object]], dict[str, tuple[int, tuple[int, ...]]]]:
    """Every metadata value and tensor info of a GGUF file, decoded from its header alone.

    gguf-py's ``GGUFReader`` makes numpy views of every part of every array element, which for a
    150k-token vocabulary (tokens and merges) takes over ten seconds; this walks the same bytes with
    ``struct``/``numpy`` in well under one. Values are those of gguf-py's ``ReaderField.contents()``
    (strings decoded as UTF-8, arrays as lists of Python values).

    Returns:
        (``{key: (type, value)}`` with ``type`` gguf-py's value type name, ``"ARRAY[<element type>]"`` for
        arrays; ``{tensor name: (ggml type id, dims)}`` with ``dims`` in ggml order, innermost first).
    """
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        metadata, infos, _ = _parse_header(buf, path)
    return metadata, {name: (ggml_type, dims) for name, ggml_type, dims, _ in infos}


@dataclass
class TensorView:
    """One tensor of a :class:`GGUFFile`, as gguf-py's ``ReaderTensor`` describes it: ``shape`` in ggml
    order; ``data`` a read-only view of the file in numpy order (floats as their dtype, block types
    as uint8 rows of blocks)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data_offset: int
    n_bytes: int
    data: "np.ndarray"


class GGUFFile:
    """A GGUF file opened from :func:`read_header`'s decoding and a read-only memory map: ``fields``
    (key -> value), ``field_types`` (key -> type name), ``tensors`` (:class:`TensorView`), ``data``
    (the ``numpy.memmap`` of the whole file). What read.py and lora.py took from gguf-py's reader, in a
    fraction of its time on large vocabularies."""

    _FLOAT_TYPES = {GGMLQuantizationType.F32: "<f4", GGMLQuantizationType.F16: "<f2",
                    GGMLQuantizationType.F64: "<f8", GGMLQuantizationType.I8: "<i1",
                    GGMLQuantizationType.I16: "<i2", GGMLQuantizationType.I32: "<i4",
                    GGMLQuantizationType.I64: "<i8"}

    def __init__(self, path):
        import numpy as np

        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        metadata, infos, end = _parse_header(self.data._mmap, path)
        self.fields = {key: value for key, (_, value) in metadata.items()}
        self.field_types = {key: kind for key, (kind, _) in metadata.items()}
        alignment = int(self.fields.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT))
        if alignment <= 0:
            raise ValueError(f"{path}: general.alignment {alignment} is not positive")
        start = -(-end // alignment) * alignment
        self.tensors = []
        for name, raw_type, dims, offset in infos:
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            n_elems = int(np.prod(dims, dtype=np.uint64)) if dims else 1
            n_bytes = n_elems * type_size // block
            at = start + offset
            if at + n_bytes > len(self.data):
                raise ValueError(f"{path}: tensor {name} runs past the end of the file")
            np_dims = tuple(reversed(dims))
            raw = self.data[at:at + n_bytes]
            if ggml_type in self._FLOAT_TYPES:
                array = raw.view(self._FLOAT_TYPES[ggml_type]).reshape(np_dims)
            else:
                if not np_dims or np_dims[-1] % block:
                    raise ValueError(f"{path}: tensor {name} rows of {np_dims[-1:]} values are not whole "
                                     f"{ggml_type.name} blocks of {block}")
                array = raw.reshape(*np_dims[:-1], np_dims[-1] // block * type_size)
            self.tensors.append(TensorView(name, ggml_type, dims, at, n_bytes, array))


# ------------------------------------------------------------------------------ split files

# A model split over several files, as llama.cpp's gguf-split writes and llama_model_load reads it:
# "<prefix>-00001-of-00003.gguf", ...; the first file holds the metadata, every file these keys
# (split.no counts from 0) and its own tensors.
KEY_SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO  # "split.no", uint16
KEY_SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT  # "split.count", uint16
KEY_SPLIT_TENSORS_COUNT = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT  # "split.tensors.count", int32, whole model
SPLIT_SUFFIX = "-{no:05d}-of-{count:05d}.gguf"
_FIRST_SPLIT = re.compile(r"^(.*)-00001-of-(\d{5})\.gguf$")


def split_paths(first: Path, count: Optional[int] = None) -> Optional[list[Path]]:
    """Every file of a split model from its first file's name (``count`` from there, unless
    given), or None when the name is not a first split file."""
    match = _FIRST_SPLIT.match(first.name)
    if match is None or (count is not None and int(match.group(2)) != count):
        return None
    count = int(match.group(2))
    return [first.with_name(match.group(1) + SPLIT_SUFFIX.format(no=i, count=count)) for i in range(1, count + 1)]
