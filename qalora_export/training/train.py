"""QA-LoRA training on a frozen, packed, quantized base: a plain, deterministic loop.

What one call of :func:`train_adapter` does:

1. read the JSONL data (``data.py``), split off a held-out set, tokenize with the base's tokenizer
   (chat template; loss on response tokens only);
2. build the unmerged model (``model.build_model``): every quantized projection in
   ``target_modules`` becomes a :class:`QALoRALinear` with fresh factors ``A`` ``[r, G]``
   (Kaiming-uniform, seeded) and ``B`` ``[out, r]`` (zeros, so step 0 is the base model); the
   base stays packed and is dequantized at every forward; only ``A`` and ``B`` get gradients;
3. AdamW over the adapter factors, linear warmup then cosine (or linear, or constant) decay,
   gradient clipping, shuffled batches from a seeded stream (no two runs with the same seed
   differ), bf16 autocast on CUDA and float32 on CPU;
4. held-out loss before and after; the adapter saved atomically in PEFT's layout with our
   metadata (pooling convention, pooling over the quantization groups, the base's fingerprint,
   the training settings and the data file's sha256), a ``training_log.jsonl`` and a
   ``loss_curve.png``;
5. optionally: data-parallel over the processes of ``torchrun`` / ``accelerate launch``
   (``train_distributed.py``: ``batch_size`` is the global batch, gradients all-reduced, rank 0
   writes), gradient accumulation (``grad_accum`` micro-batches per rank), gradient
   checkpointing, checkpoints every N steps with ``resume`` (``train_checkpoint.py``), a metrics
   JSONL streamed while training and TensorBoard scalars (``metrics_log.py``).

The pieces (:class:`BatchStream`, :func:`lr_lambda`, :func:`make_optimizer`, :func:`train_step`,
:func:`adapter_from_model`, ``train_distributed.data_parallel_step``) are separate so that
benchmarks and other loops can reuse them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from qalora_export.checkpoint.adapter_files import save_adapter
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import zero_range
from qalora_export.checkpoint.tokenizer_check import check_tokenizer_matches
from qalora_export.core.adapter import INTEGER_ZEROS_KEY, ZERO_RANGE_KEY
from qalora_export.errors import ConfigError
from qalora_export.modeling.model import build_model, check_supported, qalora_modules
from qalora_export.storage.atomic import check_output_path
from qalora_export.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from qalora_export.training.config import EXECUTION_FIELDS, TRAINING_LOG, TrainConfig, TrainResult
from qalora_export.training.distributed import (
    DistContext,
    data_parallel_step,
    enable_gradient_checkpointing,
    setup_distributed,
)
from qalora_export.training.evaluate import held_out_loss
from qalora_export.training.metrics_log import (
    LOSS_CURVE,
    MetricsLog,
    check_matplotlib,
    check_tensorboard,
    loss_curve_png,
)
from qalora_export.training.optim import (
    adapter_from_model,
    adapter_parameters,
    init_adapters,
    lr_lambda,
    make_optimizer,
)
from qalora_export.training.prepare import BatchStream, PreparedData, file_sha256, load_tokenizer, prepare_data

# --------------------------------------------------------------------------------------- the run


def train_adapter(base_dir: Path | str, data_path: Path | str, out_dir: Path | str, config: TrainConfig,
                  overwrite: bool = False, progress: Optional[Callable[[int, float], None]] = None,
                  device: str = "cpu", resume: bool = False,
                  checkpoint_dir: Optional[Path | str] = None, *,
                  on_step: Optional[Callable[[dict], None]] = None,
                  metrics_path: Optional[Path | str] = None,
                  tensorboard_dir: Optional[Path | str] = None,
                  loss_curve: bool = True) -> TrainResult:
    """Train a QA-LoRA adapter on the GPTQ base ``base_dir`` and save it to ``out_dir``.

    Runs as one process, or as one of ``W`` data-parallel processes when started by ``torchrun``
    or ``accelerate launch`` (``train_distributed.py``): every process calls this with the same
    arguments; ``config.batch_size`` is the global batch; rank 0 evaluates, writes and calls the
    callbacks; the adapter is the one process's result up to float summation order.

    Args:
        base_dir: AutoGPTQ checkpoint directory (with tokenizer files).
        data_path: JSONL instruction data (``instruction``/``input``/``output`` or ``messages``).
        out_dir: adapter directory to create (refused if it exists, unless ``overwrite``).
        config: hyper-parameters; validated first.
        progress: called after every step with (step, loss) on rank 0; nothing is printed.
        device: "cpu" or "cuda" (bf16 autocast on CUDA; with several processes each takes
            ``cuda:LOCAL_RANK``); "cuda:n" for one process.
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (a fresh run when there
            is none); refused when it was written with another base, data or config. The resumed
            run reproduces the uninterrupted run's losses and adapter exactly (same number of
            processes and ``grad_accum``; others agree up to float summation order).
        checkpoint_dir: where ``config.checkpoint_every`` checkpoints go; default
            ``<out_dir>.checkpoints``.
        on_step: called after every step on rank 0 with that step's metrics row (the keys of the
            metrics JSONL, ``metrics_log.py``: step, loss, lr, tokens, response_tokens,
            tokens_per_s, grad_norm, seconds) — what a progress bar shows.
        metrics_path: stream one JSON row per logged step to this file while training (flushed,
            survives a SIGKILL; ``train --metrics-file``, whose default is
            ``metrics_log.default_metrics_path(out_dir)``); None writes none.
        tensorboard_dir: also write TensorBoard scalars there (needs ``pip install tensorboard``).
        loss_curve: draw ``loss_curve.png`` into the adapter directory (matplotlib).

    Returns:
        a :class:`TrainResult` (the same losses on every rank); the adapter directory holds PEFT's
        files, ``qalora_export.json``, ``training_log.jsonl`` and ``loss_curve.png``.

    Raises:
        ConfigError, DataError, CheckpointError, TrainingError, OutputExistsError — before
        anything is written (a failed step or a failed write on one rank is raised on every rank).

    Example::

        result = train_adapter("base-w4g32", "train.jsonl", "adapter", TrainConfig(steps=60))
        print(result.held_out_loss_before, "->", result.held_out_loss_after)
    """
    config.validate()
    base_dir, data_path, out_dir = Path(base_dir), Path(data_path), Path(out_dir)
    check_output_path(out_dir, overwrite)  # fail before minutes of training, not after
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if tensorboard_dir is not None:
        check_tensorboard()
    if loss_curve:
        check_matplotlib()
    ckpt = GPTQCheckpoint(base_dir)  # a float model is refused here: "not a GPTQ checkpoint"
    check_supported(ckpt.model_config, base_dir)  # before tokenizing the data, not after
    if ckpt.config.per_row:
        raise ConfigError(
            f"{base_dir}: group_size={ckpt.config.group_size} (one quantization group per row) leaves QA-LoRA "
            f"one pooled feature per layer, and its adapters no single pooling group size; quantize "
            f"the base with --group-size 32, 64 or 128"
        )
    check_tokenizer_matches(ckpt)
    tokenizer = load_tokenizer(base_dir)
    data = prepare_data(tokenizer, data_path, config)
    # Every process has read and checked the same inputs: the group opens only once none can fail.
    ctx = setup_distributed(dev)
    try:
        if config.batch_size < ctx.world_size * config.grad_accum:
            raise ConfigError(
                f"--batch-size {config.batch_size} is the global batch, too small for {ctx.world_size} process(es) "
                f"x --grad-accum {config.grad_accum} micro-batches of at least one example; raise --batch-size to "
                f"{ctx.world_size * config.grad_accum} or lower --grad-accum"
            )
        run = _Run(ctx, ckpt, data, config, base_dir, data_path, out_dir, overwrite)
        return run.train(progress, on_step, resume, checkpoint_dir,
                         Path(metrics_path) if metrics_path is not None else None,
                         Path(tensorboard_dir) if tensorboard_dir is not None else None, loss_curve)
    finally:
        ctx.close()


class _Run:
    """One training run's state (model, optimizer, data position, logs); see :func:`train_adapter`."""

    def __init__(self, ctx: DistContext, ckpt: GPTQCheckpoint, data: PreparedData, config: TrainConfig,
                 base_dir: Path, data_path: Path, out_dir: Path, overwrite: bool):
        self.ctx, self.ckpt, self.data, self.config = ctx, ckpt, data, config
        self.base_dir, self.data_path, self.out_dir, self.overwrite = base_dir, data_path, out_dir, overwrite
        dev = ctx.device
        self.int_range = zero_range(ckpt.config.bits, ckpt.config.checkpoint_format) if config.integer_zeros else None
        self.model = build_model(ckpt, train_rank=config.rank, train_alpha=float(config.alpha), pooling=config.pooling,
                                 compute_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                                 target_modules=tuple(config.target_modules), integer_zero_range=self.int_range)
        if not qalora_modules(self.model):
            raise ConfigError(f"{base_dir}: no quantized layer matches --target-modules {list(config.target_modules)}")
        init_adapters(self.model, config.seed)  # the same seed on every rank: identical replicas
        self.model.to(dev)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.named = adapter_parameters(self.model)
        self.params = [p for _, p in self.named]
        self.optimizer = make_optimizer(self.params, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.stream = BatchStream(len(data.train), config.batch_size, config.seed)
        self.data_sha256 = file_sha256(data_path)
        self.run_identity = {"config": json.loads(json.dumps(
                                 {k: v for k, v in asdict(config).items() if k not in EXECUTION_FIELDS})),
                             "base_fingerprint": ckpt.fingerprint(), "data_sha256": self.data_sha256}
        self.losses: list[float] = []
        self.log_rows: list[str] = []
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # training seconds of the run(s) this one resumes

    def evaluate_held_out(self) -> Optional[float]:
        if not self.data.held_out:
            return None
        dev = self.ctx.device
        # A float copy of the base for the evaluation only (CPU), small next to training's peak.
        return held_out_loss(self.model, self.data.held_out, self.data.pad_token_id,
                             max(self.config.batch_size, 8), dev, dev.type == "cpu")

    def train(self, progress, on_step, resume: bool, checkpoint_dir: Optional[Path | str],
              metrics_path: Optional[Path], tensorboard_dir: Optional[Path], loss_curve: bool) -> TrainResult:
        ctx, config = self.ctx, self.config
        ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else \
            self.out_dir.with_name(self.out_dir.name + ".checkpoints")
        first_step = 1
        latest = latest_checkpoint(ckpt_root) if resume else None
        if latest is not None:
            state = load_checkpoint(latest, self.named, self.optimizer, self.scheduler, self.run_identity)
            self.stream.load_state_dict(state["stream"])
            self.losses, self.log_rows = list(state["losses"]), list(state["log_rows"])
            self.tokens_seen = int(state["tokens"])
            self.elapsed_before = float(state.get("seconds", 0.0))
            before = state["held_out_loss_before"]
            first_step = int(state["step"]) + 1
        else:
            before = ctx.on_main(self.evaluate_held_out, "evaluating the held-out loss", share_float=True)

        def open_log() -> MetricsLog:
            log = MetricsLog(metrics_path, tensorboard_dir, self.log_rows, first_step)
            if latest is None:
                log.held_out(0, before)
            return log

        log = ctx.on_main(open_log, "opening the metrics file")

        def evaluate_after() -> Optional[float]:
            value = self.evaluate_held_out()
            if log is not None:
                log.held_out(config.steps, value)
            return value

        try:
            seconds, tokens_run = self._loop(first_step, before, ckpt_root, log, progress, on_step)
            after = ctx.on_main(evaluate_after, "evaluating the held-out loss", share_float=True)
        finally:
            if log is not None:
                log.close()
        ctx.on_main(lambda: self._save(before, after, loss_curve), f"saving the adapter to {self.out_dir}")
        steps_run = max(1, config.steps - first_step + 1)
        return TrainResult(
            adapter_dir=str(self.out_dir), steps=config.steps, train_loss_first=self.losses[0],
            train_loss_last=self.losses[-1], held_out_loss_before=before, held_out_loss_after=after,
            tokens=self.tokens_seen, seconds=seconds, dataset_stats=self.data.stats, losses=self.losses,
            train_examples=len(self.data.train), held_out_examples=len(self.data.held_out),
            seconds_per_step=seconds / steps_run, tokens_per_second=tokens_run / seconds if seconds > 0 else 0.0,
            world_size=ctx.world_size, metrics_path=str(metrics_path) if metrics_path is not None else None,
        )

    def _loop(self, first_step: int, before: Optional[float], ckpt_root: Path, log: Optional[MetricsLog],
              progress, on_step) -> tuple[float, int]:
        """Steps ``first_step..steps``; returns (seconds, tokens) of this process's share of the run."""
        ctx, config, data = self.ctx, self.config, self.data

        def bookkeeping(step: int, row: dict) -> None:  # rank 0, after every step
            if step % config.log_every == 0 or step == config.steps:
                self.log_rows.append(json.dumps(row))
                if log is not None:
                    log.write(row)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                save_checkpoint(ckpt_root, step, self.named, self.optimizer, self.scheduler, {
                    "stream": self.stream.state_dict(), "losses": self.losses, "log_rows": self.log_rows,
                    "tokens": self.tokens_seen, "held_out_loss_before": before, "seconds": row["seconds"],
                    **self.run_identity}, config.keep_checkpoints)
            if progress is not None:
                progress(step, row["loss"])
            if on_step is not None:
                on_step(row)

        start = time.perf_counter()
        tokens_at_start = self.tokens_seen
        for step in range(first_step, config.steps + 1):
            lr = self.scheduler.get_last_lr()[0]
            t0 = time.perf_counter()
            global_batch = [data.train[i] for i in self.stream.next_batch()]
            stats = data_parallel_step(self.model, global_batch, data.pad_token_id, self.optimizer, self.scheduler,
                                       self.params, config, ctx, step)
            step_seconds = time.perf_counter() - t0
            self.tokens_seen += stats.tokens
            self.losses.append(stats.loss)
            row = {"step": step, "loss": stats.loss, "lr": lr, "tokens": self.tokens_seen,
                   "response_tokens": stats.response_tokens,
                   "tokens_per_s": round(stats.tokens / step_seconds, 1) if step_seconds > 0 else 0.0,
                   "grad_norm": stats.grad_norm,
                   "seconds": round(self.elapsed_before + time.perf_counter() - start, 3)}
            ctx.on_main(lambda: bookkeeping(step, row), f"logging or checkpointing step {step}")
        return time.perf_counter() - start, self.tokens_seen - tokens_at_start

    def _save(self, before: Optional[float], after: Optional[float], loss_curve: bool) -> None:
        """Write the adapter directory (rank 0): factors, metadata, training log, loss curve."""
        config, ckpt, data = self.config, self.ckpt, self.data
        training = {
            "steps": config.steps, "lr": config.lr, "seed": config.seed, "batch_size": config.batch_size,
            "max_length": config.max_length, "schedule": config.schedule, "warmup_steps": config.warmup_steps,
            "weight_decay": config.weight_decay, "grad_clip": config.grad_clip, "on_overlong": config.on_overlong,
            "held_out": config.held_out, "data_file": self.data_path.name, "data_sha256": self.data_sha256,
            "train_examples": len(data.train), "held_out_examples": len(data.held_out), "tokens": self.tokens_seen,
            "train_loss_first": self.losses[0], "train_loss_last": self.losses[-1],
            "held_out_loss_before": before, "held_out_loss_after": after, "device": self.ctx.device.type,
            "integer_zeros": config.integer_zeros, "world_size": self.ctx.world_size,
            "grad_accum": config.grad_accum, "gradient_checkpointing": config.gradient_checkpointing,
        }
        extra: dict = {"training": training}
        if self.int_range is not None:  # read back by QALoRAAdapter.integer_zero_range (fold, merge, build_model)
            extra.update({INTEGER_ZEROS_KEY: True, ZERO_RANGE_KEY: list(self.int_range),
                          "zero_range_format": ckpt.config.checkpoint_format})
        adapter = adapter_from_model(self.model, ckpt, config, extra=extra)
        contiguous = all(m.contiguous_groups for m in qalora_modules(self.model).values())
        files: dict[str, str | bytes] = {TRAINING_LOG: "\n".join(self.log_rows) + "\n"}
        if loss_curve:
            files[LOSS_CURVE] = loss_curve_png(self.losses, before, after, title=f"QA-LoRA: {self.out_dir.name}")
        save_adapter(adapter, self.out_dir, base_model_path=str(self.base_dir), overwrite=self.overwrite,
                     contiguous_base=contiguous, extra_files=files)


def iter_training_log(adapter_dir: Path | str) -> Iterator[dict]:
    """Rows of an adapter's ``training_log.jsonl``."""
    with open(Path(adapter_dir) / TRAINING_LOG, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
