"""Training checkpoints: everything needed to continue a QA-LoRA run exactly where it stopped.

A checkpoint is a directory ``step-NNNNNN`` inside the run's checkpoint directory, written
atomically (temporary directory, then rename), in safetensors and JSON only (nothing is
unpickled on resume):

- ``tensors.safetensors``: the adapter factors (``<module>.lora_A`` / ``.lora_B``), AdamW's
  per-parameter state (``optim.<i>.exp_avg``, ``.exp_avg_sq``, ``.step``, ``i`` the index in the
  fixed parameter order of ``train.adapter_parameters``) and the CPU RNG state (``rng.cpu``);
- ``state.json``: format version, step, the optimizer's param groups, the scheduler's state, the
  batch stream's position, the losses and log rows so far, tokens seen, the held-out loss
  before training, and what the run depends on (config, base fingerprint, data sha256) so that a
  resume against anything else is refused.

Only the newest ``keep`` checkpoints are kept; older ones are renamed away before they are
deleted, and the hidden temporaries of killed runs are removed at the next save. ``train`` writes
a checkpoint only after every rank finished the step (rank 0 writes; the others wait), and a
resume reads the newest complete one, so a SIGKILL at any moment costs at most the steps since it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qalora_export.errors import ConfigError
from qalora_export.storage.atomic import _temp_prefix, atomic_output_dir, remove_stale_siblings

CHECKPOINT_VERSION = 1
TENSORS = "tensors.safetensors"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_LEFTOVER = re.compile(r"^\.(step-\d{6,})\.")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (partial temporaries never match)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(root: Path, step: int, named_params: list, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        tensors[name] = p.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for index, per_param in opt["state"].items():
        for key, value in per_param.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.cpu"] = torch.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    full = {"format_version": CHECKPOINT_VERSION, "step": step, "param_groups": groups, "scheduler": sched, **state}
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"step-{step:06d}"
    with atomic_output_dir(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(full) + "\n")
    for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
        _remove_checkpoint(old)
    _remove_leftovers(root)
    return path


def _remove_checkpoint(path: Path) -> None:
    """Rename, then delete: a kill during the deletion never leaves a half-deleted ``step-N``
    that still looks complete (its ``state.json`` present, its tensors gone)."""
    trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
    try:
        os.rename(path, trash / path.name)
    except OSError:
        shutil.rmtree(trash, ignore_errors=True)
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Hidden temporaries of killed runs (a checkpoint being written, one being deleted): removed
    once their process is gone, whatever step they belonged to."""
    for entry in root.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match is not None:
            remove_stale_siblings(root / match.group(1))


def load_checkpoint(path: Path, named_params: list, optimizer: torch.optim.Optimizer, scheduler,
                    expect: dict) -> dict:
    """Restore factors, optimizer, scheduler and RNG from ``path``; return its ``state.json``.

    Raises:
        ConfigError: the checkpoint belongs to another run (``expect``'s keys differ) or version.
    """
    state = json.loads((path / STATE).read_text())
    if state.get("format_version") != CHECKPOINT_VERSION:
        raise ConfigError(f"{path}: checkpoint format {state.get('format_version')!r}, expected {CHECKPOINT_VERSION}")
    for key, value in expect.items():
        if state.get(key) != value:
            raise ConfigError(
                f"--resume: {path} was written by a run with another {key} ({state.get(key)!r} vs now "
                f"{value!r}); resume with the same base, data and settings, or start a new run without --resume"
            )
    with safe_open(str(path / TENSORS), "pt") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for name, p in named_params:
                p.copy_(f.get_tensor(name).to(p.device))
        opt_state: dict = {}
        for key in keys:
            if key.startswith("optim."):
                _, index, field = key.split(".", 2)
                opt_state.setdefault(int(index), {})[field] = f.get_tensor(key)
        rng = f.get_tensor("rng.cpu")
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    sched = dict(state["scheduler"])
    sched["lr_lambdas"] = [None] * len(optimizer.param_groups)
    scheduler.load_state_dict(sched)
    torch.set_rng_state(rng)
    return state


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = checkpoint_dirs(root)
    return found[-1] if found else None
