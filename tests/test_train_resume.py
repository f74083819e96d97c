"""Checkpoints every N steps and --resume: an interrupted run, resumed, reproduces the
uninterrupted run's loss curve and adapter exactly; a resume against other settings is refused."""

from __future__ import annotations

import hashlib

import pytest

import tiny_models
from qalora_export.errors import ConfigError
from qalora_export.train import TrainConfig, train_adapter
from qalora_export.train_checkpoint import checkpoint_dirs
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
