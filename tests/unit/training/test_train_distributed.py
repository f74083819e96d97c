"""Data-parallel training, gradient accumulation and gradient checkpointing (train_distributed.py).

The contract tested: ``--batch-size`` is the global batch, so two gloo processes on CPU reach the
adapter one process reaches with the same settings; ``--grad-accum`` gives the step of one big
batch; ``--gradient-checkpointing`` changes memory, not numbers; a failure on one rank stops every
rank with an error instead of a hang.

Why the two-process and accumulation comparisons are ``allclose``, not bit-exact: one process sums
the gradient of the global mean over the whole batch in one backward, while two processes (or
micro-batches) each sum their share and ``all_reduce`` (or autograd accumulation) adds the partial
sums: the same terms in another order. Each share is also padded to its own longest example, so
the GEMMs have other shapes and block their float32 sums differently. The differences start at
float32 rounding (~1e-7 relative) and AdamW's normalised updates carry them through a few steps;
measured: at most ~1e-7 absolute / ~2e-6 relative on the factors after 6 steps. The tolerance
``rtol=1e-4, atol=1e-6`` is far below what one step changes the factors by (~1e-2 relative at lr
1e-2), so a wrong normalisation or a lost share would fail it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

import tiny_models
from qalora_export.checkpoint.adapter_files import load_adapter
from qalora_export.training.examples import collate
from qalora_export.errors import ConfigError
from qalora_export.modeling.model import build_model
from qalora_export.training.config import TrainConfig
from qalora_export.training.optim import adapter_parameters, init_adapters, lr_lambda, make_optimizer, train_step
from qalora_export.training.prepare import load_tokenizer, prepare_data
from qalora_export.training.train import train_adapter
from qalora_export.training.distributed import (enable_gradient_checkpointing, launcher_rank, setup_distributed,
                                             shard_bounds)
from test_train import GROUP_SIZE, copy_task, write_jsonl

ROOT = Path(__file__).resolve().parents[3]
RTOL, ATOL = 1e-4, 1e-6  # see the module docstring
# What the CLI run below uses (the CLI's defaults for everything else: warmup 5, cosine, clip 1.0).
CLI_SETTINGS = dict(rank=4, alpha=8.0, batch_size=7, max_length=32, lr=1e-2, steps=6, held_out=8)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: two spinning OpenMP threads that contend with other
    work make each step 10-100x slower than one thread (measured); the numbers are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_base(tmp_path_factory.mktemp("dist") / "base", bits=4, group_size=GROUP_SIZE,
                                      layers=1)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dist-data") / "train.jsonl", copy_task(48, seed=5))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_adapter(a_dir: Path, b_dir: Path) -> None:
    a, b = load_adapter(a_dir), load_adapter(b_dir)
    assert sorted(a.layers) == sorted(b.layers)
    for name in a.layers:
        for factor in ("lora_A", "lora_B"):
            x, y = getattr(a.layers[name], factor), getattr(b.layers[name], factor)
            assert torch.allclose(x, y, rtol=RTOL, atol=ATOL), (name, factor, float((x - y).abs().max()))
    assert any(float(layer.lora_B.abs().max()) > 1e-3 for layer in a.layers.values())  # it did train


def log_losses(adapter_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (adapter_dir / "training_log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- two processes


def test_two_gloo_processes_reach_the_adapter_of_one(base, data_file, tmp_path):
    """torchrun, 2 CPU processes, the real CLI (no code path of its own); global batch 7 = shares 4 + 3."""
    single = train_adapter(base, data_file, tmp_path / "one", TrainConfig(**CLI_SETTINGS))
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "qalora_export.cli", "train", str(base), "--data", str(data_file),
            "-o", str(tmp_path / "two")]
    for key, value in CLI_SETTINGS.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("trained QA-LoRA adapter") == 1  # rank 1 reports nothing
    assert "world_size               2" in proc.stdout

    assert_same_adapter(tmp_path / "one", tmp_path / "two")
    two = log_losses(tmp_path / "two")
    assert len(two) == CLI_SETTINGS["steps"]
    assert two == pytest.approx(single.losses, rel=1e-5)
    meta = load_adapter(tmp_path / "two").extra["training"]
    assert meta["world_size"] == 2 and meta["batch_size"] == 7
    assert meta["held_out_loss_after"] == pytest.approx(single.held_out_loss_after, rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "two.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))  # written by rank 0 only: no step twice
    assert not (tmp_path / "two.checkpoints").exists()


# ----------------------------------------------------------------------------- failures


def _failing_worker(rank: int, world: int, port: int, base: str, data: str, root: str) -> None:
    """One rank of the failure scenarios; writes what each raised to ``root/rank<r>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import qalora_export.training.distributed as td

    # A group the caller opened (as an accelerate Accelerator would): train_adapter uses it as is.
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    config = TrainConfig(**{**CLI_SETTINGS, "steps": 3})
    outcome: dict[str, str] = {}

    def attempt(name: str, **kwargs) -> None:
        try:
            train_adapter(base, data, Path(root) / name, config, **kwargs)
            outcome[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
            outcome[name] = f"{type(exc).__name__}: {exc}"

    # 1. rank 1's forward fails in step 2: rank 1 raises its own error, rank 0 a TrainingError.
    real, calls = td.response_loss, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            raise RuntimeError("injected failure in rank 1's forward")
        return real(*args, **kwargs)

    td.response_loss = flaky
    attempt("step-failure")
    td.response_loss = real
    # 2. rank 0 cannot open its metrics file: the same typed error on both ranks.
    attempt("metrics-unwritable", metrics_path=Path(root) / "a-file" / "metrics.jsonl")
    # 3. rank 0's progress callback raises at step 2: rank 1 stops with a typed error.
    attempt("progress-raises", progress=lambda step, loss: (_ for _ in ()).throw(ValueError("stop")) if step == 2 else None)
    # 4. afterwards the group still works: a full run on both ranks.
    attempt("ok")
    dist.destroy_process_group()
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(outcome))


