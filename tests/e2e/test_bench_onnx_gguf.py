"""benchmarks/bench_onnx.py and benchmarks/bench_gguf.py run end to end at a tiny size (a random
LLaMA-shaped stack of hidden 64): every variant is exported, run and reported. Nothing is timed
or compared; the peers (onnxruntime-genai's builder, llama.cpp's converter) are left out here."""

from __future__ import annotations

import json

import benchmark_scripts

TINY = ["--model", "llama7b-stack", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--heads", "4",
        "--vocab", "320", "--repeats", "1"]


def test_bench_onnx_smoke(tmp_path, capsys):
    bench = benchmark_scripts.load("bench_onnx")
    out = tmp_path / "onnx.json"
    assert bench.main([*TINY, "--prompt", "8", "--steps", "2", "--no-builder", "--work", str(tmp_path / "work"),
                       "--variants", "fp32", "auto acc0", "uint8 acc0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["fp32", "auto acc0", "uint8 acc0"]
    assert rows["auto acc0"]["exact"] == "true" and rows["uint8 acc0"]["exact"] == "false"  # the fold is fractional
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert capsys.readouterr().out.count("| auto acc0 |") == 1


def test_bench_gguf_smoke(tmp_path, capsys):
    bench = benchmark_scripts.load("bench_gguf")
    out = tmp_path / "gguf.json"
    assert bench.main([*TINY, "--prompt-tokens", "8", "--decode-tokens", "2", "--threads", "1",
                       "--work", str(tmp_path / "work"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["ours q4_1", "ours q4_1 q8_0 emb", "ours f16"]  # no --convert: llama.cpp's own files are not made
    assert all(r["prompt_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["bytes"] > 0 for r in rows.values())
    assert "| ours q4_1 |" in capsys.readouterr().out
