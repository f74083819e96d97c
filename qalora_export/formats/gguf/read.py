"""Reading a GGUF back with this project's own Q4_1 reader (verify's weight level), a row block at a
time; split files are followed; ``inspect`` of a file.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from qalora_export.core.weight_rows import WeightRows
from qalora_export.errors import CheckpointError, ConfigError
from qalora_export.formats.gguf import container, spec

# --------------------------------------------------------------------------------- reading back


def _field(reader: "container.GGUFFile", key: str):
    return reader.fields.get(key)


def read_weights(path: Path | str) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode the projections of a GGUF file (ours or any llama.cpp LLaMA file) with this project's reader.

    Yields:
        (transformers module name, float64 ``[out, in]`` weight), q/k rows un-permuted back to the
        transformers order. Q4_1 is decoded by :func:`spec.dequantize_q4_1`; F32/F16 are widened.
    """
    for name, rows in read_weight_rows(path):
        yield name, rows.whole()


def read_weight_rows(path: Path | str) -> Iterator[tuple[str, WeightRows]]:
    """:func:`read_weights` with each weight decoded on demand, a row block at a time (verify).

    Every stored type keeps rows independent (Q4_1 and Q8_0 blocks run along a row), so a block of
    rows decodes alone; the layout (types, shapes, the q/k permutation) is checked on the first
    row before a tensor is yielded.
    """
    from gguf import GGMLQuantizationType

    reader = _open_reader(path)
    try:
        arch = _field(reader, "general.architecture")
        permute = any(a.gguf_arch == arch and a.permute_qk for a in spec.ARCHITECTURES.values())
        n_head = _field(reader, f"{arch}.attention.head_count")
        n_head_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
        split_no, split_count = _field(reader, container.KEY_SPLIT_NO), _field(reader, container.KEY_SPLIT_COUNT)
    except Exception as exc:  # corrupt metadata values (gguf-py raises several types)
        raise CheckpointError(f"{path}: GGUF metadata cannot be decoded ({type(exc).__name__}: {exc})") from exc
    readers = [reader] + [_open_reader(p) for p in _other_splits(Path(path), split_no, split_count)]
    for r, t in ((r, t) for r in readers for t in r.tensors):
        module = spec.hf_linear_name(t.name)
        if module is None and t.name == spec.OUTPUT_TENSOR and t.tensor_type == GGMLQuantizationType.Q4_1:
            module = "lm_head"
        if module is None:
            continue
        heads = spec.qk_heads(module, n_head, n_head_kv) if permute else None
        yield module, _tensor_rows(path, t, heads)
        _drop_pages(r, t)


