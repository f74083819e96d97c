"""The verification gate (``qalora_export.verify``) at its weight level, on tiny random models.

Honest exports of every format pass and the report says what was checked; an artifact that holds
other weights than the base + adapter it is verified against fails, naming the layer; a GPTQ merge
whose zero-points were rounded fails ``require_exact`` while an integral-shift adapter passes it;
the report renders to JSON and markdown; the format is detected from the path. No runtime is run
(``runtime=False``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf_helpers
import pytest
import tiny_models
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import ConfigError
from qalora_export.formats import get_format
from qalora_export.verify import (
    render_markdown,
    verify_artifact,
    weight_report,
    write_report,
)

ARTIFACT_NAMES = {"gptq": "gptq", "onnx": "onnx", "gguf": "model.gguf"}
DAMAGED = "model.layers.1.self_attn.v_proj"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A BPE base (GGUF needs a real tokenizer), adapters, and exports of each format."""
    root = tmp_path_factory.mktemp("verify")
    base = gguf_helpers.make_bpe_base(root / "base", bits=4, group_size=32)
    # magnitude 0.1: fold shifts up to ~0.7 code units, so GPTQ's rounded zeros differ from the base's
    adapter = tiny_models.make_random_adapter(base, root / "adapter", rank=4, seed=0, magnitude=0.1)
    other = tiny_models.make_random_adapter(base, root / "other-adapter", rank=4, seed=1, magnitude=0.3)
    # down_proj has 128 inputs = 4 groups of 32: integral_shift needs rank >= 4
    integral = tiny_models.make_random_adapter(base, root / "integral-adapter", rank=4, seed=2,
                                               integral_shift=True)
    w = {"root": root, "base": base, "adapter": adapter, "other": other, "integral": integral,
         "summaries": {}}
    for fmt, name in ARTIFACT_NAMES.items():
        w[fmt] = root / name
        w["summaries"][fmt] = get_format(fmt).export(MergedView.open(base, adapter), w[fmt])
        w[f"{fmt}-other"] = root / f"other-{name}"
        # GPTQ: the large adapter moves a few zeros past [0, 15]; clamping them is declared too
        options = {"clamp_zeros": True} if fmt == "gptq" else {}
        get_format(fmt).export(MergedView.open(base, other), w[f"{fmt}-other"], **options)
    w["gptq-integral"] = root / "gptq-integral"
    w["summaries"]["gptq-integral"] = get_format("gptq").export(MergedView.open(base, integral),
                                                               w["gptq-integral"])
    w["gptq-plain"] = root / "gptq-plain"
    get_format("gptq").export(MergedView.open(base), w["gptq-plain"])
    w["modules"] = GPTQCheckpoint(base).quantized_modules
    return w


def _safetensors_file_with(directory: Path, key: str) -> Path:
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if key in f.keys():
                return path
    raise AssertionError(f"{key} not in {directory}")


# --------------------------------------------------------------------------------- honest exports


