"""An ONNX decoder graph for the LLaMA family (LLaMA 2/3, Mistral, Qwen2, Qwen3, SmolLM2), KV cache included.

The graph follows onnxruntime-genai's conventions for its CPU decoder models so that
``onnxruntime_genai.Model(dir)`` runs it, and so that a plain onnxruntime loop can too:

inputs
    ``input_ids`` int64 ``[batch, seq]``; ``attention_mask`` int64 ``[batch, past + seq]``;
    ``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads, past, head_dim]`` (io dtype)
outputs
    ``logits`` float32 ``[batch, seq, vocab]``; ``present.{i}.key`` / ``.value``
    ``[batch, kv_heads, past + seq, head_dim]``

Per layer: ``SimplifiedLayerNormalization`` (RMSNorm), q/k/v projections, one
``com.microsoft.GroupQueryAttention`` (rotary applied inside from cos/sin caches, positions from
the attention mask: ``seqlens_k = sum(mask) - 1``, ``total_sequence_length = mask.shape[1]``),
o projection, residual add, RMSNorm, SwiGLU MLP, residual add (Qwen3: q and k RMS-normed per head
first; sliding-window layers: the op's ``local_window_size``). Then RMSNorm and the lm head (a
float ``MatMul``; with tied embeddings it reads the embedding table through a ``Transpose``, so the
file holds the table once).

Each projection is whatever the caller hands over as :class:`NBitsLinear` (one ``MatMulNBits``
node, preceded by a ``Gather`` on the activation's last axis for act-order column permutations)
or :class:`FloatLinear` (a ``MatMul`` on the transposed weight; used for the fp32 reference
export and for projections the base left unquantized). The builder never sees anything else of
the quantized weights.

Initializers are streamed to one external data file as they are created (64-byte aligned), so the
protobuf never holds weight bytes and models of any size stay under protobuf's 2 GB limit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qalora_export.core.weight_rows import row_ranges
from qalora_export.formats.onnx import spec as spec
from qalora_export.formats.onnx.decoder import decoder_config, rotary_caches
from qalora_export.formats.onnx.pack import GATE_UP, PACKED_NODES_KEY, QKV, pack_linears, packable
from qalora_export.storage.direct_io import DirectWriter

GQA_DOMAIN = "com.microsoft"
EXTERNAL_ALIGN = 64
INLINE_LIMIT = 1024  # bytes; smaller initializers stay inside model.onnx

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


@dataclass
class NBitsLinear:
    """One projection as MatMulNBits inputs (layouts: ``spec``).

    Attributes:
        b: uint8 ``[N, k_blocks, block_size * bits / 8]``, or a :class:`~qalora_export.formats.onnx.spec.BFromQweight`
            that lays it out from the GPTQ words a row block at a time as it is written.
        scales: ``[N, k_blocks]`` in the io dtype.
        zero_points: packed uint8 ``[N, ceil(k_blocks * bits / 8)]`` or io dtype ``[N, k_blocks]``.
        perm: int64 ``[K]`` or None: the node computes ``x[..., perm] @ W'.T`` where ``W'`` holds
            the columns of the original weight in the order ``perm`` (act-order bases).
        bias: ``[N]`` or None.
        zero_residual: ``R`` ``[G, N]`` or None: the part of the zero-points the packed integers do
            not hold, times the scale; the projection is ``MatMulNBits(x) - pool_sum(x) @ R`` with
            ``pool_sum`` summing each run of ``residual_group`` (permuted) input columns.
        residual_v: ``V`` ``[k, N]`` or None: with it ``zero_residual`` is ``U`` ``[G, k]`` and the
            correction is ``(pool_sum(x) @ U) @ V`` (``lowrank.py``).
    """

    k: int
    n: int
    bits: int
    block_size: int
    b: Union[np.ndarray, spec.BFromQweight]
    scales: np.ndarray
    zero_points: np.ndarray
    perm: Optional[np.ndarray] = None
    bias: Optional[np.ndarray] = None
    zero_residual: Optional[np.ndarray] = None
    residual_group: int = 0
    residual_v: Optional[np.ndarray] = None


@dataclass
class FloatLinear:
    """One projection as a float weight ``[out, in]`` (stored transposed, ``[in, out]``)."""

    weight: np.ndarray
    bias: Optional[np.ndarray] = None


Linear = Union[NBitsLinear, FloatLinear]


class ExternalData:
    """Appends initializer bytes to one file and returns ONNX external-data references."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # several GB: written around the page cache by a writer thread (qalora_export/storage/direct_io.py)
        self._file = DirectWriter(self.path)
        self._offset = 0

    def add(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        return self.add_blocks(name, array.dtype, array.shape, [array])

    def add_blocks(self, name: str, dtype, shape: tuple[int, ...], blocks: Iterable[np.ndarray]) -> TensorProto:
        """Append a tensor of ``shape`` given as consecutive row blocks (C order), one block in
        memory at a time; the bytes are those of the whole array."""
        dtype = np.dtype(dtype)
        pad = (-self._offset) % EXTERNAL_ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        length = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            if block.size:
                self._file.write(memoryview(block.reshape(-1).view(np.uint8)))  # no copy of the bytes
                length += block.nbytes
        if length != math.prod(shape) * dtype.itemsize:
            raise RuntimeError(f"initializer {name}: its blocks hold {length} bytes, not those of {shape} {dtype}")
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(dtype)
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self._offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += length
        return tensor

    def close(self) -> None:
        """Write what is buffered and close; raises a failed write's ``OSError``."""
        self._file.close()

    def abort(self) -> None:
        """Close without finishing (the export failed and its output is removed); never raises."""
        self._file.abort()


class GraphBuilder:
    """Collects nodes and initializers; names every node output ``<node name>/out<i>``."""

    def __init__(self, external: ExternalData):
        self.external = external
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_infos: list[onnx.ValueInfoProto] = []
        self._consts: dict[tuple, str] = {}

    def initializer(self, name: str, array: np.ndarray) -> str:
        array = np.asarray(array)
        if array.nbytes <= INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        else:
            self.initializers.append(self.external.add(name, array))
        return name

    def initializer_blocks(self, name: str, dtype, shape: tuple[int, ...],
                           blocks: Callable[[], Iterable[np.ndarray]]) -> str:
        """An initializer whose data comes as row blocks (``blocks()``); written to the external file
        block by block unless small enough to inline."""
        if math.prod(shape) * np.dtype(dtype).itemsize <= INLINE_LIMIT:
            return self.initializer(name, np.concatenate([np.asarray(b, dtype=dtype) for b in blocks()]).reshape(shape))
        self.initializers.append(self.external.add_blocks(name, dtype, shape, blocks()))
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(f"/const/{arr.dtype.name}/{len(self._consts)}", arr)
        return self._consts[key]

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "",
             outputs: Optional[list[str]] = None, **attrs) -> Union[str, list[str]]:
        outs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def declare(self, name: str, elem_type: int, shape: list) -> None:
        """Declare an intermediate's type (shape inference does not know the contrib ops)."""
        self.value_infos.append(helper.make_tensor_value_info(name, elem_type, shape))


