"""``--lm-head int8|int4``: the lm head requantized into a MatMulNBits node (head.py), opt-in and
recorded as not exact; the graph, onnxruntime and onnxruntime-genai, the verify floor, the bundle,
the option plumbing, and the default left byte for byte as it was."""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_models
from onnx import helper

from qalora_export.bundle import CARD, REFERENCE, bundle_dir
from qalora_export.bundle.check import verify_from_bundle
from qalora_export.bundle.reference import load_reference
from qalora_export.bundle.write import export_with_bundle
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import ConfigError, FormatLimitError
from qalora_export.formats.onnx import FORMAT as O
from qalora_export.formats.onnx import head as onnx_head
from qalora_export.formats.onnx import read as onnx_read
from qalora_export.formats.onnx import spec
from qalora_export.formats.onnx import verify as onnx_verify
from qalora_export.formats.onnx import write as onnx_write

PROMPTS = [[1, 5, 9, 20, 33, 4, 7, 61, 12], [1, 100, 5, 6], [40]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """tied -> (base, adapter), cached per module."""
    cache: dict = {}

    def make(tied: bool):
        if tied not in cache:
            root = tmp_path_factory.mktemp(f"head-{'tied' if tied else 'untied'}")
            base = tiny_models.make_tiny_base(root / "base", tie_embeddings=tied)
            cache[tied] = (base, tiny_models.make_random_adapter(base, root / "adapter"))
        return cache[tied]
    return make


# ---------------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("kind,rows,cols", [("int4", 37, 64), ("int8", 129, 96), ("int4", 1, 32)])
def test_rtn_round_trip_on_random_tables(kind, rows, cols):
    rng = np.random.default_rng(rows)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    blocks = onnx_head.quantize_head(w, kind)
    bits = onnx_head.HEAD_BITS[kind]
    assert blocks.codes.shape == (rows, cols) and int(blocks.codes.max()) <= (1 << bits) - 1
    assert blocks.scales.shape == blocks.zeros.shape == (rows, cols // 32)
    np.testing.assert_array_equal(blocks.scales, blocks.scales.astype(np.float16).astype(np.float32))
    err = np.abs(blocks.dequantize() - w)
    scale = np.repeat(blocks.scales, 32, axis=1)
    assert (err <= scale * (1 + 1e-6)).all()  # within a step (the rounded zero-point may clip an end)
    assert np.mean(err <= scale * 0.5 * (1 + 1e-6)) > 0.99  # round to nearest everywhere else
    # packed into MatMulNBits inputs and decoded by the spec's codec: the same values
    lin = onnx_head.head_linear(blocks)
    codes = spec.unpack_b(lin.b, bits, cols)
    zeros = spec.unpack_zero_points(lin.zero_points, bits, cols // 32)
    np.testing.assert_array_equal(spec.dequantize(codes, lin.scales, zeros, 32), blocks.dequantize())


def test_zero_blocks_and_refusals():
    w = np.zeros((3, 64), np.float32)
    w[1, :32] = 0.5
    np.testing.assert_array_equal(onnx_head.quantize_head(w, "int4").dequantize()[0], 0.0)
    assert abs(onnx_head.quantize_head(w, "int4").dequantize()[1, 0] - 0.5) < 1e-3
    with pytest.raises(FormatLimitError, match="multiple of the block size"):
        onnx_head.quantize_head(np.zeros((2, 48), np.float32), "int4")
    with pytest.raises(FormatLimitError, match="NaN"):
        onnx_head.quantize_head(np.full((2, 32), np.nan, np.float32), "int8")
    with pytest.raises(ConfigError, match="--lm-head"):
        onnx_head.quantize_head(np.zeros((2, 32), np.float32), "int3")


# ------------------------------------------------------------------------- graph, onnxruntime


def _head_node(out: Path):
    proto = onnx.load(str(out / spec.MODEL_FILE), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.name == onnx_head.HEAD_NODE]
    return proto, (nodes[0] if nodes else None)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_graph_round_trip(pair, tmp_path, tied, kind):
    base, adapter = pair(tied)
    model = MergedView.open(base, adapter)
    out = tmp_path / "onnx"
    summary = onnx_write.export(model, out, lm_head=kind, accuracy_level=4)
    record = summary["lm_head"]
    assert record["kind"] == kind and record["exact"] is False and summary["exact"] is True  # the fold stays exact
    assert record["source"] == ("model.embed_tokens.weight" if tied else "lm_head.weight")
    assert onnx_read.merge_metadata(out)["lm_head"] == record
    proto, node = _head_node(out)
    assert node is not None and node.op_type == spec.OP_TYPE and node.domain == spec.OP_DOMAIN
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    cfg = model.model_config
    assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"], attrs["accuracy_level"]) == (
        onnx_head.HEAD_BITS[kind], 32, cfg["hidden_size"], cfg["vocab_size"], 4)
    # its stored weight is the declared head, recomputed from the base
    inits = {t.name: t for t in proto.graph.initializer}
    b, scales, zp = (onnx_read._initializer_array(inits[name], out) for name in node.input[1:4])
    bits, n, k = attrs["bits"], attrs["N"], attrs["K"]
    stored = spec.dequantize(spec.unpack_b(b, bits, k), scales.reshape(n, -1),
                             spec.unpack_zero_points(zp, bits, k // 32), 32)
    np.testing.assert_array_equal(stored, onnx_head.declared_head(model, record))
    # the embedding Gather reads the float table, which stays in the file unchanged; no float head is left
    embed = onnx_read._initializer_array(inits["model.embed_tokens.weight"], out)
    np.testing.assert_array_equal(embed, model.read_tensor("model.embed_tokens.weight").numpy())
    ops = {n.op_type for n in proto.graph.node}
    assert "Transpose" not in ops and "lm_head.weight_t" not in inits
    # the weight level reads exactly the folded layers (the requantized head is not one)
    assert {name for name, _ in onnx_read.read_weight_rows(out)} == set(model.quantized_modules)


@pytest.mark.parametrize("tied", [False, True])
def test_onnxruntime_and_genai_against_the_declared_head_and_the_floor(pair, tmp_path, tied):
    base, adapter = pair(tied)
    model = MergedView.open(base, adapter)
    out = tmp_path / "onnx"
    onnx_write.export(model, out, lm_head="int4", accuracy_level=4)
    result = onnx_verify.verify_runtime(model, out, PROMPTS, tmp_path / "work")
    assert result["passed"], result["checks"]
    # exact against the head the artifact declares (every check of an exact export applies)
    assert result["logits"]["max_abs_logit_diff_rel"] < 1e-4
    assert result["greedy"]["exact_match_onnxruntime"] == len(PROMPTS)
    head = result["lm_head"]
    assert head["exact"] is False and result["checks"]["lm_head_floor"]
    # against the float head it costs what the floor says (PyTorch with the declared head), and not nothing
    assert head["floor"]["mean_kl"] > 0
    assert head["vs_float_head"]["mean_kl"] <= head["allowed_mean_kl"]
    assert abs(head["vs_float_head"]["mean_kl"] - head["floor"]["mean_kl"]) <= 1e-3 * head["floor"]["mean_kl"] + 1e-9


def test_a_tampered_head_fails(pair, tmp_path):
    """Scales of the head node scaled by 2 in the file: onnxruntime computes another head, verify fails."""
    from onnx import numpy_helper

    base, adapter = pair(False)
    model = MergedView.open(base, adapter)
    out = tmp_path / "onnx"
    onnx_write.export(model, out, lm_head="int8")
    proto, node = _head_node(out)
    inits = {t.name: t for t in proto.graph.initializer}
    scales = onnx_read._initializer_array(inits[node.input[2]], out) * 2
    idx = next(i for i, t in enumerate(proto.graph.initializer) if t.name == node.input[2])
    proto.graph.initializer[idx].CopyFrom(numpy_helper.from_array(scales, node.input[2]))
    onnx.save(proto, str(out / spec.MODEL_FILE))
    result = onnx_verify.verify_runtime(model, out, PROMPTS, tmp_path / "work")
    assert not result["passed"] and not result["checks"]["max_dlogit_rel"]


def test_bundle_says_so_and_reverifies_against_its_floor(pair, tmp_path):
    base, adapter = pair(True)
    out = tmp_path / "out" / "merged-onnx"
    summary = export_with_bundle("onnx", base, adapter, out, {"lm_head": "int4", "accuracy_level": 4})
    assert summary["verify"]["passed"]
    bundle = bundle_dir(out)
    card = (bundle / CARD).read_text()
    assert '"lm_head"' in card and '"exact": false' in card and "requantized to int4" in card
    gate = load_reference(bundle / REFERENCE)["meta"]["gate"]
    assert set(gate) == {"mean_kl"} and gate["mean_kl"]["max"] > 0 and gate["mean_kl"]["floor"] > 0
    copy = tmp_path / "edge" / out.name
    shutil.copytree(out, copy)
    report = verify_from_bundle(copy)
    assert report["passed"], report["checks"]
    assert [c["name"] for c in report["checks"]][-1] == "runtime mean_kl"
    # the level-4 run as stored is not re-run without a base, and the report says so
    assert report["skipped"][0].startswith("weight level")
    assert [s for s in report["skipped"] if s.startswith("accuracy level 4 as stored")], report["skipped"]
    assert "as_stored" in json.loads((bundle / "verify.json").read_text())["runtime"]


# ---------------------------------------------------------------------------- options, default


def test_cli_options():
    parser = argparse.ArgumentParser()
    O.add_options(parser)
    args = parser.parse_args(["--lm-head", "int4", "--accuracy-level", "4"])
    assert O.options_from_args(args, print) == {"zero_points": "auto", "accuracy_level": 4, "dtype": "fp32",
                                                "lm_head": "int4"}
    assert "lm_head" not in O.options_from_args(parser.parse_args([]), print)  # default: the float head
    with pytest.raises(SystemExit):
        parser.parse_args(["--lm-head", "int2"])


def test_default_export_is_unchanged_by_the_option(pair, tmp_path):
    base, adapter = pair(False)
    model = MergedView.open(base, adapter)

    def digest(out: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}

    a, b = tmp_path / "a", tmp_path / "b"
    onnx_write.export(model, a)
    onnx_write.export(model, b, lm_head="float")
    assert digest(a) == digest(b)
    assert "lm_head" not in onnx_read.merge_metadata(a)
    assert _head_node(a)[1] is None


def test_refused_when_the_base_quantizes_its_lm_head(pair, tmp_path, monkeypatch):
    base, adapter = pair(False)
    model = MergedView.open(base, adapter)
    monkeypatch.setattr(type(model), "quantized_modules", property(lambda self: ["lm_head"]))
    with pytest.raises(ConfigError, match="already quantized"):
        onnx_write.export(model, tmp_path / "x", lm_head="int4")
    with pytest.raises(ConfigError, match="--lm-head"):
        onnx_write.export(model, tmp_path / "y", lm_head="fp8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    json.dumps(onnx_head.LM_HEAD_KINDS)