def _drop_pages(reader, tensor) -> None:
    """Unmap the pages of ``tensor`` that decoding touched: the reader maps the whole file, and mapped pages
    count as the process's memory until unmapped, so a verify of a large GGUF would otherwise grow by the
    file's size (docs/scale.md). The mapping is read-only: dropped pages are read again if touched."""
    import mmap

    backing = getattr(reader.data, "_mmap", None)
    if backing is None or not hasattr(backing, "madvise"):
        return
    start = int(tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    stop = min(int(tensor.data_offset) + int(tensor.n_bytes), len(backing))
    if stop > start:
        try:
            backing.madvise(mmap.MADV_DONTNEED, start, stop - start)
        except (OSError, ValueError):  # memory accounting only; never fail a read over it
            pass


def _other_splits(first: Path, split_no, split_count) -> list[Path]:
    """The files after ``first`` of a split model (none for a single file)."""
    if not split_count or split_count == 1:
        return []
    if split_no != 0:
        raise CheckpointError(f"{first} is file {split_no + 1} of a model split in {split_count}; pass its first "
                              f"file (...{container.SPLIT_SUFFIX.format(no=1, count=split_count)})")
    paths = container.split_paths(first, split_count)
    if paths is None:
        raise CheckpointError(f"{first} is the first of {split_count} split files but is not named "
                              f"<prefix>{container.SPLIT_SUFFIX.format(no=1, count=split_count)}, so the others cannot be "
                              f"found; keep the names llama.cpp's gguf-split gives them")
    return paths[1:]


def _tensor_rows(path: Path | str, t, heads: Optional[int]) -> WeightRows:
    """A GGUF tensor's weight as row blocks; ``heads``: undo llama.cpp's q/k row permutation."""
    def decode(rows) -> np.ndarray:  # rows: a slice or an index array of stored rows
        try:
            return _dequantize_rows(data[rows], t.tensor_type)
        except Exception as exc:  # shape/type inconsistencies of a corrupt file (ValueError, TypeError, ...)
            raise _undecodable(path, t, exc) from exc

    try:
        data = np.asarray(t.data)
    except Exception as exc:
        raise _undecodable(path, t, exc) from exc
    first = decode(slice(0, 1) if data.ndim else ())  # the layout, checked on one row
    if first.ndim != 2:
        raise CheckpointError(f"{path}: tensor {t.name} is {first.ndim}-D, expected a 2-D weight; the file is corrupt")
    n_rows = data.shape[0]
    order = None
    if heads is not None:
        try:
            order = np.argsort(spec.qk_row_permutation(n_rows, heads))  # transformers row r = stored row order[r]
        except ValueError as exc:
            raise _undecodable(path, t, exc) from exc

    def rows(start: int, stop: int) -> torch.Tensor:
        w = decode(slice(start, stop) if order is None else order[start:stop])
        if not np.isfinite(w).all():
            raise CheckpointError(f"{path}: tensor {t.name} decodes to NaN or inf; the file is corrupt")
        return torch.from_numpy(np.ascontiguousarray(w))
    return WeightRows((n_rows, int(first.shape[1])), rows)


def _undecodable(path: Path | str, t, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: tensor {t.name} ({getattr(t.tensor_type, 'name', t.tensor_type)}, shape "
        f"{list(t.shape)}) cannot be decoded ({type(exc).__name__}: {exc}); the file is corrupt")


def _dequantize_rows(data: np.ndarray, tensor_type) -> np.ndarray:
    """float64 rows of stored GGUF rows ``data`` (Q4_1 by our reader, floats widened, others by gguf-py)."""
    from gguf import GGMLQuantizationType, quants

    if tensor_type == GGMLQuantizationType.Q4_1:
        return spec.dequantize_q4_1(data)
    if tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data.astype(np.float64)
    return quants.dequantize(data, tensor_type).astype(np.float64)


def _open_reader(path: Path | str) -> "container.GGUFFile":
    """The file's metadata and tensors (``container.GGUFFile``: gguf-py's reader takes seconds on a
    150k-token vocabulary), its many exception types for a damaged file turned into CheckpointError."""
    if not Path(path).is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    # Walk the header first with the bounded scan (a damaged count or length fails there, before
    # anything is decoded)
    read_file_types(path)
    try:
        return container.GGUFFile(path)
    except Exception as exc:  # ValueError, IndexError, KeyError, UnicodeDecodeError, struct errors, ...
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is truncated or corrupt, "
            f"export it again") from exc


def read_file_types(path: Path | str) -> tuple[str, str]:
    """(weights_dtype, embeddings) of a GGUF file, as ``export`` options that reproduce them."""
    from gguf import GGMLQuantizationType

    try:
        types = {k: GGMLQuantizationType(v).name.lower()
                 for p in container.split_paths(Path(path)) or [path] for k, v in container.scan_tensor_types(p).items()}
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file {exc.filename or path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # bad magic, truncated header, unknown value or tensor types
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is truncated or corrupt") from exc
    emb = types.get(spec.TOKEN_EMBD_TENSOR, "f16")
    weights = next((v for k, v in types.items() if spec.hf_linear_name(k)), "q4_1")
    return weights, emb


def inspect(path: Path) -> dict:
    """``inspect`` of a GGUF file: tensor types and the main metadata keys."""
    try:
        reader = container.GGUFFile(path)
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from exc
    types = Counter(t.tensor_type.name for t in reader.tensors)
    arch = reader.fields.get("general.architecture")
    keys = {}
    for name in ("general.architecture", "general.name", f"{arch}.block_count", f"{arch}.embedding_length",
                 f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv", "tokenizer.ggml.model"):
        if name in reader.fields:
            keys[name] = reader.fields[name]
    return {"kind": "gguf", "path": str(path), "bytes": path.stat().st_size, "tensors": len(reader.tensors),
            "tensor_types": dict(types), "metadata": keys}
