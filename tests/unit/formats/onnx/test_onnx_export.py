"""ONNX export end to end on tiny random LLaMA models: weights, onnxruntime, onnxruntime-genai, refusals."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import (
    FormatLimitError,
    OutputExistsError,
    UnsupportedModelError,
)
from qalora_export.formats.onnx import read as onnx_read
from qalora_export.formats.onnx import spec as onnx_spec
from qalora_export.formats.onnx import spec as spec
from qalora_export.formats.onnx import verify as onnx_verify
from qalora_export.formats.onnx import write as onnx_write

# Prompts free of the tiny tokenizer's special ids (pad = 3 is masked by onnxruntime-genai).
PROMPTS = [[1, 5, 9, 20, 33, 4, 7, 61, 12], [1, 100, 5, 6], [40]]


@pytest.fixture(scope="module")
def make_pair(tmp_path_factory):
    """(bits, group_size, act_order, **kw) -> (base_dir, adapter_dir), cached per module."""
    cache: dict = {}

    def make(bits: int, group_size: int, act_order: bool = False, integral: bool = False, **llama):
        key = (bits, group_size, act_order, integral, tuple(sorted(llama.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"b{bits}g{group_size}{'a' if act_order else ''}{'i' if integral else ''}")
            base = tiny_models.make_tiny_base(root / "base", bits=bits, group_size=group_size,
                                              act_order=act_order, **llama)
            rank = (64 // group_size) if integral else 4
            adapter = tiny_models.make_random_adapter(base, root / "adapter", rank=rank, integral_shift=integral)
            cache[key] = (base, adapter)
        return cache[key]

    return make


def _weight_errors(model: MergedView, out: Path) -> dict[str, float]:
    errors = {}
    for name, decoded in onnx_read.read_weights(out):
        reference = model.reference_weight(name)
        assert decoded.dtype == torch.float64 and decoded.shape == reference.shape
        errors[name] = float((decoded - reference).abs().max() / reference.abs().max())
    return errors


@pytest.mark.parametrize("bits, group_size, zero_points",
                         [(2, 32, "float"), (2, 16, "split"), (3, 64, "float"), (3, 32, "split"),
                          (4, 16, "float"), (4, 32, "split"), (8, 32, "auto"), (3, 16, "auto")])
def test_export_exact_weights_and_runtime(make_pair, tmp_path, bits, group_size, zero_points):
    model = MergedView.open(*make_pair(bits, group_size))
    out = tmp_path / "onnx"
    summary = onnx_write.export(model, out, zero_points=zero_points)
    assert summary["exact"] and summary["container_bits"] == spec.container_bits(bits)
    assert summary["max_fold_shift_code_units"] > 0  # the adapter really moved the zero-points

    errors = _weight_errors(model, out)
    assert set(errors) == set(model.quantized_modules)
    assert max(errors.values()) <= onnx_spec.WEIGHT_TOLERANCE

    report = onnx_verify.verify_runtime(model, out, PROMPTS, tmp_path / "work")
    assert report["passed"], report["checks"]
    assert report["logits"]["top1_agreement"] == 1.0
    assert report["greedy"]["exact_match_onnxruntime"] == len(PROMPTS)
    assert report["greedy"]["exact_match_genai"] == len(PROMPTS)
    assert report["kv_cache_vs_full"]["max_abs_logit_diff_rel"] <= spec.RUNTIME_KV_MAX_DLOGIT_REL


def test_graph_holds_no_float_copy_of_quantized_weights(make_pair, tmp_path):
    import onnx

    model = MergedView.open(*make_pair(4, 32))
    out = tmp_path / "onnx"
    onnx_write.export(model, out, zero_points="float")  # "auto" adds the split residuals (test_onnx_auto.py)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nbits = [n.name for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert sorted(nbits) == sorted(model.quantized_modules)
    float_matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul"]
    assert float_matmuls == ["/lm_head/MatMul"]
    float_inits = {t.name for t in proto.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) == 2}
    allowed = {"model.embed_tokens.weight", "lm_head.weight_t", "cos_cache", "sin_cache"}
    assert float_inits <= allowed | {n + ".MatMulNBits.scales" for n in nbits} | {n + ".MatMulNBits.zero_points" for n in nbits}
    assert {i.name for i in proto.graph.input} >= {"input_ids", "attention_mask", "past_key_values.0.key"}
    assert {"logits", "present.1.value"} <= {o.name for o in proto.graph.output}
    assert (out / "model.onnx.data").is_file() and (out / "genai_config.json").is_file()
    assert (out / "tokenizer.json").is_file()


def test_tied_embeddings(make_pair, tmp_path):
    model = MergedView.open(*make_pair(4, 32, tie_embeddings=True))
    out = tmp_path / "onnx"
    onnx_write.export(model, out)
    # a prompt holding pad_token_id (3), which onnxruntime-genai masks: genai is compared without it
    report = onnx_verify.verify_runtime(model, out, [PROMPTS[0], [1, 7, 3, 9, 11]], tmp_path / "work")
    assert report["passed"], report["checks"]
    assert report["greedy"]["onnxruntime_genai"][1]["prompt_tokens"] == 4
    assert report["greedy"]["exact_match_onnxruntime"] == 2


@pytest.mark.parametrize("zero_points", ["float", "split"])
def test_act_order_is_permuted_exactly(make_pair, tmp_path, zero_points):
    model = MergedView.open(*make_pair(4, 32, act_order=True))
    out = tmp_path / "onnx"
    summary = onnx_write.export(model, out, zero_points=zero_points)
    assert summary["act_order_permuted_layers"] == len(model.quantized_modules)
    assert max(_weight_errors(model, out).values()) <= onnx_spec.WEIGHT_TOLERANCE
    report = onnx_verify.verify_runtime(model, out, PROMPTS[:2], tmp_path / "work")
    assert report["passed"], report["checks"]


def test_uint8_zero_points_exact_when_integral(make_pair, tmp_path):
    model = MergedView.open(*make_pair(4, 32, integral=True, intermediate=64))
    out = tmp_path / "onnx"
    summary = onnx_write.export(model, out, zero_points="uint8")
    assert summary["exact"] and summary["max_weight_error"] == 0.0
    assert max(_weight_errors(model, out).values()) <= onnx_spec.WEIGHT_TOLERANCE
    report = onnx_verify.verify_runtime(model, out, PROMPTS[:2], tmp_path / "work")
    assert report["passed"], report["checks"]


def test_uint8_fractional_zero_points_refused_or_rounded(make_pair, tmp_path):
    model = MergedView.open(*make_pair(4, 32))
    out = tmp_path / "onnx"
    with pytest.raises(FormatLimitError, match="--allow-rounding") as exc:
        onnx_write.export(model, out, zero_points="uint8")
    assert "--zero-points split" in str(exc.value)
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))  # nothing partial left

    summary = onnx_write.export(model, out, zero_points="uint8", allow_rounding=True)
    assert not summary["exact"] and summary["zeros_moved"] > 0 and summary["rounded_layers"]
    meta = onnx_read.merge_metadata(out)
    assert meta["exact"] is False and meta["zero_points"] == "uint8"
    for name, decoded in onnx_read.read_weights(out):  # the artifact holds what it declares
        declared = onnx_read.declared_weight(model, name, meta)
        assert float((decoded - declared).abs().max()) <= onnx_spec.WEIGHT_TOLERANCE * float(declared.abs().max())


def test_eight_bit(make_pair, tmp_path):
    base, adapter = make_pair(8, 32)
    with pytest.raises(FormatLimitError, match="--zero-points split"):
        onnx_write.export(MergedView.open(base), tmp_path / "float", zero_points="float")
    merged = MergedView.open(base, adapter)  # fractional zeros: exact through the split residual
    summary = onnx_write.export(merged, tmp_path / "split", zero_points="split")
    assert summary["exact"] and summary["container_bits"] == 8
    assert max(_weight_errors(merged, tmp_path / "split").values()) <= onnx_spec.WEIGHT_TOLERANCE
    report = onnx_verify.verify_runtime(merged, tmp_path / "split", PROMPTS[:1], tmp_path / "work-split")
    assert report["passed"], report["checks"]
    model = MergedView.open(base)  # no adapter: integral zero-points
    out = tmp_path / "onnx"
    summary = onnx_write.export(model, out, zero_points="uint8")
    assert summary["exact"] and summary["container_bits"] == 8
    assert max(_weight_errors(model, out).values()) <= onnx_spec.WEIGHT_TOLERANCE
    report = onnx_verify.verify_runtime(model, out, PROMPTS[:2], tmp_path / "work")
    assert report["passed"], report["checks"]


def test_accuracy_level_4_and_fp16_exports(make_pair, tmp_path):
    from qalora_export.formats.onnx import runtime as onnxrt

    model = MergedView.open(*make_pair(4, 32))
    out4 = tmp_path / "acc4"
    onnx_write.export(model, out4, accuracy_level=4)
    assert onnxrt.accuracy_levels(out4) == {4}
    report = onnx_verify.verify_runtime(model, out4, PROMPTS[:1], tmp_path / "work")
    assert report["passed"] and report["accuracy_level"] == 0  # verified through a level-0 view
    assert onnxrt.accuracy_levels(out4) == {4}  # the artifact itself is untouched
    # and as stored, at level 4, against onnxruntime's own level-4 floor (the base exported the same way)
    stored = report["as_stored"]
    assert stored["accuracy_level"] == 4 and report["checks"]["as_stored_floor"]
    assert stored["artifact"]["mean_kl"] <= stored["allowed_mean_kl"]
    assert 0 < stored["floor"]["mean_kl"] < 1e-2  # int8 activations: noise, not a bug

    with pytest.raises(FormatLimitError, match="--dtype fp32"):
        onnx_write.export(model, tmp_path / "fp16", dtype="fp16")
    summary = onnx_write.export(model, tmp_path / "fp16", dtype="fp16", allow_rounding=True)
    assert not summary["exact"]
    decoder = onnxrt.OrtDecoder(tmp_path / "fp16")
    logits = decoder.logits(PROMPTS[0])
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    np.testing.assert_allclose(decoder.incremental_logits(PROMPTS[0], 4), logits, atol=5e-3 * np.abs(logits).max())


def test_accuracy_level_4_gate_can_fail(make_pair, tmp_path, monkeypatch):
    """With no room above the floor, the level-4 run's own noise fails the as-stored check (and only it)."""
    model = MergedView.open(*make_pair(4, 32))
    out4 = tmp_path / "acc4"
    onnx_write.export(model, out4, accuracy_level=4)
    monkeypatch.setattr(spec, "STORED_LEVEL_KL_FLOOR_FACTOR", 0.0)
    monkeypatch.setattr(spec, "STORED_LEVEL_KL_EPSILON", 0.0)
    report = onnx_verify.verify_runtime(model, out4, PROMPTS[:1], tmp_path / "work")
    assert not report["passed"]
    assert [name for name, ok in report["checks"].items() if not ok] == ["as_stored_floor"]


def test_refusals(make_pair, tmp_path):
    base, adapter = make_pair(4, 32)
    model = MergedView.open(base, adapter)
    out = tmp_path / "onnx"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        onnx_write.export(model, out)
    onnx_write.export(model, out, overwrite=True)
    assert (out / "model.onnx").is_file()

    fake = types.SimpleNamespace(model_config={"model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        onnx_write.export(fake, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists()


def test_group_size_onnxruntime_cannot_run(tmp_path):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=8)
    out = tmp_path / "onnx"
    with pytest.raises(FormatLimitError, match="group size 8"):
        onnx_write.export(MergedView.open(base), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial output left
