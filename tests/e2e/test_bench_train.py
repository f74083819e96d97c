"""benchmarks/bench_train.py runs end to end at a tiny size: every variant trains in its own
process and reports throughput, peak memory and finite losses. Nothing is timed or compared."""

from __future__ import annotations

import json
import math

import benchmark_scripts


def load_bench():
    return benchmark_scripts.load("bench_train")


def test_bench_train_smoke(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "results.json"
    assert bench.main(["--workloads", "stack", "--layers", "1", "--hidden", "64", "--intermediate", "128",
                       "--heads", "4", "--vocab", "96", "--tokens", "48", "--seq-len", "24", "--group-size", "32",
                       "--rank", "4", "--steps", "1", "--warmup", "1", "--threads", "1",
                       "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results] == list(bench.VARIANTS)
    for r in results:
        assert r["tokens"] == 48 and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
        assert r["trainable_parameters"] > 0 and all(math.isfinite(x) for x in r["losses"])
    table = capsys.readouterr().out
    assert table.count("| stack |") == len(bench.VARIANTS) and "vs lora" in table