def _run_worker(rank, *args):
    try:
        _failing_worker(rank, *args)
    except BaseException:
        (Path(args[-1]) / f"rank{rank}.crash").write_text(traceback.format_exc())
        raise


def test_a_failure_on_one_rank_stops_every_rank_with_an_error(base, data_file, tmp_path):
    import torch.multiprocessing as mp

    (tmp_path / "a-file").write_text("not a directory")
    mp.start_processes(_run_worker, args=(2, free_port(), str(base), str(data_file), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    crashes = list(tmp_path.glob("rank*.crash"))
    assert not crashes, crashes[0].read_text()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["step-failure"] == "RuntimeError: injected failure in rank 1's forward"
    assert r0["step-failure"].startswith("TrainingError: rank(s) [1] failed at step 2")
    assert r0["metrics-unwritable"].startswith("OutputWriteError: ")
    assert r1["metrics-unwritable"].startswith("OutputWriteError: rank 0 failed while opening the metrics file")
    assert r0["progress-raises"] == "ValueError: stop"
    assert r1["progress-raises"].startswith("TrainingError: rank 0 failed while logging or checkpointing step 2")
    assert r0["ok"] == r1["ok"] == "ok"
    assert (tmp_path / "ok" / "adapter_model.safetensors").is_file()
    for name in ("step-failure", "metrics-unwritable", "progress-raises"):
        assert not (tmp_path / name).exists()  # nothing written


def test_launcher_variables_are_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        setup_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        setup_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert setup_distributed("cpu").world_size == 1
    # an MPI launcher's variables (accelerate launch --cpu runs mpirun) count as a launcher too
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT not set"):
        setup_distributed("cpu")
    assert launcher_rank() == 1


def test_shares_cover_the_batch_once():
    for n in range(1, 12):
        for world in range(1, 5):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(hi == lo2 for (_, hi), (lo2, _) in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


# ----------------------------------------------------------------------------- accumulation


def test_grad_accum_gives_the_step_of_one_big_batch(base, data_file, tmp_path):
    config = dict(CLI_SETTINGS, batch_size=8, steps=5)
    one = train_adapter(base, data_file, tmp_path / "one", TrainConfig(**config))
    four = train_adapter(base, data_file, tmp_path / "four", TrainConfig(**config, grad_accum=4))
    assert four.losses == pytest.approx(one.losses, rel=1e-5)
    assert_same_adapter(tmp_path / "one", tmp_path / "four")
    assert load_adapter(tmp_path / "four").extra["training"]["grad_accum"] == 4


def test_grad_accum_needs_an_example_per_micro_batch(base, data_file, tmp_path):
    with pytest.raises(ConfigError, match=r"--batch-size 3 is the global batch.*--grad-accum 4"):
        train_adapter(base, data_file, tmp_path / "out", TrainConfig(**dict(CLI_SETTINGS, batch_size=3), grad_accum=4))
    with pytest.raises(ConfigError, match="--grad-accum"):
        train_adapter(base, data_file, tmp_path / "out", TrainConfig(**CLI_SETTINGS, grad_accum=0))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(base, data_file):
    config = TrainConfig(**CLI_SETTINGS)
    data = prepare_data(load_tokenizer(base), data_file, config)
    batch = collate(data.train[:6], data.pad_token_id)
    results = []
    for checkpointing in (False, True):
        model = build_model(base, train_rank=config.rank, train_alpha=config.alpha)
        init_adapters(model, 0)
        if checkpointing:
            enable_gradient_checkpointing(model)
        named = adapter_parameters(model)
        params = [p for _, p in named]
        optimizer = make_optimizer(params, config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        losses, grads = [], []
        for _ in range(3):  # step 1 has lora_B = 0 (A gets no gradient); later steps exercise both
            loss, _, _ = train_step(model, batch, optimizer, scheduler, params, config, torch.device("cpu"))
            losses.append(loss)
            grads.append({n: p.grad.clone() for n, p in named})
        results.append((losses, grads))
    # Exact: the recomputation runs the same CPU kernels on the same shapes as the first forward.
    (plain_losses, plain_grads), (ckpt_losses, ckpt_grads) = results
    assert ckpt_losses == plain_losses
    for g_plain, g_ckpt in zip(plain_grads, ckpt_grads):
        for name in g_plain:
            assert torch.equal(g_ckpt[name], g_plain[name]), name
    assert any(float(g.abs().max()) > 0 for g in plain_grads[-1].values())


def test_gradient_checkpointing_run_matches(base, data_file, tmp_path):
    config = dict(CLI_SETTINGS, steps=3)
    plain = train_adapter(base, data_file, tmp_path / "plain", TrainConfig(**config))
    ckpt = train_adapter(base, data_file, tmp_path / "ckpt", TrainConfig(**config, gradient_checkpointing=True))
    assert ckpt.losses == plain.losses
    a, b = load_adapter(tmp_path / "plain"), load_adapter(tmp_path / "ckpt")
    assert all(torch.equal(a.layers[n].lora_B, b.layers[n].lora_B) and torch.equal(a.layers[n].lora_A, b.layers[n].lora_A)
               for n in a.layers)
    assert load_adapter(tmp_path / "ckpt").extra["training"]["gradient_checkpointing"] is True
