"""Writing safetensors files one tensor at a time, byte-identical to ``safetensors.torch.save_file``.

``save_file`` needs every tensor of a file in memory at once (it sorts them, then serializes), so
a 2 GB shard costs 2 GB of RAM. Here the header is computed from names, dtypes and shapes alone
(:class:`TensorSpec`), written first, and each tensor's bytes are then asked for (``produce``)
and written in the file's order, so one tensor is in memory at a time.

File layout (safetensors 0.x, as ``save_file`` writes it):

- 8 bytes: little-endian u64 ``N``, the header length;
- ``N`` bytes: compact JSON ``{"__metadata__": {...}, "<name>": {"dtype": "F16", "shape": [...],
  "data_offsets": [begin, end]}, ...}``, padded with spaces to a multiple of 8;
- the tensors' bytes back to back, in the header's order: by dtype (:data:`DTYPE_ORDER`, widest
  first, so every tensor is aligned to its element size), then by name.

Sharding (:func:`plan_shards`) follows the rule of :class:`~qalora_export.checkpoint.gptq_writer.CheckpointWriter`: tensors in
the order given, a new shard when the next tensor would push a non-empty shard over the limit.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

# safetensors' dtype names, in the order save_file lays tensors out (its Dtype enum, descending).
DTYPE_ORDER: tuple[tuple[torch.dtype, str], ...] = (
    (torch.int64, "I64"), (torch.float64, "F64"), (torch.float32, "F32"),
    (torch.uint32, "U32"),  # MLX's packed quantized weights (formats/mlx)
    (torch.int32, "I32"), (torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.int16, "I16"), (torch.int8, "I8"),
    (torch.uint8, "U8"), (torch.bool, "BOOL"),
)
_DTYPE_NAME = {dt: name for dt, name in DTYPE_ORDER}
_DTYPE_RANK = {dt: i for i, (dt, _) in enumerate(DTYPE_ORDER)}
HEADER_ALIGN = 8
COPY_CHUNK = 64 << 20  # bytes per write of a large tensor


@dataclass(frozen=True)
class StoredTensor:
    """A tensor whose bytes already lie in a file (a safetensors input): ``produce`` may hand
    this instead of the tensor, and its bytes are copied file to file by the kernel
    (``os.copy_file_range``, as ``cp`` does), never read into this process."""

    path: Path
    offset: int  # of the first byte in the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return TensorSpec("", self.dtype, self.shape).nbytes


@dataclass(frozen=True)
class TensorSpec:
    """What the header needs to know of one tensor: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * torch.empty((), dtype=self.dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorSpec":
        return cls(name, tensor.dtype, tuple(int(d) for d in tensor.shape))


def file_order(specs: Sequence[TensorSpec]) -> list[TensorSpec]:
    """The order ``save_file`` stores tensors in: by dtype (widest first), then by name."""
    for s in specs:
        if s.dtype not in _DTYPE_RANK:
            raise ValueError(f"{s.name}: dtype {s.dtype} cannot be written to safetensors here")
    return sorted(specs, key=lambda s: (_DTYPE_RANK[s.dtype], s.name))


def header_bytes(specs: Sequence[TensorSpec], metadata: Optional[dict[str, str]] = None) -> bytes:
    """The 8-byte length and the padded JSON header of a file holding ``specs`` (any order)."""
    entries: dict = {}
    if metadata is not None:
        entries["__metadata__"] = metadata
    offset = 0
    for s in file_order(specs):
        end = offset + s.nbytes
        entries[s.name] = {"dtype": _DTYPE_NAME[s.dtype], "shape": list(s.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * ((-len(text)) % HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def write_file(path: Path, specs: Sequence[TensorSpec],
               produce: Callable[[str], Union[torch.Tensor, StoredTensor]],
               metadata: Optional[dict[str, str]] = None) -> int:
    """Write a safetensors file, asking ``produce(name)`` for each tensor in the file's order.

    Each produced tensor (or :class:`StoredTensor`, copied from its file) must match its spec
    (dtype and shape); it is released once written. Returns the number of tensor bytes written.
    """
    total = 0
    with open(path, "wb") as f:
        f.write(header_bytes(specs, metadata))
        for s in file_order(specs):
            tensor = produce(s.name)
            if tensor.dtype != s.dtype or tuple(tensor.shape) != s.shape:
                raise ValueError(f"{s.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"planned {s.dtype} {s.shape}")
            total += copy_stored_bytes(f, tensor) if isinstance(tensor, StoredTensor) else write_tensor_bytes(f, tensor)
            del tensor
    return total


def copy_stored_bytes(f, stored: StoredTensor) -> int:
    """Append ``stored``'s bytes to the open file ``f``: ``os.copy_file_range`` (in the kernel), or
    reads and writes of :data:`COPY_CHUNK` where the platform or file system has no such copy."""
    f.flush()
    start, length = f.tell(), stored.nbytes
    done = 0
    with open(stored.path, "rb") as src:
        copy = getattr(os, "copy_file_range", None)
        while copy is not None and done < length:
            try:
                n = copy(src.fileno(), f.fileno(), length - done, stored.offset + done, start + done)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY or done:
                    raise
                copy = None  # e.g. across file systems on older kernels: copy through this process
                break
            if n == 0:
                raise OSError(errno.EIO, f"{stored.path} ended at byte {stored.offset + done} while copying a tensor")
            done += n
        src.seek(stored.offset + done)
        while done < length:
            chunk = src.read(min(COPY_CHUNK, length - done))
            if not chunk:
                raise OSError(errno.EIO, f"{stored.path} ended at byte {stored.offset + done} while copying a tensor")
            os.pwrite(f.fileno(), chunk, start + done)
            done += len(chunk)
    f.seek(start + length)
    return length


# errnos of copy_file_range meaning "not here": fall back to copying through this process.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def write_tensor_bytes(f, tensor: torch.Tensor) -> int:
    t = tensor.detach().cpu().contiguous()
    if t.numel() == 0:
        return 0
    data = memoryview(t.view(torch.uint8).reshape(-1).numpy())
    for start in range(0, len(data), COPY_CHUNK):
        f.write(data[start:start + COPY_CHUNK])
    return len(data)


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` (in order) into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_file_names(n_shards: int, single_name: str) -> list[str]:
    """Hugging Face names: ``single_name`` for one shard, ``model-00001-of-0000N.safetensors`` else."""
    if n_shards == 1:
        return [single_name]
    return [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]


def write_index(path: Path, shards: Sequence[Sequence[TensorSpec]], names: Sequence[str], total_bytes: int) -> None:
    """``model.safetensors.index.json``: total size and the shard of every tensor, sorted by name."""
    weight_map = {s.name: fname for shard, fname in zip(shards, names) for s in shard}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    Path(path).write_text(json.dumps(index, indent=2) + "\n")

