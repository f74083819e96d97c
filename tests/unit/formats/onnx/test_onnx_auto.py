"""``--zero-points auto`` (the default): split residuals only where the folded zeros are fractional,
q/k/v and gate/up packed into one MatMulNBits node each (``formats/onnx/pack.py``).

Golden tests in onnxruntime: a packed node computes, column for column, what the separate nodes
compute (property test over odd shapes, bits, residuals, biases). Round trips: the reader gives
back every module of a packed export, equal to the ``split`` export's and to the folded record; the
recorded form says what "auto" chose; logits equal the ``split`` export's; packing falls back to
separate nodes when the members' act-order permutations differ; a corrupt packed record is refused.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tiny_models
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.record import QuantizedLinear
from qalora_export.errors import CheckpointError
from qalora_export.formats.onnx import read as onnx_read
from qalora_export.formats.onnx import spec
from qalora_export.formats.onnx import write as onnx_write
from qalora_export.formats.onnx.encode import encode_linear
from qalora_export.formats.onnx.pack import PACKED_NODES_KEY, StackedB, pack_linears, packable
from qalora_export.formats.onnx.runtime import OrtDecoder

PROMPT = [1, 5, 9, 20, 33, 4, 7, 60, 11]


# ----------------------------------------------------------------------------------- one node, in onnxruntime

def _record(rng: np.random.Generator, n: int, k: int, bits: int, group: int, fractional: bool,
            bias: bool) -> QuantizedLinear:
    g = k // group
    zeros = rng.integers(0, 1 << bits, size=(g, n)).astype(np.float64)
    if fractional:
        zeros = zeros + rng.normal(0, 0.7, size=(g, n))
    return QuantizedLinear(
        name="m", bits=bits, group_size=group,
        codes=torch.from_numpy(rng.integers(0, 1 << bits, size=(n, k)).astype(np.uint8)),
        scales=torch.from_numpy(rng.uniform(0.005, 0.05, size=(g, n)).astype(np.float16).astype(np.float32)),
        zeros=torch.from_numpy(zeros), g_idx=torch.arange(k) // group,
        bias=torch.from_numpy(rng.normal(0, 0.1, size=n).astype(np.float32)) if bias else None)


def _run_node(lin, x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` by one MatMulNBits node (plus the split correction and bias), in onnxruntime."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.asarray(lin.b), "B"), numpy_helper.from_array(lin.scales, "S"),
             numpy_helper.from_array(lin.zero_points, "Z")]
    nodes = [helper.make_node(spec.OP_TYPE, ["x", "B", "S", "Z"], ["y0"], domain=spec.OP_DOMAIN, K=lin.k, N=lin.n,
                              bits=lin.bits, block_size=lin.block_size, accuracy_level=0)]
    out = "y0"
    if lin.zero_residual is not None:
        inits += [numpy_helper.from_array(lin.zero_residual, "R"),
                  numpy_helper.from_array(np.array([0, lin.k // lin.residual_group, lin.residual_group]), "shape"),
                  numpy_helper.from_array(np.array([-1]), "axes")]
        nodes += [helper.make_node("Reshape", ["x", "shape"], ["xg"]),
                  helper.make_node("ReduceSum", ["xg", "axes"], ["pooled"], keepdims=0),
                  helper.make_node("MatMul", ["pooled", "R"], ["corr"])]
        if lin.residual_v is not None:
            inits.append(numpy_helper.from_array(lin.residual_v, "V"))
            nodes.append(helper.make_node("MatMul", ["corr", "V"], ["corr_v"]))
        nodes.append(helper.make_node("Sub", [out, "corr_v" if lin.residual_v is not None else "corr"], ["y1"]))
        out = "y1"
    if lin.bias is not None:
        inits.append(numpy_helper.from_array(lin.bias, "bias"))
        nodes.append(helper.make_node("Add", [out, "bias"], ["y2"]))
        out = "y2"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, lin.k])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, lin.n])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(spec.OP_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=spec.IR_VERSION)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=3), blocks=st.integers(1, 3),
       bits=st.sampled_from([2, 4, 8]), group=st.sampled_from([16, 32, 64]),
       fractional=st.lists(st.booleans(), min_size=3, max_size=3),
       bias=st.lists(st.booleans(), min_size=3, max_size=3), low_rank=st.booleans(), seed=st.integers(0, 2**16))
def test_a_packed_node_computes_what_the_separate_nodes_compute(sizes, blocks, bits, group, fractional, bias,
                                                                low_rank, seed):
    rng = np.random.default_rng(seed)
    k = blocks * group
    lins = [encode_linear(_record(rng, n, k, bits, group, fractional[i], bias[i]), "auto")[0]
            for i, n in enumerate(sizes)]
    if low_rank:  # residuals as U @ V factors (lowrank.py), rank 2
        lins = [lin if lin.zero_residual is None else dataclasses.replace(
            lin, zero_residual=rng.normal(0, 0.05, size=(blocks, 2)).astype(np.float32),
            residual_v=rng.normal(0, 0.05, size=(2, lin.n)).astype(np.float32)) for lin in lins]
    assert packable(lins)
    packed = pack_linears(lins)
    assert packed.n == sum(sizes) and packed.b.shape == (sum(sizes), *lins[0].b.shape[1:])
    assert np.array_equal(np.concatenate(list(packed.b.row_blocks())), np.asarray(packed.b))
    x = rng.normal(0, 1, size=(3, k)).astype(np.float32)
    separate = np.concatenate([_run_node(lin, x) for lin in lins], axis=1)
    np.testing.assert_allclose(_run_node(packed, x), separate, rtol=0, atol=1e-5 * max(1.0, np.abs(separate).max()))


def test_packable_refuses_differing_members():
    rng = np.random.default_rng(3)
    a = encode_linear(_record(rng, 8, 64, 4, 32, True, False), "auto")[0]
    assert packable([a, a])
    b8 = encode_linear(_record(rng, 8, 64, 8, 32, True, False), "auto")[0]
    assert not packable([a, b8])  # bits differ
    perm = dataclasses.replace(a, perm=np.arange(64)[::-1].copy())
    assert not packable([a, perm]) and packable([perm, perm])
    other_group = dataclasses.replace(a, residual_group=64)
    assert not packable([a, other_group])
    factored = dataclasses.replace(a, zero_residual=np.ones((2, 1), np.float32), residual_v=np.ones((1, 8), np.float32))
    assert not packable([a, factored]) and packable([factored, factored])  # full R and U @ V do not mix


def test_stacked_b_of_lazy_parts_is_their_concatenation():
    rng = np.random.default_rng(5)
    qweight = rng.integers(-2**31, 2**31, size=(8, 6), dtype=np.int64).astype(np.int32)  # 64 4-bit codes x 6
    lazy = spec.BFromQweight(qweight, 4, 32)
    plain = rng.integers(0, 256, size=(3, 2, 16), dtype=np.uint8)
    stacked = StackedB([lazy, plain])
    assert stacked.shape == (9, 2, 16) and stacked.nbytes == 9 * 2 * 16
    np.testing.assert_array_equal(np.asarray(stacked), np.concatenate([np.asarray(lazy), plain]))
    np.testing.assert_array_equal(np.concatenate(list(stacked.row_blocks())), np.asarray(stacked))


# ----------------------------------------------------------------------------------- whole exports

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_models.make_tiny_base(tmp_path_factory.mktemp("auto") / "base", bits=4, group_size=32, layers=2,
                                      kv_heads=2, heads=4)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return tiny_models.make_random_adapter(base, tmp_path_factory.mktemp("auto-adapter") / "adapter")


@pytest.fixture(scope="module")
def exports(base, adapter, tmp_path_factory):
    """``{kind: out_dir}`` of the adapter-folded tiny base (auto is the default: no option)."""
    from qalora_export.formats import get_format

    root = tmp_path_factory.mktemp("auto-out")
    model = MergedView.open(base, adapter)
    outs = {"auto": root / "auto", "split": root / "split"}
    get_format("onnx").export(model, outs["auto"])
    get_format("onnx").export(model, outs["split"], zero_points="split")
    return outs


def _proto(out):
    import onnx

    return onnx.load(str(out / spec.MODEL_FILE), load_external_data=False)


def test_auto_is_the_default_and_records_its_form(exports):
    meta = onnx_read.merge_metadata(exports["auto"])
    assert meta["zero_points"] == "auto" and meta["exact"] and meta["packed"]
    assert meta["zero_point_form"] == "split" and meta["split_layers"] == 14 and meta["uint8_layers"] == 0
    proto = _proto(exports["auto"])
    nbits = [n.name for n in proto.graph.node if n.op_type == spec.OP_TYPE]
    assert nbits == [f"model.layers.{i}.{m}" for i in range(2)
                     for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    packed = json.loads({p.key: p.value for p in proto.metadata_props}[PACKED_NODES_KEY])
    assert packed["model.layers.0.self_attn.qkv_proj"] == [
        ["model.layers.0.self_attn.q_proj", 64], ["model.layers.0.self_attn.k_proj", 32],
        ["model.layers.0.self_attn.v_proj", 32]]
    gqa = next(n for n in proto.graph.node if n.op_type == "GroupQueryAttention")
    assert list(gqa.input[1:3]) == ["", ""]  # packed QKV


def test_auto_reads_back_as_the_folded_weights_and_equals_split(base, adapter, exports):
    model = MergedView.open(base, adapter)
    auto = dict(onnx_read.read_weights(exports["auto"]))
    split = dict(onnx_read.read_weights(exports["split"]))
    assert sorted(auto) == sorted(split) == sorted(model.quantized_modules)
    for name, w in auto.items():
        assert torch.equal(w, split[name]), name
        ref = model.read_layer(name)[0].dequantize(torch.float64)
        assert float((w - ref).abs().max()) <= spec.WEIGHT_TOLERANCE * float(ref.abs().max()), name
        declared = onnx_read.declared_weight(model, name, onnx_read.merge_metadata(exports["auto"]))
        assert float((w - declared).abs().max()) <= spec.WEIGHT_TOLERANCE * float(ref.abs().max()), name


def test_auto_logits_equal_split_and_its_kv_cache_agrees(exports):
    auto = OrtDecoder(exports["auto"], providers=["CPUExecutionProvider"], threads=1)
    split = OrtDecoder(exports["split"], providers=["CPUExecutionProvider"], threads=1)
    full = auto.logits(PROMPT)
    np.testing.assert_allclose(full, split.logits(PROMPT), rtol=0, atol=1e-5 * np.abs(full).max())
    np.testing.assert_allclose(auto.incremental_logits(PROMPT, 4), full, rtol=0, atol=1e-4 * np.abs(full).max())


def test_auto_without_adapter_is_uint8_with_the_same_codes(base, tmp_path):
    model = MergedView.open(base)
    onnx_write.export(model, tmp_path / "auto")
    onnx_write.export(model, tmp_path / "uint8", zero_points="uint8")
    meta = onnx_read.merge_metadata(tmp_path / "auto")
    assert meta["zero_point_form"] == "uint8" and meta["split_layers"] == 0 and meta["exact"]
    inits = [t.name for t in _proto(tmp_path / "auto").graph.initializer]
    assert not [n for n in inits if n.endswith("zero_residual")]
    auto, uint8 = dict(onnx_read.read_weights(tmp_path / "auto")), dict(onnx_read.read_weights(tmp_path / "uint8"))
    assert all(torch.equal(auto[n], uint8[n]) for n in uint8)
    a = OrtDecoder(tmp_path / "auto", providers=["CPUExecutionProvider"], threads=1).logits(PROMPT)
    u = OrtDecoder(tmp_path / "uint8", providers=["CPUExecutionProvider"], threads=1).logits(PROMPT)
    np.testing.assert_allclose(a, u, rtol=0, atol=1e-5 * np.abs(u).max())


def test_act_order_members_with_different_permutations_stay_separate(tmp_path):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32, act_order=True, layers=1)
    model = MergedView.open(base)
    onnx_write.export(model, tmp_path / "auto")
    proto = _proto(tmp_path / "auto")
    names = {n.name for n in proto.graph.node if n.op_type == spec.OP_TYPE}
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.0.self_attn.qkv_proj" not in names
    for name, w in onnx_read.read_weights(tmp_path / "auto"):
        assert torch.equal(w, model.read_layer(name)[0].dequantize(torch.float64)), name


def test_a_corrupt_packed_record_is_refused(exports, tmp_path):
    import shutil

    import onnx

    for value in ("{not json", json.dumps({"model.layers.0.self_attn.qkv_proj": [["q", 1]]}),
                  json.dumps({"x": "y"})):
        out = tmp_path / f"bad{len(value)}"
        shutil.copytree(exports["auto"], out)
        proto = _proto(out)
        next(p for p in proto.metadata_props if p.key == PACKED_NODES_KEY).value = value
        onnx.save(proto, str(out / spec.MODEL_FILE))
        with pytest.raises(CheckpointError, match=PACKED_NODES_KEY):
            list(onnx_read.read_weight_rows(out))


# ----------------------------------------------------------------------------------- low-rank residuals

def test_low_rank_factors_hold_an_exact_rank_r_matrix_and_refuse_the_rest():
    from qalora_export.formats.onnx.lowrank import low_rank_factors

    rng = np.random.default_rng(11)
    r64 = rng.normal(size=(40, 3)) @ rng.normal(size=(3, 300)) * 1e-3  # rank 3, G=40, N=300
    u, v = low_rank_factors(r64, np.float32, 1e-9)
    assert u.shape == (40, 3) and v.shape == (3, 300) and u.dtype == v.dtype == np.float32
    assert np.abs(u.astype(np.float64) @ v.astype(np.float64) - r64).max() <= 1e-9
    assert low_rank_factors(r64, np.float32, 1e-15) is None  # fp32 factors cannot meet it: stays full
    assert low_rank_factors(rng.normal(size=(40, 300)), np.float32, 1.0) is None  # full rank: no saving
    assert low_rank_factors(np.zeros((40, 300)), np.float32, 1.0) is None


@pytest.fixture(scope="module")
def low_rank_pair(tmp_path_factory):
    """Group 16 (4 groups of 64 columns) and a rank-1 adapter: every residual factors (2 x 68 < 4 x 64)."""
    root = tmp_path_factory.mktemp("lowrank")
    base = tiny_models.make_tiny_base(root / "base", bits=4, group_size=16, layers=2, kv_heads=2, heads=4)
    return base, tiny_models.make_random_adapter(base, root / "adapter", rank=1)


def test_auto_stores_a_rank_r_fold_as_base_zeros_plus_u_v(low_rank_pair, tmp_path):
    from qalora_export.formats.onnx import verify as onnx_verify

    model = MergedView.open(*low_rank_pair)
    summary = onnx_write.export(model, tmp_path / "auto")
    onnx_write.export(model, tmp_path / "split", zero_points="split")
    assert summary["exact"] and summary["low_rank_layers"] == 14 and summary["split_layers"] == 14
    inits = {t.name: t for t in _proto(tmp_path / "auto").graph.initializer}
    v = inits["model.layers.0.self_attn.qkv_proj.MatMulNBits.zero_residual_v"]
    assert list(v.dims) == [3, 128]  # q, k, v: one rank each, block-diagonal over 64 + 32 + 32 rows
    for name, w in onnx_read.read_weights(tmp_path / "auto"):
        ref = model.reference_weight(name)
        assert float((w - ref).abs().max()) <= spec.WEIGHT_TOLERANCE * float(ref.abs().max()), name
    zp = onnx_read._initializer_array(inits["model.layers.0.self_attn.o_proj.MatMulNBits.zero_points"], tmp_path / "auto")
    base_zeros = model.base.read_layer("model.layers.0.self_attn.o_proj", with_codes=False).zeros  # [G, N]
    np.testing.assert_array_equal(spec.unpack_zero_points(zp, 4, 4), base_zeros.numpy().T)  # kept, not rounded
    a = OrtDecoder(tmp_path / "auto", providers=["CPUExecutionProvider"], threads=1).logits(PROMPT)
    s = OrtDecoder(tmp_path / "split", providers=["CPUExecutionProvider"], threads=1).logits(PROMPT)
    np.testing.assert_allclose(a, s, rtol=0, atol=1e-5 * np.abs(s).max())
    report = onnx_verify.verify_runtime(model, tmp_path / "auto", [PROMPT], tmp_path / "work")
    assert report["passed"], report["checks"]


def test_low_rank_factors_of_the_wrong_shape_are_refused(low_rank_pair, tmp_path):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "auto"
    onnx_write.export(MergedView.open(*low_rank_pair), out)
    proto = _proto(out)
    name = "model.layers.0.self_attn.o_proj.MatMulNBits.zero_residual_v"
    index = next(i for i, t in enumerate(proto.graph.initializer) if t.name == name)
    proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.ones((2, 5), np.float32), name))
    onnx.save(proto, str(out / spec.MODEL_FILE))
    with pytest.raises(CheckpointError, match=r"_v \[2, 5\] are not \[G, k\]"):
        list(onnx_read.read_weight_rows(out))
