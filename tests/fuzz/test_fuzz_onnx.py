"""Fuzzing ONNX reading (``qalora_export/formats/onnx/read.py`` ``read_weights`` / ``merge_metadata``) on damaged
``model.onnx`` (protobuf) and ``model.onnx.data`` (external data).

Invariants: only ``QALoRAExportError`` subclasses come out, no hang; a changed byte of a
MatMulNBits input (B, scales, zero-points, residual) is rejected or changes that node's weight;
external data never resolves outside the model directory.
Coverage-guided counterpart: ``fuzz/run.py onnx``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import harness  # noqa: E402
from fuzz_common import tpl, ws  # noqa: E402,F401  (module fixtures)
import mutations  # noqa: E402

from qalora_export.errors import CheckpointError, QALoRAExportError  # noqa: E402

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
MODEL, DATA = range(2)


def seed(tpl: Path, which: int) -> bytes:
    return (tpl / "onnx" / harness.ONNX_FILES[which]).read_bytes()


@pytest.fixture(scope="module")
def original(tpl, ws) -> dict:
    result = harness.check_typed("onnx", harness.encode_choice(DATA, seed(tpl, DATA)), tpl, ws)
    assert isinstance(result, dict) and result["weights"], result
    return result


def _proto(tpl: Path):
    import onnx

    return onnx.load(str(tpl / "onnx" / "model.onnx"), load_external_data=False)


@FUZZ
@given(data=st.data(), which=st.sampled_from([MODEL, DATA]))
def test_byte_damage_gives_only_typed_errors(tpl, ws, data, which):
    damaged = data.draw(mutations.byte_edits(seed(tpl, which)))
    harness.check_typed("onnx", harness.encode_choice(which, damaged), tpl, ws)


@FUZZ
@given(data=st.data())
def test_initializer_and_attribute_damage_gives_only_typed_errors(tpl, ws, data):
    """Structured damage to the graph: MatMulNBits attributes, initializer dims/types/locations."""
    from onnx import TensorProto

    proto = _proto(tpl)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["attr", "dims", "dtype", "location", "offset", "drop_attr", "input"]))
        node = data.draw(st.sampled_from(nodes))
        init = data.draw(st.sampled_from([i for i in proto.graph.initializer if i.name in node.input]))
        if kind == "attr":
            attr = data.draw(st.sampled_from(list(node.attribute)))
            attr.i = data.draw(st.sampled_from([0, -1, 1, 3, 7, 2**40, attr.i * 2, attr.i + 1]))
        elif kind == "drop_attr":
            del node.attribute[data.draw(st.integers(0, len(node.attribute) - 1))]
        elif kind == "dims" and len(init.dims):
            init.dims[data.draw(st.integers(0, len(init.dims) - 1))] = data.draw(st.sampled_from([0, -1, 1, 2**31]))
        elif kind == "dtype":
            init.data_type = data.draw(st.sampled_from([0, 1, 2, 3, 6, 7, 10, 16, 999]))
        elif kind in ("location", "offset") and init.data_location == TensorProto.EXTERNAL:
            entry = next(e for e in init.external_data if e.key == kind)
            entry.value = data.draw(st.sampled_from(["../model.onnx.data", "/etc/passwd", "", "x", "-5", "1e3",
                                                      "99999999999", "model.onnx"]))
        elif kind == "input":
            node.input[data.draw(st.integers(0, len(node.input) - 1))] = data.draw(st.sampled_from(["", "nope"]))
    harness.check_typed("onnx", harness.encode_choice(MODEL, proto.SerializeToString()), tpl, ws)


@FUZZ
@given(data=st.data())
def test_a_changed_weight_byte_is_never_silent(tpl, ws, original, data):
    from onnx import TensorProto

    proto = _proto(tpl)
    nodes = {i: n for n in proto.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:] if i}
    inits = [t for t in proto.graph.initializer if t.name in nodes or t.name.endswith(".zero_residual")]
    init = data.draw(st.sampled_from(inits))
    bit = 1 << data.draw(st.integers(0, 7))
    if init.data_location == TensorProto.EXTERNAL:  # the byte lives in model.onnx.data
        info = {e.key: int(e.value) for e in init.external_data if e.key in ("offset", "length")}
        offset = info.get("offset", 0) + data.draw(st.integers(0, info["length"] - 1))
        damaged = bytearray(seed(tpl, DATA))
        damaged[offset] ^= bit
        which = DATA
    else:  # small initializers are stored inline (raw_data in model.onnx)
        raw = bytearray(init.raw_data)
        raw[data.draw(st.integers(0, len(raw) - 1))] ^= bit
        init.raw_data = bytes(raw)
        damaged, which = proto.SerializeToString(), MODEL
    result = harness.check_typed("onnx", harness.encode_choice(which, bytes(damaged)), tpl, ws)
    if isinstance(result, QALoRAExportError):
        return
    node = nodes.get(init.name) or next(n for n in nodes.values() if init.name.startswith(n.name + "."))
    assert not torch.equal(result["weights"][node.name], original["weights"][node.name]), \
        f"a flipped byte of {init.name} was not seen"


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/model.onnx.data"])
def test_external_data_outside_the_directory_is_refused(tpl, ws, location):
    from onnx import TensorProto

    proto = _proto(tpl)
    init = next(t for t in proto.graph.initializer if t.name.endswith("MatMulNBits.B"))
    length = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    result = harness.check_typed("onnx", harness.encode_choice(MODEL, proto.SerializeToString()), tpl, ws)
    assert isinstance(result, CheckpointError) and "inside the model directory" in str(result)


# ------------------------------------------------------------------- each refusal, deterministically


def _node_inits(proto):
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    inits = {t.name: t for t in proto.graph.initializer}
    return node, inits


def _damage_bits(proto):
    node, _ = _node_inits(proto)
    next(a for a in node.attribute if a.name == "bits").i = 3


def _damage_inputs(proto):
    node, _ = _node_inits(proto)
    del node.input[2:]


def _damage_b_dtype(proto):
    from onnx import TensorProto

    node, inits = _node_inits(proto)
    inits[node.input[1]].data_type = TensorProto.INT8


def _damage_scales_nan(proto):
    import numpy as np

    node, inits = _node_inits(proto)
    t = inits[node.input[2]]
    raw = np.frombuffer(t.raw_data, dtype=np.float32).copy()
    raw[0] = np.nan
    t.raw_data = raw.tobytes()


def _damage_zero_points_dtype(proto):
    from onnx import TensorProto

    node, inits = _node_inits(proto)
    t = inits[node.input[3]]
    t.data_type = TensorProto.INT16
    t.dims[1] = 1
    t.raw_data = t.raw_data + t.raw_data


def _damage_residual(proto):
    node, inits = _node_inits(proto)
    t = inits[f"{node.name}.MatMulNBits.zero_residual"]
    t.dims[0], t.dims[1] = t.dims[1], t.dims[0]


def _damage_metadata(proto):
    next(e for e in proto.metadata_props if e.key.endswith("merge")).value = "[1, 2]"


def _external(proto, **fields):
    """Move B of the first node to external data with the given fields."""
    from onnx import TensorProto

    node, inits = _node_inits(proto)
    t = inits[node.input[1]]
    length = len(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    values = {"location": "model.onnx.data", "offset": "0", "length": str(length), **fields}
    for key, value in values.items():
        entry = t.external_data.add()
        entry.key, entry.value = key, value


DAMAGE = {
    "has bits=3": _damage_bits,
    "MatMulNBits needs A, B, scales": _damage_inputs,
    "expected uint8": _damage_b_dtype,
    "decodes to NaN or inf": _damage_scales_nan,
    "neither packed uint8 nor float": _damage_zero_points_dtype,
    "with G dividing": _damage_residual,
    "must be a JSON object": _damage_metadata,
    "non-integer offset/length": lambda p: _external(p, offset="1e3"),
    "bytes at offset": lambda p: _external(p, length="7"),
    "is truncated": lambda p: _external(p, offset="99999999"),
    "cannot read external data": lambda p: _external(p, location="missing.data"),
}


@pytest.mark.parametrize("message", sorted(DAMAGE))
def test_each_damage_is_refused_with_its_reason(tpl, ws, message):
    proto = _proto(tpl)
    DAMAGE[message](proto)
    result = harness.check_typed("onnx", harness.encode_choice(MODEL, proto.SerializeToString()), tpl, ws)
    assert isinstance(result, CheckpointError) and message in str(result), result


def test_missing_model_file_is_refused(tmp_path):
    from qalora_export.formats import get_format

    with pytest.raises(CheckpointError, match="has no model.onnx"):
        list(get_format("onnx").read_weights(tmp_path))