#: Bytes of one row block of a float weight written transposed (the lm head: 0.5 GB in fp32 at 7B).
FLOAT_BLOCK_BYTES = 32 << 20


def transposed_row_blocks(weight: np.ndarray, dtype) -> Iterator[np.ndarray]:
    """``weight.T`` ``[in, out]`` in ``dtype``, as C-order blocks of whole rows of about
    :data:`FLOAT_BLOCK_BYTES` each, so that the widened, transposed copy is never whole in memory."""
    n_in, n_out = weight.shape[1], weight.shape[0]
    for start, stop in row_ranges(n_in, n_out * np.dtype(dtype).itemsize, FLOAT_BLOCK_BYTES):
        # one C-order copy in the io dtype (astype of the transposed view would keep Fortran order)
        yield np.ascontiguousarray(weight[:, start:stop].T, dtype=dtype)


def build_decoder(model_config: dict, linear: Callable[[str], Linear], tensor: Callable[[str], np.ndarray],
                  external: ExternalData, dtype: str = "fp32", accuracy_level: int = 0,
                  metadata: Optional[dict] = None, pack: bool = False,
                  head: Optional[tuple[str, Callable[[], Linear]]] = None) -> onnx.ModelProto:
    """The whole decoder as a ``ModelProto`` whose weights live in ``external``.

    Args:
        model_config: ``config.json`` dict (LLaMA family).
        linear: HF module name (``model.layers.0.self_attn.q_proj``) -> its projection.
        tensor: HF tensor name -> array (embeddings, norms, lm head); fp16 tables stay fp16 in the
            file and are cast in the graph (exact), everything else is converted to the io dtype.
        dtype: io dtype, "fp32" or "fp16".
        accuracy_level: the ``accuracy_level`` attribute of every MatMulNBits node.
        metadata: string key/values for ``metadata_props``.
        pack: q/k/v and gate/up as one MatMulNBits node each where :func:`~.pack.packable`
            (``pack.py``); their rows are recorded under ``pack.PACKED_NODES_KEY``.
        head: ``(node name, make)``: the lm head is ``make()`` under that name instead (a requantized
            head, ``head.py``; a tied embedding's ``Gather`` keeps the float table).
    """
    cfg = decoder_config(model_config)
    io_np = spec.DTYPES[dtype]
    io_onnx = NP_TO_ONNX[np.dtype(io_np)]
    gb = GraphBuilder(external)

    def as_io(arr: np.ndarray) -> np.ndarray:
        return np.asarray(arr).astype(io_np)

    gb.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
    gb.inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]))
    kv_shape_past = ["batch_size", cfg.kv_heads, "past_sequence_length", cfg.head_dim]
    kv_shape_present = ["batch_size", cfg.kv_heads, "total_sequence_length", cfg.head_dim]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            gb.inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", io_onnx, kv_shape_past))

    # Embedding: a Gather on the table in its stored dtype, then a Cast to the io dtype if needed.
    embed_name = "model.embed_tokens.weight"
    embed = np.asarray(tensor(embed_name))
    embed_stored = embed if embed.dtype in (np.float16, io_np) else as_io(embed)
    table = gb.initializer(embed_name, embed_stored)
    embed_dtype = embed_stored.dtype
    del embed, embed_stored  # written: not held while the layers and the lm head are built
    h = gb.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")
    if embed_dtype != io_np:
        h = gb.node("Cast", [h], "/model/embed_tokens/Cast", to=io_onnx)

    # Attention-mask reformatting for GroupQueryAttention (genai's own subgraph).
    mask_sum = gb.node("ReduceSum", ["attention_mask", gb.const([1])], "/model/attn_mask/ReduceSum", keepdims=0)
    seqlens = gb.node("Sub", [mask_sum, gb.const(1)], "/model/attn_mask/Sub")
    seqlens_k = gb.node("Cast", [seqlens], "/model/attn_mask/seqlens_k", to=TensorProto.INT32)
    mask_shape = gb.node("Shape", ["attention_mask"], "/model/attn_mask/Shape")
    total = gb.node("Gather", [mask_shape, gb.const(1)], "/model/attn_mask/Gather", axis=0)
    total_len = gb.node("Cast", [total], "/model/attn_mask/total_seq_len", to=TensorProto.INT32)

    cos, sin = rotary_caches(model_config, cfg.context_length)
    cos_cache = gb.initializer("cos_cache", as_io(cos))
    sin_cache = gb.initializer("sin_cache", as_io(sin))

    def rms_norm(x: str, weight_name: str, node_name: str) -> str:
        w = gb.initializer(weight_name, as_io(tensor(weight_name)))
        return gb.node("SimplifiedLayerNormalization", [x, w], node_name, axis=-1, epsilon=cfg.rms_eps, stash_type=1)

    perm_gathers: dict[tuple, str] = {}
    pooled: dict[tuple, str] = {}

    def pool_sum(x: str, group: int, k: int, module: str) -> str:
        """``x`` ``[b, s, K]`` -> group sums ``[b, s, K / group]`` (shared by projections of one input)."""
        key = (x, group)
        if key not in pooled:
            r = gb.node("Reshape", [x, gb.const([0, 0, k // group, group])], f"/{module}/PoolGroups/Reshape")
            pooled[key] = gb.node("ReduceSum", [r, gb.const([-1])], f"/{module}/PoolGroups/ReduceSum", keepdims=0)
        return pooled[key]

    packed_nodes: dict[str, list] = {}

    def project_group(x: str, prefix: str, group: tuple) -> tuple[Optional[str], list[str]]:
        """``(packed output, [])`` or, unpacked, ``(None, [output of each member])``."""
        names = [f"{prefix}.{m}" for m in group[0]]
        lins = [linear(n) for n in names]
        if pack and packable(lins):
            packed_nodes[f"{prefix}.{group[1]}"] = [[n, lin.n] for n, lin in zip(names, lins)]
            return project(x, f"{prefix}.{group[1]}", pack_linears(lins)), []
        return None, [project(x, n, lin) for n, lin in zip(names, lins)]

    def project(x: str, module: str, lin: Optional[Linear] = None) -> str:
        lin = linear(module) if lin is None else lin
        if isinstance(lin, FloatLinear):
            w = np.asarray(lin.weight)
            wt = gb.initializer_blocks(f"{module}.weight_t", io_np, w.shape[::-1],
                                       lambda: transposed_row_blocks(w, io_np))
            y = gb.node("MatMul", [x, wt], f"/{module}/MatMul")
        else:
            if lin.perm is not None:
                key = (x, lin.perm.tobytes())
                if key not in perm_gathers:  # q/k/v (and gate/up) share one input permutation
                    idx = gb.initializer(f"{module}.MatMulNBits.perm", lin.perm.astype(np.int64))
                    perm_gathers[key] = gb.node("Gather", [x, idx], f"/{module}/PermuteInput", axis=-1)
                x = perm_gathers[key]
            ins = [x,
                   (gb.initializer_blocks(f"{module}.MatMulNBits.B", np.uint8, lin.b.shape, lin.b.row_blocks)
                    if hasattr(lin.b, "row_blocks") else gb.initializer(f"{module}.MatMulNBits.B", lin.b)),
                   gb.initializer(f"{module}.MatMulNBits.scales", as_io(lin.scales)),
                   gb.initializer(f"{module}.MatMulNBits.zero_points",
                                  lin.zero_points if lin.zero_points.dtype == np.uint8 else as_io(lin.zero_points))]
            y = gb.node(spec.OP_TYPE, ins, module, domain=spec.OP_DOMAIN, K=lin.k, N=lin.n, bits=lin.bits,
                        block_size=lin.block_size, accuracy_level=accuracy_level)
            gb.declare(y, io_onnx, ["batch_size", "sequence_length", lin.n])
            if lin.zero_residual is not None:
                r = gb.initializer(f"{module}.MatMulNBits.zero_residual", as_io(lin.zero_residual))
                corr = gb.node("MatMul", [pool_sum(x, lin.residual_group, lin.k, module), r], f"/{module}/ZeroResidual/MatMul")
                if lin.residual_v is not None:  # low rank: R = U @ V
                    v = gb.initializer(f"{module}.MatMulNBits.zero_residual_v", as_io(lin.residual_v))
                    corr = gb.node("MatMul", [corr, v], f"/{module}/ZeroResidual/MatMulV")
                y = gb.node("Sub", [y, corr], f"/{module}/ZeroResidual/Sub")
        if lin.bias is not None:
            y = gb.node("Add", [y, gb.initializer(f"{module}.bias", as_io(lin.bias))], f"/{module}/BiasAdd")
        return y

    q_size = cfg.heads * cfg.head_dim
    kv_size = cfg.kv_heads * cfg.head_dim

    def head_norm(y: str, p: str, which: str) -> str:
        """Qwen3's ``q_norm`` / ``k_norm``: RMSNorm of each head of ``y`` over ``head_dim``."""
        name = f"/{p}/self_attn/{which}_norm"
        heads = gb.node("Reshape", [y, gb.const([0, 0, -1, cfg.head_dim])], f"{name}/Reshape")
        normed = rms_norm(heads, f"{p}.self_attn.{which}_norm.weight", f"{name}/SimplifiedLayerNormalization")
        return gb.node("Reshape", [normed, gb.const([0, 0, -1])], f"{name}/ReshapeBack")

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        x = rms_norm(h, f"{p}.input_layernorm.weight", f"/{p}/input_layernorm")
        qkv, separate = project_group(x, f"{p}.self_attn", QKV)
        if cfg.qk_norm:  # q and k normed per head before the op rotates them: q, k, v apart
            q, k, v = separate or gb.node("Split", [qkv, gb.const([q_size, kv_size, kv_size])],
                                          f"/{p}/self_attn/qkv_proj/Split", n_out=3, axis=-1)
            qkv, separate = None, [head_norm(q, p, "q"), head_norm(k, p, "k"), v]
        attn = gb.node(
            "GroupQueryAttention",  # packed QKV: query holds q, k and v; key and value left empty
            [*([qkv, "", ""] if qkv else separate), f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             seqlens_k, total_len, cos_cache, sin_cache],
            f"/{p}/self_attn/GroupQueryAttention", domain=GQA_DOMAIN,
            outputs=[f"/{p}/self_attn/GroupQueryAttention/out0", f"present.{i}.key", f"present.{i}.value"],
            num_heads=cfg.heads, kv_num_heads=cfg.kv_heads, scale=1.0 / math.sqrt(cfg.head_dim),
            do_rotary=1, rotary_interleaved=0, local_window_size=cfg.layer_windows[i],
        )[0]
        gb.declare(attn, io_onnx, ["batch_size", "sequence_length", q_size])
        o = project(attn, f"{p}.self_attn.o_proj")
        h = gb.node("Add", [h, o], f"/{p}/attn_residual")
        x = rms_norm(h, f"{p}.post_attention_layernorm.weight", f"/{p}/post_attention_layernorm")
        gate_up, separate = project_group(x, f"{p}.mlp", GATE_UP)
        gate, up = separate or gb.node("Split", [gate_up, gb.const([cfg.intermediate] * 2)],
                                       f"/{p}/mlp/gate_up_proj/Split", n_out=2, axis=-1)
        sig = gb.node("Sigmoid", [gate], f"/{p}/mlp/act/Sigmoid")
        act = gb.node("Mul", [gate, sig], f"/{p}/mlp/act/Mul")
        prod = gb.node("Mul", [act, up], f"/{p}/mlp/Mul")
        down = project(prod, f"{p}.mlp.down_proj")
        h = gb.node("Add", [h, down], f"/{p}/mlp_residual")

    x = rms_norm(h, "model.norm.weight", "/model/norm")
    if head is not None:
        logits = project(x, head[0], head[1]())
    elif cfg.tie_embeddings:
        wt = gb.node("Transpose", [table], "/lm_head/TransposeTiedEmbedding", perm=[1, 0])
        if embed_dtype != io_np:
            wt = gb.node("Cast", [wt], "/lm_head/CastTiedEmbedding", to=io_onnx)
        logits = gb.node("MatMul", [x, wt], "/lm_head/MatMul")
    else:
        logits = project(x, "lm_head")
    if io_np != np.float32:
        logits = gb.node("Cast", [logits], "/lm_head/CastLogits", to=TensorProto.FLOAT)
    gb.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
    gb.outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab]))
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            gb.outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", io_onnx, kv_shape_present))

    graph = helper.make_graph(gb.nodes, "qalora_export_decoder", gb.inputs, gb.outputs, gb.initializers,
                              value_info=gb.value_infos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.ONNX_OPSET),
                                                    helper.make_opsetid(spec.OP_DOMAIN, spec.OP_VERSION)],
                              producer_name="qalora-export", ir_version=spec.IR_VERSION)
    if packed_nodes:
        metadata = {**(metadata or {}), PACKED_NODES_KEY: json.dumps(packed_nodes)}
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    return model