@pytest.mark.parametrize("fmt", ["gptq", "onnx", "gguf"])
def test_honest_export_passes_with_detected_format(world, fmt):
    report = verify_artifact(world[fmt], world["base"], world["adapter"], runtime=False)  # fmt=None: detected
    assert report["passed"] is True
    assert report["format"] == fmt
    assert report["artifact"] == str(world[fmt])
    assert report["base"] == str(world["base"]) and report["adapter"] == str(world["adapter"])
    assert "runtime" not in report and "require_exact" not in report
    weights = report["weights"]
    assert weights["passed"] is True and weights["missing_layers"] == []
    assert weights["layers_checked"] == len(world["modules"]) == 14
    assert sorted(weights["per_layer"]) == sorted(world["modules"])
    for name, row in weights["per_layer"].items():
        assert row["passed"] is True, name
        assert 0.0 <= row["max_abs_vs_declared"] <= row["allowed"], name
    assert weights["max_abs_vs_declared"] == max(r["max_abs_vs_declared"] for r in weights["per_layer"].values())
    tolerance = get_format(fmt).weight_tolerance
    if fmt == "onnx":  # float zero-points: the fold exactly, so the unmerged weight too
        assert weights["max_rel_vs_unmerged"] <= tolerance
    if fmt == "gptq":  # integer zeros: the random adapter's fractional zeros were rounded (declared)
        assert weights["merge"]["exact"] is False
        assert weights["merge"]["zeros_moved"] == world["summaries"]["gptq"]["zeros_moved"] > 0
        assert weights["max_rel_vs_unmerged"] > tolerance  # reported, not a failure
        # ... and some rounded zeros still differ from the base's: the artifact is not the base
        assert GPTQCheckpoint(world[fmt]).fingerprint() != GPTQCheckpoint(world["base"]).fingerprint()
    # an explicit format gives the same report
    assert verify_artifact(world[fmt], world["base"], world["adapter"], fmt=fmt, runtime=False) == report


def test_plain_base_export_verified_without_adapter(world):
    report = verify_artifact(world["gptq-plain"], world["base"], None, runtime=False)
    assert report["passed"] is True and report["adapter"] is None
    assert report["weights"]["merge"]["merged"] is False
    assert report["weights"]["max_abs_vs_unmerged"] == 0.0  # the base's own codes, scales and zeros


@pytest.mark.parametrize("fmt", ["gptq", "onnx"])
def test_merged_export_verified_without_its_adapter_fails(world, fmt):
    report = verify_artifact(world[fmt], world["base"], None, runtime=False)
    assert report["passed"] is False and report["weights"]["passed"] is False
    assert any(not row["passed"] for row in report["weights"]["per_layer"].values())
    if fmt == "onnx":  # float zeros: every layer holds its adapter's delta
        assert all(not row["passed"] for row in report["weights"]["per_layer"].values())


# ------------------------------------------------------------------------------- wrong artifacts


@pytest.mark.parametrize("fmt", ["gptq", "onnx", "gguf"])
def test_artifact_of_another_adapter_fails(world, fmt):
    report = verify_artifact(world[f"{fmt}-other"], world["base"], world["adapter"], runtime=False)
    assert report["passed"] is False and report["weights"]["passed"] is False
    per_layer = report["weights"]["per_layer"]
    assert sorted(per_layer) == sorted(world["modules"])
    for name, row in per_layer.items():
        assert row["passed"] is False, name
        assert row["max_abs_vs_declared"] > row["allowed"], name


