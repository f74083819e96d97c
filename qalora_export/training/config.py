"""What a training run computes and what it returned: :class:`TrainConfig` (validated on
construction; a typed error names the flag) and :class:`TrainResult`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from qalora_export.checkpoint.adapter_files import POOLINGS
from qalora_export.errors import ConfigError
from qalora_export.modeling.model import TARGET_MODULES

TRAINING_LOG = "training_log.jsonl"
SCHEDULES = ("cosine", "linear", "constant")
# How a run executes, not what it computes: left out of the identity a --resume must match, so a
# run may resume with another accumulation, checkpointing or checkpoint cadence (and world size).
EXECUTION_FIELDS = ("checkpoint_every", "keep_checkpoints", "grad_accum", "gradient_checkpointing")


@dataclass
class TrainConfig:
    """Hyper-parameters of one QA-LoRA run (the CLI's ``train`` flags).

    Attributes:
        rank / alpha: adapter rank ``r`` and ``lora_alpha`` (scale ``alpha / r``).
        steps: optimizer steps (each one global batch of ``batch_size`` examples).
        lr: peak learning rate. QA-LoRA adapters see pooled group sums, one value per group, and
            short runs on small data need a larger rate than full LoRA recipes use; 1e-3 learns
            the fixture task in a few dozen steps.
        batch_size: examples per optimizer step, over all processes of a data-parallel run (the
            global batch; the stream wraps around epochs, every batch full). Each of ``W``
            processes takes ``batch_size / W`` of them (sizes differ by at most one).
        max_length: tokens per example; longer ones are dropped or truncated (``on_overlong``).
        seed: adapter initialisation, held-out split and batch order.
        held_out: fraction in [0, 1) or count of examples held out for the loss before/after
            (0: none).
        pooling: convention recorded with the adapter ("peft" loads in PEFT; see adapter.py).
        target_modules: projection names that get an adapter.
        on_overlong: "drop" or "truncate" examples longer than ``max_length`` (counted either way).
        warmup_steps: linear warmup from 0 to ``lr``.
        schedule: "cosine" or "linear" decay to 0 after warmup, or "constant".
        weight_decay: AdamW weight decay on the adapter factors.
        grad_clip: clip the global gradient norm to this (0: no clipping).
        log_every: write a ``training_log.jsonl`` row every this many steps (and the last).
        integer_zeros: integer-zero training (``--integer-zeros``): the per-group zero shift is
            rounded (straight-through) and clamped to the base's GPTQ zero range in the forward,
            so the saved adapter folds into integral, in-range zeros and ``merge --to gptq
            --require-exact`` succeeds (see ``modeling/qalora_linear.py`` and ``core/fold.py``).
        checkpoint_every: write a resumable checkpoint every this many steps (0: none); see
            :mod:`qalora_export.training.checkpoint`.
        keep_checkpoints: keep the newest this many checkpoints.
        grad_accum: split each process's share of the batch into this many micro-batches, one
            forward/backward each, gradients accumulated (``--grad-accum``): the same step as one
            big batch, up to float summation order, with a micro-batch's activation memory.
        gradient_checkpointing: recompute each decoder layer's activations in the backward
            instead of keeping them (``--gradient-checkpointing``; same losses and gradients,
            less memory, about one more forward of time).
    """

    rank: int = 16
    alpha: float = 32.0
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    held_out: float | int = 0.1
    pooling: str = "peft"
    target_modules: tuple[str, ...] = TARGET_MODULES
    on_overlong: str = "drop"
    warmup_steps: int = 5
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 1
    integer_zeros: bool = False
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    grad_accum: int = 1
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag for any value out of range."""
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

        if not isinstance(self.integer_zeros, bool):
            raise ConfigError(f"--integer-zeros must be a boolean, got {self.integer_zeros!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"--gradient-checkpointing must be a boolean, got {self.gradient_checkpointing!r}")
        for name in ("checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        for name in ("rank", "steps", "batch_size", "max_length", "log_every", "grad_accum"):
            positive_int(name)
        for name, lo in (("alpha", None), ("lr", None), ("weight_decay", 0.0), ("grad_clip", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value < lo if lo is not None else value <= 0):
                rule = f">= {lo}" if lo is not None else "> 0"
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number {rule}, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be an integer >= 0, got {self.warmup_steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed!r}")
        held = self.held_out
        if isinstance(held, bool) or not isinstance(held, (int, float)) \
                or (isinstance(held, float) and not 0.0 <= held < 1.0) or (isinstance(held, int) and held < 0):
            raise ConfigError(f"--held-out must be a fraction in [0, 1) or a count >= 0, got {held!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling {self.pooling!r} is not a convention; choose one of {POOLINGS}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.on_overlong not in ("drop", "truncate"):
            raise ConfigError(f"--on-overlong {self.on_overlong!r} must be 'drop' or 'truncate'")
        unknown = sorted(set(self.target_modules) - set(TARGET_MODULES))
        if not self.target_modules or unknown:
            raise ConfigError(
                f"--target-modules {list(self.target_modules)!r}: "
                + (f"{unknown} are not QA-LoRA targets" if unknown else "empty")
                + f"; choose among {list(TARGET_MODULES)}"
            )


@dataclass
class TrainResult:
    """What a run did; ``losses`` holds every step's mean response-token loss (global batch).

    Held-out losses are None when no held-out set was asked for (``held_out = 0``). ``tokens``
    counts the non-padding tokens of every step so far (all processes); ``seconds``,
    ``seconds_per_step`` and ``tokens_per_second`` measure the steps this process ran (a resumed
    run: only its own); ``world_size`` is the number of data-parallel processes; ``metrics_path``
    the metrics JSONL written, if any. Every rank returns the same values.
    """

    adapter_dir: str
    steps: int
    train_loss_first: float
    train_loss_last: float
    held_out_loss_before: Optional[float]
    held_out_loss_after: Optional[float]
    tokens: int
    seconds: float
    dataset_stats: dict
    losses: list[float] = field(default_factory=list)
    train_examples: int = 0
    held_out_examples: int = 0
    seconds_per_step: float = 0.0
    tokens_per_second: float = 0.0
    world_size: int = 1
    metrics_path: Optional[str] = None
