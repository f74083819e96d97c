"""End to end through the command line on a tiny model: every verb, exit codes, no partial outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import tiny_models
from qalora_export.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY_FAILED, main
from qalora_export.fixtures.instruct_task import make_splits, write_jsonl
import gguf_helpers  # noqa: E402


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """quantize -> train on a BPE-tokenizer tiny model (GGUF needs BPE); returns the paths."""
    root = tmp_path_factory.mktemp("cli")
    float_dir = tiny_models.make_tiny_llama(root / "float", vocab=gguf_helpers.BPE_VOCAB)
    gguf_helpers.make_tiny_bpe_tokenizer(float_dir, vocab_size=gguf_helpers.BPE_VOCAB)
    base = root / "base"
    assert main(["quantize", str(float_dir), "-o", str(base), "--bits", "4", "--group-size", "32"]) == EXIT_OK
    train, _ = make_splits(24, 4, seed=0)
    data = root / "train.jsonl"
    write_jsonl(data, train)
    adapter = root / "adapter"
    assert main(["train", str(base), "--data", str(data), "-o", str(adapter), "--rank", "4", "--steps", "3",
                 "--batch-size", "4", "--max-length", "128", "--held-out", "4", "--integer-zeros", "--lr", "5e-2"]) == EXIT_OK
    return root, base, adapter


def test_merge_gptq_verify_and_inspect(pipeline, capsys):
    """An integer-zero adapter folds exactly into GPTQ and passes the gate, exactness required."""
    root, base, adapter = pipeline
    out = root / "merged-gptq"
    assert main(["merge", str(base), str(adapter), "--to", "gptq", "-o", str(out), "--require-exact",
                 "--no-verify"]) == EXIT_OK
    assert "exact" in capsys.readouterr().out
    report = root / "verify-gptq.json"
    assert main(["verify", str(out), "--base", str(base), "--adapter", str(adapter), "--report", str(report),
                 "--require-exact"]) == EXIT_OK
    data = json.loads(report.read_text())
    assert data["passed"] and data["format"] == "gptq" and data["weights"]["merge"]["exact"]
    assert data["weights"]["max_abs_vs_unmerged"] == 0.0
    assert report.with_suffix(".md").is_file()
    for path in (base, adapter, out):
        assert main(["inspect", str(path)]) == EXIT_OK
    assert '"kind"' in capsys.readouterr().out


def test_rounded_gptq_merge_is_reported_and_fails_the_gate(pipeline, tmp_path, capsys):
    """A float-zero adapter is rounded into GPTQ (said so); the rounded artifact is not the trained model."""
    root, base, _ = pipeline
    adapter = tiny_models.make_random_adapter(base, tmp_path / "float-adapter", rank=4, magnitude=0.3)
    out = tmp_path / "rounded-gptq"
    assert main(["merge", str(base), str(adapter), "--to", "gptq", "-o", str(out), "--no-verify"]) == EXIT_OK
    assert "zero-points were rounded" in capsys.readouterr().out
    assert main(["verify", str(out), "--base", str(base), "--adapter", str(adapter)]) == EXIT_VERIFY_FAILED
    exact = tmp_path / "exact-gptq"
    code = main(["merge", str(base), str(adapter), "--to", "gptq", "-o", str(exact), "--require-exact", "--no-verify"])
    assert code == EXIT_BAD_INPUT
    assert "--require-exact" in capsys.readouterr().err
    assert not exact.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exact-gptq")]


def test_verify_fails_for_the_wrong_adapter(pipeline, tmp_path):
    """The gate is not vacuous: the base exported without the adapter does not verify as base + adapter."""
    root, base, adapter = pipeline
    assert main(["onnx", str(base), "-o", str(tmp_path / "plain-onnx"), "--no-verify"]) == EXIT_OK
    assert main(["verify", str(tmp_path / "plain-onnx"), "--base", str(base), "--adapter", str(adapter),
                 "--weights-only"]) == EXIT_VERIFY_FAILED


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_other_formats_export_and_verify(pipeline, fmt):
    root, base, adapter = pipeline
    out = root / ("merged.gguf" if fmt == "gguf" else "merged-onnx")
    assert main([fmt, str(base), str(adapter), "-o", str(out), "--no-verify"]) == EXIT_OK
    assert main(["verify", str(out), "--base", str(base), "--adapter", str(adapter)]) == EXIT_OK
    assert main(["inspect", str(out)]) == EXIT_OK
    # the same output again is refused without --overwrite
    assert main([fmt, str(base), str(adapter), "-o", str(out)]) == EXIT_BAD_INPUT
    assert main([fmt, str(base), str(adapter), "-o", str(out), "--overwrite", "--no-verify"]) == EXIT_OK


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    assert main(["merge", str(tmp_path / "x"), str(tmp_path / "x"), "-o", str(tmp_path / "o")]) == EXIT_BAD_INPUT
    assert not (tmp_path / "o").exists()