def test_gptq_layer_with_damaged_scales_is_named(world, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(world["gptq"], damaged)
    key = f"{DAMAGED}.scales"
    path = _safetensors_file_with(damaged, key)
    tensors = load_file(str(path))
    before = tensors[key].clone()
    tensors[key][0, 3] = tensors[key][0, 3] * 1.25  # one group of one output row
    assert not torch.equal(tensors[key], before)
    save_file(tensors, str(path), metadata={"format": "pt"})

    model = MergedView.open(world["base"], world["adapter"])
    report = weight_report(model, get_format("gptq"), damaged)
    assert report["passed"] is False and report["missing_layers"] == []
    failed = sorted(name for name, row in report["per_layer"].items() if not row["passed"])
    assert failed == [DAMAGED]
    row = report["per_layer"][DAMAGED]
    assert row["max_abs_vs_declared"] > row["allowed"] > 0
    # the damage is a quarter of one scale times some |q - z|: far beyond round-off, within one scale step
    assert row["max_abs_vs_declared"] <= 0.25 * float(before[0, 3]) * 16 + 1e-6
    assert verify_artifact(damaged, world["base"], world["adapter"], runtime=False)["passed"] is False
    # the honest artifact it was copied from still passes
    assert weight_report(model, get_format("gptq"), world["gptq"])["passed"] is True


def test_gptq_artifact_missing_a_layer_fails(world, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(world["gptq"], cut)
    path = _safetensors_file_with(cut, f"{DAMAGED}.qweight")
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith(DAMAGED + ".")}
    save_file(tensors, str(path), metadata={"format": "pt"})
    report = weight_report(MergedView.open(world["base"], world["adapter"]), get_format("gptq"), cut)
    assert report["passed"] is False
    assert report["missing_layers"] == [DAMAGED]
    assert report["layers_checked"] == len(world["modules"]) - 1
    assert all(row["passed"] for row in report["per_layer"].values())


# ------------------------------------------------------------------------------- require_exact


def test_require_exact_fails_rounded_gptq_merge(world):
    loose = verify_artifact(world["gptq"], world["base"], world["adapter"], runtime=False)
    strict = verify_artifact(world["gptq"], world["base"], world["adapter"], require_exact=True, runtime=False)
    assert loose["passed"] is True
    assert strict["passed"] is False
    assert strict["weights"]["passed"] is True  # the weights are what the artifact declares ...
    moved = world["summaries"]["gptq"]["zeros_moved"]
    assert moved > 0
    assert strict["require_exact"] == {"passed": False, "reason": f"the merge rounded {moved} zero-points"}


def test_require_exact_passes_integral_shift_gptq_merge(world):
    summary = world["summaries"]["gptq-integral"]
    assert summary["exact"] is True and summary["zeros_moved"] == 0
    assert summary["max_fold_shift"] == 1.0  # the adapter really moved zero-points, by whole code units
    report = verify_artifact(world["gptq-integral"], world["base"], world["integral"], require_exact=True,
                             runtime=False)
    assert report["passed"] is True and "require_exact" not in report
    assert report["weights"]["merge"]["exact"] is True
    # integer zeros hold the fold exactly: the artifact is the unmerged weight to round-off
    assert report["weights"]["max_rel_vs_unmerged"] <= get_format("gptq").weight_tolerance
    # the same artifact against the non-integral adapter is another model
    assert verify_artifact(world["gptq-integral"], world["base"], world["adapter"], runtime=False)["passed"] is False


# --------------------------------------------------------------------------------------- reports


def test_write_report_json_and_markdown(world, tmp_path):
    good = verify_artifact(world["onnx"], world["base"], world["adapter"], runtime=False)
    bad = verify_artifact(world["onnx-other"], world["base"], world["adapter"], runtime=False)
    for report, word, other in ((good, "PASSED", "FAILED"), (bad, "FAILED", "PASSED")):
        json_path, md_path = write_report(report, tmp_path / word / "report.json")
        assert json_path == tmp_path / word / "report.json" and md_path == tmp_path / word / "report.md"
        loaded = json.loads(json_path.read_text())
        assert loaded["passed"] is report["passed"] and loaded["format"] == "onnx"
        assert loaded["weights"]["per_layer"].keys() == report["weights"]["per_layer"].keys()
        assert loaded["weights"]["max_abs_vs_declared"] == pytest.approx(report["weights"]["max_abs_vs_declared"])
        md = md_path.read_text()
        assert md == render_markdown(report)
        assert f"**{word}**" in md and f"**{other}**" not in md
        assert md.startswith(f"# verify: {world['onnx-other'] if word == 'FAILED' else world['onnx']} (onnx)")
        assert f"({len(world['modules'])} layers)" in md
        assert f"{report['weights']['max_abs_vs_declared']:.3e}" in md
        assert f"| {report['weights']['passed']} |" in md
        assert "| runtime |" not in md  # runtime=False: no runtime rows


def test_render_markdown_runtime_section():
    report = {
        "artifact": "/x/model.gguf", "format": "gguf", "base": "/x/base", "adapter": None, "passed": False,
        "weights": {"passed": True, "layers_checked": 3, "max_abs_vs_declared": 1.5e-5, "max_abs_vs_unmerged": 2e-4},
        "runtime": {"runtime": "llama.cpp", "passed": False, "error": "it died", "cause": "SIGSEGV",
                    "logits": {"max_abs_logit_diff": 0.125, "mean_kl": 0.001234, "top1_agreement": 0.75,
                               "passed": False},
                    "reference": {"max_abs_logit_diff": None, "mean_kl": 0.0, "top1_agreement": 1.0},
                    "checks": {"logits": False, "greedy": True}, "rule": "KL below the noise floor"},
    }
    md = render_markdown(report)
    assert "**FAILED** — base `/x/base`, adapter `None`" in md
    assert "| weights | max abs vs declared merge (3 layers) | 1.500e-05 | True |" in md
    assert "| weights | max abs vs unmerged (W_hat + dW) | 2.000e-04 | (reported) |" in md
    assert "| runtime | llama.cpp | | False |" in md
    assert "Runtime error (SIGSEGV): it died" in md
    assert "| runtime | logits: max abs dlogit / mean KL / top-1 | 0.125 / 0.00123 / 0.75 | False |" in md
    assert "| runtime | reference: max abs dlogit / mean KL / top-1 | n/a / 0 / 1 | (reference) |" in md
    assert "| runtime | check logits | | False |" in md and "| runtime | check greedy | | True |" in md
    assert "Rule: KL below the noise floor" in md
    assert md.endswith("\n")


def test_render_markdown_lists_nested_comparisons_and_their_rules():
    """A level-4 ONNX report nests its as-stored comparison and floor one level down; both are listed,
    with the nested rule, beside the top-level ones."""
    report = {
        "artifact": "/x/onnx", "format": "onnx", "base": "/x/base", "adapter": "/x/adapter", "passed": True,
        "weights": {"passed": True, "layers_checked": 3, "max_abs_vs_declared": 0.0, "max_abs_vs_unmerged": 0.0},
        "runtime": {"runtime": "onnxruntime", "passed": True, "rule": "level 0: fp32 order only",
                    "logits": {"max_abs_logit_diff": 1e-5, "mean_kl": 4e-11, "top1_agreement": 1.0},
                    "as_stored": {"accuracy_level": 4, "allowed_mean_kl": 0.0229, "rule": "as stored: 3 x floor",
                                  "artifact": {"max_abs_logit_diff": 0.5, "mean_kl": 0.0068, "top1_agreement": 0.9},
                                  "floor": {"max_abs_logit_diff": 0.6, "mean_kl": 0.0076, "top1_agreement": 0.94}},
                    "checks": {"logits": True, "as_stored_floor": True}},
    }
    md = render_markdown(report)
    assert "| runtime | logits: max abs dlogit / mean KL / top-1 | 1e-05 / 4e-11 / 1 | (reference) |" in md
    assert "| runtime | as_stored.artifact: max abs dlogit / mean KL / top-1 | 0.5 / 0.0068 / 0.9 |" in md
    assert "| runtime | as_stored.floor: max abs dlogit / mean KL / top-1 | 0.6 / 0.0076 / 0.94 |" in md
    assert "| runtime | check as_stored_floor | | True |" in md
    assert "Rule: level 0: fp32 order only" in md and "Rule: as stored: 3 x floor" in md


# ------------------------------------------------------------------------------------ detection


def test_unrecognizable_artifact_raises_config_error(world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    stray = tmp_path / "weights.bin"
    stray.write_bytes(torch.randint(0, 256, (64,), dtype=torch.uint8).numpy().tobytes())
    for path in (empty, stray, tmp_path / "missing.onnx"):
        with pytest.raises(ConfigError, match="cannot tell the format"):
            verify_artifact(path, world["base"], world["adapter"], runtime=False)
    with pytest.raises(ConfigError, match="not a known format"):
        verify_artifact(world["gptq"], world["base"], world["adapter"], fmt="safetensors", runtime=False)
