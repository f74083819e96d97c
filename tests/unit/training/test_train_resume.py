"""Checkpoints every N steps and --resume: an interrupted run (an exception in-process, or the CLI
killed with SIGKILL), resumed, reproduces the uninterrupted run's loss curve and adapter exactly;
a resume against another base, data or settings is refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tiny_models
from qalora_export.errors import ConfigError
from qalora_export.training.config import TrainConfig
from qalora_export.training.train import iter_training_log, train_adapter
from qalora_export.training.checkpoint import checkpoint_dirs
from test_train import FAST, GROUP_SIZE, copy_task, write_jsonl


class Interrupted(Exception):
    pass


def stop_after(k: int):
    def progress(step: int, loss: float) -> None:
        if step == k:
            raise Interrupted
    return progress


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=GROUP_SIZE, layers=1)
    data = write_jsonl(tmp_path / "train.jsonl", copy_task(40))
    config = TrainConfig(**{**FAST, "steps": 7}, checkpoint_every=2, keep_checkpoints=2)
    full = train_adapter(base, data, tmp_path / "full", config)

    with pytest.raises(Interrupted):  # dies during step 5, after the step-4 checkpoint
        train_adapter(base, data, tmp_path / "resumed", config, progress=stop_after(5))
    ckpts = tmp_path / "resumed.checkpoints"
    assert [p.name for p in checkpoint_dirs(ckpts)] == ["step-000002", "step-000004"]
    assert not (tmp_path / "resumed").exists()

    with pytest.raises(ConfigError, match="another config"):
        train_adapter(base, data, tmp_path / "resumed", TrainConfig(**{**FAST, "steps": 7, "lr": 1e-3},
                                                                    checkpoint_every=2), resume=True)
    resumed = train_adapter(base, data, tmp_path / "resumed", config, resume=True)
    assert resumed.losses == full.losses  # bit for bit
    assert resumed.held_out_loss_before == full.held_out_loss_before
    assert resumed.held_out_loss_after == full.held_out_loss_after
    assert digest(tmp_path / "resumed" / "adapter_model.safetensors") == digest(tmp_path / "full" / "adapter_model.safetensors")
    assert [p.name for p in checkpoint_dirs(ckpts)] == ["step-000004", "step-000006"]


# ----------------------------------------------------------------------------- SIGKILL


@pytest.fixture
def one_torch_thread():
    """One OpenMP thread here and in the CLI child (OMP_NUM_THREADS=1), so that the in-process
    reference and the killed-and-resumed CLI runs do the same float operations."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, one_torch_thread):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=GROUP_SIZE, layers=1)
    data = write_jsonl(tmp_path / "train.jsonl", copy_task(40))
    settings = dict(rank=4, alpha=8.0, batch_size=4, max_length=32, lr=1e-2, steps=40, held_out=8)
    reference = train_adapter(base, data, tmp_path / "reference", TrainConfig(**settings, checkpoint_every=5))

    out = tmp_path / "adapter"
    argv = [sys.executable, "-m", "qalora_export.cli", "train", str(base), "--data", str(data), "-o", str(out),
            "--checkpoint-every", "5", "--keep-checkpoints", "2"]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    ckpts = tmp_path / "adapter.checkpoints"
    with open(tmp_path / "killed.log", "w") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240
        while not checkpoint_dirs(ckpts) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)  # right after the first checkpoint: 35 steps still to go
        child.wait()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert not out.exists()
    kept = [json.loads(line) for line in (tmp_path / "adapter.metrics.jsonl").read_text().splitlines()]
    assert len(kept) >= 5 and kept[0]["step"] == 1  # the killed run's rows survived it

    resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in iter_training_log(out)] == reference.losses  # the loss curve, bit for bit
    assert digest(out / "adapter_model.safetensors") == digest(tmp_path / "reference" / "adapter_model.safetensors")
    rows = [json.loads(line) for line in (tmp_path / "adapter.metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))  # each step once: rows past the checkpoint replaced
    assert [r["loss"] for r in rows] == reference.losses
    assert [p.name for p in checkpoint_dirs(ckpts)] == ["step-000030", "step-000035"]
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]  # the killed run's temporaries are gone


def test_resume_refuses_another_base_or_data(tmp_path):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=GROUP_SIZE, layers=1)
    other_base = tiny_models.make_tiny_base(tmp_path / "other", bits=4, group_size=GROUP_SIZE, layers=1, seed=1)
    data = write_jsonl(tmp_path / "train.jsonl", copy_task(40))
    other_data = write_jsonl(tmp_path / "other.jsonl", copy_task(40, seed=1))
    config = TrainConfig(**{**FAST, "steps": 4}, checkpoint_every=2)
    with pytest.raises(Interrupted):
        train_adapter(base, data, tmp_path / "run", config, progress=stop_after(3))
    with pytest.raises(ConfigError, match="another base_fingerprint"):
        train_adapter(other_base, data, tmp_path / "run", config, resume=True)
    with pytest.raises(ConfigError, match="another data_sha256"):
        train_adapter(base, other_data, tmp_path / "run", config, resume=True)
    assert not (tmp_path / "run").exists()
    assert train_adapter(base, data, tmp_path / "run", config, resume=True).steps == 4
