"""benchmarks/bench_mlx.py runs end to end on a tiny random base: both MLX exports and the fp16 twin
are written, run in mlx-lm and reported. Nothing is timed or compared."""

from __future__ import annotations

import json

import benchmark_scripts
import pytest
import tiny_models

pytest.importorskip("mlx_lm")


def test_bench_mlx_smoke(tmp_path, capsys):
    bench = benchmark_scripts.load("bench_mlx")
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32)
    adapter = tiny_models.make_random_adapter(base, tmp_path / "adapter", magnitude=0.3)
    work = tmp_path / "work"
    assert bench.main(["--base", str(base), "--adapter", str(adapter), "--work", str(work), "--repeats", "1",
                       "--prompt-tokens", "4", "--decode-tokens", "2"]) == 0
    rows = json.loads((work / "bench_mlx.json").read_text())
    assert list(rows) == ["ours fp32 scales (exact)", "ours fp16 scales (rounded)", "fp16 (same weights)"]
    assert all(r["decode_tps"] > 0 and r["bytes"] > 0 for r in rows.values())
    assert rows["fp16 (same weights)"]["size_ratio"] == 1.0
    assert "| ours fp32 scales (exact) |" in capsys.readouterr().out
