"""The benchmarks' fast opt-in rows run end to end at a tiny size: ONNX with the lm head requantized
(``--lm-head``) and GGUF with a Q6_K embedding/head (``--embeddings q6_k``, hidden 256 so that rows are
whole Q6_K blocks). Nothing is timed or compared; the peers are left out here."""

from __future__ import annotations

import json

import benchmark_scripts

TINY = ["--model", "llama7b-stack", "--layers", "1", "--intermediate", "128", "--heads", "4",
        "--vocab", "320", "--repeats", "1"]


def test_bench_onnx_quantized_head_rows(tmp_path, capsys):
    bench = benchmark_scripts.load("bench_onnx")
    out = tmp_path / "onnx.json"
    assert bench.main([*TINY, "--hidden", "64", "--prompt", "8", "--steps", "2", "--no-builder",
                       "--work", str(tmp_path / "work"), "--variants", "auto acc0", "auto acc4 int4 head",
                       "auto acc4 int8 head", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["auto acc0", "auto acc4 int4 head", "auto acc4 int8 head"]
    assert rows["auto acc0"]["exact"] == "true"
    assert "lm head int4 (not exact)" in rows["auto acc4 int4 head"]["exact"]
    assert rows["auto acc4 int4 head"]["bytes"] < rows["auto acc0"]["bytes"]
    assert "| auto acc4 int4 head |" in capsys.readouterr().out


def test_bench_gguf_q6_k_row(tmp_path, capsys):
    bench = benchmark_scripts.load("bench_gguf")
    out = tmp_path / "gguf.json"
    assert bench.main([*TINY, "--hidden", "256", "--prompt-tokens", "8", "--decode-tokens", "2", "--threads", "1",
                       "--work", str(tmp_path / "work"), "--variants", "ours q4_1", "ours q4_1 q6_k emb",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["ours q4_1", "ours q4_1 q6_k emb"]
    assert "requantized to q6_k" in rows["ours q4_1 q6_k emb"]["exact"]
    assert rows["ours q4_1 q6_k emb"]["bytes"] < rows["ours q4_1"]["bytes"]
    assert all(r["decode_tok_s"] > 0 for r in rows.values())
    assert "| ours q4_1 q6_k emb |" in capsys.readouterr().out
