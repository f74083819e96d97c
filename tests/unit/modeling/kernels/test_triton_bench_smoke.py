"""benchmarks/bench_kernels.py: its built-in kernel checks run (on CPU through Triton's interpreter,
at a tiny shape) and pass, and without CUDA it exits with status 1 and says why. Nothing is timed."""

from __future__ import annotations

import pytest
import torch

import benchmark_scripts
import kernel_testing as kt

kt.setup()


def load_bench():
    return benchmark_scripts.load("bench_kernels")


@pytest.mark.parametrize("bits,act_order", [(4, False), (3, True)])
def test_kernel_checks_pass_at_a_small_shape(bits, act_order):
    bench = load_bench()
    report = bench.check_kernels(kt.DEVICE, bits, 16, act_order, shape=(96, 37), tokens=6)
    assert report["dequant_worst_error_over_bound"] <= 1.0
    assert report["gemv_worst_error_over_bound"] <= 1.0
    assert report["train_step_float32_worst_relative_error"] <= 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit")
def test_exits_with_a_message_without_cuda(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr("sys.argv", ["bench_kernels.py"])
    assert bench.main() == 1
    assert "no CUDA device" in capsys.readouterr().err
