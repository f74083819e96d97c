"""The GGUF container without gguf-py's reader: a header scan for tensor types (fast, no tensor data
touched) and the names of split files (``<name>-00001-of-0000N.gguf``, llama.cpp's gguf-split).
Constants come from gguf-py where it defines them."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Optional

from gguf.constants import GGUF_MAGIC as GGUF_MAGIC_U32
from gguf.constants import GGUFValueType, Keys

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
