"""Reading an ONNX artifact back with this project's own MatMulNBits decoder (verify's weight level), a
row block at a time; the merge record in ``metadata_props``; ``inspect``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from qalora_export.core.record import QuantizedLinear
from qalora_export.core.weight_rows import WeightRows
from qalora_export.errors import CheckpointError
from qalora_export.formats.onnx import spec as spec
from qalora_export.formats.onnx.pack import PACKED_NODES_KEY
from qalora_export.formats.onnx.head import HEAD_NODE
from qalora_export.formats.onnx.spec import MERGE_METADATA_KEY, MODEL_FILE

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
    if meta.get("zero_points") == "uint8":  # "auto" and "split" hold the fold (float64 -> fp32 residual)
        zeros = torch.round(zeros)
    else:
        zeros = zeros.to(torch.float16 if meta.get("dtype") == "fp16" else torch.float32).to(torch.float64)
    return layer.with_zeros(zeros)


def declared_weight(model, name: str, meta: dict) -> torch.Tensor:
    """:func:`declared_layer` dequantized: float64 ``[out, in]``."""
    return declared_layer(model, name, meta).dequantize(torch.float64)


def read_weights(out_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode every MatMulNBits node of ``out_dir/model.onnx`` into (module name, float64 ``[out, in]``).

    Reads ``B``, scales and zero-points with the codec of ``spec``, undoes an
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
    packed = _packed_nodes(proto, out_dir)

    def value(name: str, node_name: str) -> np.ndarray:
        if name not in inits:
            raise CheckpointError(f"{out_dir}: input {name} of MatMulNBits node {node_name} is not an initializer")
        return _initializer_array(inits[name], out_dir)

    for node in proto.graph.node:
        if node.op_type != spec.OP_TYPE or node.domain != spec.OP_DOMAIN:
            continue
        if node.name == HEAD_NODE:  # a requantized lm head (head.py): no folded layer; the runtime level checks it
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
            if f"{residual_name}_v" in inits:  # low rank (lowrank.py): R = U @ V
                v = _initializer_array(inits[f"{residual_name}_v"], out_dir).astype(np.float64)
                if r.ndim != 2 or v.ndim != 2 or v.shape != (r.shape[1], n):
                    raise CheckpointError(f"{out_dir}: {residual_name} {list(r.shape)} and its _v {list(v.shape)} are "
                                          f"not [G, k] and [k, {n}]; the model file is corrupt")
                r = r @ v
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
        rows = _node_rows(out_dir, node.name, k, bits, block_size, b, scales, zeros, r, perm)
        members = packed.get(node.name, [[node.name, n]])
        if sum(size for _, size in members) != n:
            raise CheckpointError(f"{out_dir}: {PACKED_NODES_KEY} gives {node.name} {members}, whose rows do not add "
                                  f"up to its N={n}; the model file is corrupt")
        start = 0
        for module, size in members:  # a packed node (pack.py): each module is a run of its rows
            yield module, WeightRows((size, k), _offset_rows(rows, start))
            start += size


def _packed_nodes(proto, out_dir: Path) -> dict[str, list]:
    """``{node name: [[module, rows], ...]}`` of the packed nodes (``pack.py``); empty if none."""
    entry = next((e.value for e in proto.metadata_props if e.key == PACKED_NODES_KEY), None)
    if entry is None:
        return {}
    try:
        packed = json.loads(entry)
        ok = isinstance(packed, dict) and all(
            isinstance(members, list) and all(isinstance(m, list) and len(m) == 2 and isinstance(m[0], str)
                                              and isinstance(m[1], int) and m[1] > 0 for m in members)
            for members in packed.values())
    except (ValueError, RecursionError):
        ok = False
    if not ok:
        raise CheckpointError(f"{out_dir}: metadata {PACKED_NODES_KEY} is not a JSON object of "
                              f"[[module, rows], ...] lists; the model file is corrupt")
    return packed


def _offset_rows(decode, offset: int):
    """``decode`` (rows of a whole node) shifted to start at row ``offset``."""
    return lambda start, stop: decode(offset + start, offset + stop)


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


def inspect(path: Path) -> dict:
    """``inspect`` of an ONNX directory: nodes, MatMulNBits attributes, inputs and outputs."""
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {}
    if nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {"kind": "onnx", "path": str(path), "bytes": size, "nodes": len(model.graph.node),
            "matmulnbits": len(nbits), "matmulnbits_attributes": attrs,
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
            "op_counts": dict(ops.most_common(12))}
