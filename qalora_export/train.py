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
   the training settings and the data file's sha256) and a ``training_log.jsonl``.

The pieces (:class:`BatchStream`, :func:`lr_lambda`, :func:`make_optimizer`, :func:`train_step`,
:func:`adapter_from_model`) are separate so that a fuller trainer (checkpoints, resume,
data-parallel) can reuse them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .adapter import POOLINGS, AdapterLayer, QALoRAAdapter, save_adapter
from .data import DatasetStats, TokenizedExample, build_dataset, collate, read_jsonl, split_held_out
from .errors import CheckpointError, ConfigError, DataError, TrainingError
from .evaluate import autocast_context, held_out_loss, response_loss
from .fold import INTEGER_ZEROS_KEY, ZERO_RANGE_KEY
from .gptq_format import GPTQCheckpoint, zero_range
from .io_utils import check_output_path
from .train_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .model import TARGET_MODULES, build_model, qalora_modules
from .tokenizer_check import check_tokenizer_matches

TRAINING_LOG = "training_log.jsonl"
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Hyper-parameters of one QA-LoRA run (the CLI's ``train`` flags).

    Attributes:
        rank / alpha: adapter rank ``r`` and ``lora_alpha`` (scale ``alpha / r``).
        steps: optimizer steps (each one batch of ``batch_size`` examples).
        lr: peak learning rate. QA-LoRA adapters see pooled group sums, one value per group, and
            short runs on small data need a larger rate than full LoRA recipes use; 1e-3 learns
            the fixture task in a few dozen steps.
        batch_size: examples per step (the batch stream wraps around epochs, every batch full).
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
            --require-exact`` succeeds (see ``qalora_layer.py`` and ``fold.py``).
        checkpoint_every: write a resumable checkpoint every this many steps (0: none); see
            :mod:`qalora_export.train_checkpoint`.
        keep_checkpoints: keep the newest this many checkpoints.
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

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag for any value out of range."""
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")

        if not isinstance(self.integer_zeros, bool):
            raise ConfigError(f"--integer-zeros must be a boolean, got {self.integer_zeros!r}")
        for name in ("checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value!r}")
        for name in ("rank", "steps", "batch_size", "max_length", "log_every"):
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
    """What a run did; ``losses`` holds every step's mean response-token loss.

    Held-out losses are None when no held-out set was asked for (``held_out = 0``).
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


# --------------------------------------------------------------------------------------- data


class BatchStream:
    """Batches of example indices from an endless, seeded stream of epoch permutations.

    Epoch ``e`` is ``randperm(n)`` under seed ``(seed, e)``; the stream concatenates epochs, so
    every batch is full even when ``n`` is not a multiple of the batch size (or smaller than it).
    The position is two integers (:meth:`state_dict`), enough to resume a run exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise DataError("no training examples to draw batches from")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), self.n - self.position)
            out.extend(self._order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


@dataclass
class PreparedData:
    """Tokenized train and held-out sets plus what tokenizing them counted."""

    train: list[TokenizedExample]
    held_out: list[TokenizedExample]
    stats: dict
    pad_token_id: int


def load_tokenizer(base_dir: Path):
    """The base checkpoint's tokenizer, with a pad id (its pad token, else its EOS)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as exc:  # transformers raises OSError/ValueError/... for missing files
        raise CheckpointError(
            f"{base_dir}: cannot load the tokenizer ({exc}); the base directory needs the tokenizer "
            f"files of the model it was quantized from (`qalora-export quantize` copies them)"
        ) from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise CheckpointError(f"{base_dir}: the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token  # padding positions carry no loss and no attention
    return tokenizer


def prepare_data(tokenizer, data_path: Path, config: TrainConfig) -> PreparedData:
    """Read, split and tokenize; raise :class:`DataError` when nothing is left to train on."""
    examples = read_jsonl(data_path)
    if config.held_out:
        train_records, held_records = split_held_out(examples, config.held_out, config.seed)
    else:
        train_records, held_records = list(examples), []
    train, train_stats = build_dataset(tokenizer, train_records, config.max_length, config.on_overlong)
    held, held_stats = build_dataset(tokenizer, held_records, config.max_length, config.on_overlong) \
        if held_records else ([], DatasetStats())
    if not train:
        raise DataError(
            f"{data_path}: no training example is left after tokenizing ({train_stats.dropped_overlong} longer "
            f"than --max-length {config.max_length}, {train_stats.dropped_no_response} without a response "
            f"token); raise --max-length or pass --on-overlong truncate"
        )
    stats = {"train": asdict(train_stats), "held_out": asdict(held_stats)}
    return PreparedData(train, held, stats, int(tokenizer.pad_token_id))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------- optimisation


def init_adapters(model: nn.Module, seed: int) -> None:
    """Seeded initialisation, independent of module construction order: ``A`` Kaiming-uniform
    (as PEFT and ``nn.Linear`` do), ``B`` zeros, so that the adapted model starts as the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in sorted(qalora_modules(model).items()):
            a = torch.empty(module.lora_A.shape, dtype=module.lora_A.dtype)
            nn.init.kaiming_uniform_(a, a=5 ** 0.5, generator=gen)
            module.lora_A.copy_(a)
            module.lora_B.zero_()


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable factors in a fixed (name) order; checks nothing else requires grad."""
    params = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
    stray = [n for n, _ in params if not n.endswith((".lora_A", ".lora_B"))]
    if stray:  # build_model's contract; a violation would train (and lose) base weights
        raise TrainingError(f"parameters other than adapter factors require grad: {stray[:3]}")
    return params


def make_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=config.weight_decay)


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak rate at (0-based) step ``t``: linear warmup over ``warmup_steps``,
    then cosine / linear decay towards 0 at ``steps`` (never exactly 0 on a step that runs)."""
    warmup, total, schedule = config.warmup_steps, config.steps, config.schedule

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (t - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
               scheduler, params: Sequence[nn.Parameter], config: TrainConfig,
               device: torch.device) -> tuple[float, int, float]:
    """One optimizer step on one batch: (mean response-token loss, response tokens, grad norm)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with autocast_context(device):
        loss_sum, n_tokens = response_loss(model, **batch)
    loss = loss_sum / max(n_tokens, 1)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingError(f"the training loss became {value}; lower --lr (now {config.lr:g}) or check the data")
    loss.backward()
    if config.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    optimizer.step()
    scheduler.step()
    return value, n_tokens, grad_norm


def adapter_from_model(model: nn.Module, ckpt: GPTQCheckpoint, config: TrainConfig, extra: dict) -> QALoRAAdapter:
    """The trained factors as an adapter record pooling over the base's quantization groups."""
    layers = {name: AdapterLayer(lora_A=m.lora_A.detach().float().cpu().clone(),
                                 lora_B=m.lora_B.detach().float().cpu().clone())
              for name, m in sorted(qalora_modules(model).items())}
    return QALoRAAdapter(
        layers=layers, rank=config.rank, alpha=float(config.alpha), pooling=config.pooling,
        pool_group_size=ckpt.config.group_size, pool_groups="quantization",
        base_fingerprint=ckpt.fingerprint(), target_modules=sorted(config.target_modules), extra=extra,
    )


# --------------------------------------------------------------------------------------- the run


def train_adapter(base_dir: Path | str, data_path: Path | str, out_dir: Path | str, config: TrainConfig,
                  overwrite: bool = False, progress: Optional[Callable[[int, float], None]] = None,
                  device: str = "cpu", resume: bool = False,
                  checkpoint_dir: Optional[Path | str] = None) -> TrainResult:
    """Train a QA-LoRA adapter on the GPTQ base ``base_dir`` and save it to ``out_dir``.

    Args:
        base_dir: AutoGPTQ checkpoint directory (with tokenizer files).
        data_path: JSONL instruction data (``instruction``/``input``/``output`` or ``messages``).
        out_dir: adapter directory to create (refused if it exists, unless ``overwrite``).
        config: hyper-parameters; validated first.
        progress: called after every step with (step, loss); nothing is printed.
        device: "cpu" or "cuda[:n]" (bf16 autocast on CUDA).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (a fresh run when there
            is none); refused when it was written with another base, data or config. The resumed
            run reproduces the uninterrupted run's losses and adapter exactly.
        checkpoint_dir: where ``config.checkpoint_every`` checkpoints go; default
            ``<out_dir>.checkpoints``.

    Returns:
        a :class:`TrainResult`; the adapter directory holds PEFT's files, ``qalora_export.json``
        and ``training_log.jsonl``.

    Raises:
        ConfigError, DataError, CheckpointError, TrainingError, OutputExistsError — before
        anything is written.

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
    ckpt = GPTQCheckpoint(base_dir)
    if ckpt.config.group_size <= 0:
        raise ConfigError(
            f"{base_dir}: group_size={ckpt.config.group_size} (one quantization group per row) leaves QA-LoRA "
            f"one pooled feature per layer, and its adapters no single pooling group size; quantize "
            f"the base with --group-size 32, 64 or 128"
        )
    check_tokenizer_matches(ckpt)
    tokenizer = load_tokenizer(base_dir)
    data = prepare_data(tokenizer, data_path, config)

    int_range = zero_range(ckpt.config.bits, ckpt.config.checkpoint_format) if config.integer_zeros else None
    model = build_model(ckpt, train_rank=config.rank, train_alpha=float(config.alpha), pooling=config.pooling,
                        compute_dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                        target_modules=tuple(config.target_modules), integer_zero_range=int_range)
    if not qalora_modules(model):
        raise ConfigError(f"{base_dir}: no quantized layer matches --target-modules {list(config.target_modules)}")
    init_adapters(model, config.seed)
    model.to(dev)
    named = adapter_parameters(model)
    params = [p for _, p in named]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    stream = BatchStream(len(data.train), config.batch_size, config.seed)

    eval_batch = max(config.batch_size, 8)
    cache = dev.type == "cpu"  # a float copy of the base for the evaluation only; small next to training's peak

    def evaluate_held_out() -> Optional[float]:
        return held_out_loss(model, data.held_out, data.pad_token_id, eval_batch, dev, cache) if data.held_out else None

    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else out_dir.with_name(out_dir.name + ".checkpoints")
    run_identity = {"config": json.loads(json.dumps(
                        {k: v for k, v in asdict(config).items() if k not in ("checkpoint_every", "keep_checkpoints")})),
                    "base_fingerprint": ckpt.fingerprint(), "data_sha256": file_sha256(data_path)}
    losses: list[float] = []
    log_rows: list[str] = []
    tokens_seen = 0
    first_step = 1
    latest = latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        state = load_checkpoint(latest, named, optimizer, scheduler, run_identity)
        stream.load_state_dict(state["stream"])
        losses, log_rows, tokens_seen = list(state["losses"]), list(state["log_rows"]), int(state["tokens"])
        before = state["held_out_loss_before"]
        first_step = int(state["step"]) + 1
    else:
        before = evaluate_held_out()

    start = time.perf_counter()
    for step in range(first_step, config.steps + 1):
        lr = scheduler.get_last_lr()[0]
        batch = collate([data.train[i] for i in stream.next_batch()], data.pad_token_id)
        tokens_seen += int(batch["attention_mask"].sum())
        batch = {k: v.to(dev) for k, v in batch.items()}
        loss, n_response, grad_norm = train_step(model, batch, optimizer, scheduler, params, config, dev)
        losses.append(loss)
        if step % config.log_every == 0 or step == config.steps:
            log_rows.append(json.dumps({
                "step": step, "loss": loss, "lr": lr, "tokens": tokens_seen, "response_tokens": n_response,
                "grad_norm": grad_norm, "seconds": round(time.perf_counter() - start, 3)}))
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            save_checkpoint(ckpt_root, step, named, optimizer, scheduler, {
                "stream": stream.state_dict(), "losses": losses, "log_rows": log_rows, "tokens": tokens_seen,
                "held_out_loss_before": before, **run_identity}, config.keep_checkpoints)
        if progress is not None:
            progress(step, loss)
    seconds = time.perf_counter() - start

    after = evaluate_held_out()
    training = {
        "steps": config.steps, "lr": config.lr, "seed": config.seed, "batch_size": config.batch_size,
        "max_length": config.max_length, "schedule": config.schedule, "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay, "grad_clip": config.grad_clip, "on_overlong": config.on_overlong,
        "held_out": config.held_out, "data_file": data_path.name, "data_sha256": file_sha256(data_path),
        "train_examples": len(data.train), "held_out_examples": len(data.held_out), "tokens": tokens_seen,
        "train_loss_first": losses[0], "train_loss_last": losses[-1],
        "held_out_loss_before": before, "held_out_loss_after": after, "device": dev.type,
        "integer_zeros": config.integer_zeros,
    }
    extra: dict = {"training": training}
    if int_range is not None:  # read back by fold.integer_zero_range (fold, merge, build_model)
        extra.update({INTEGER_ZEROS_KEY: True, ZERO_RANGE_KEY: list(int_range),
                      "zero_range_format": ckpt.config.checkpoint_format})
    adapter = adapter_from_model(model, ckpt, config, extra=extra)
    contiguous = all(m.contiguous_groups for m in qalora_modules(model).values())
    save_adapter(adapter, out_dir, base_model_path=str(base_dir), overwrite=overwrite,
                 contiguous_base=contiguous, extra_files={TRAINING_LOG: "\n".join(log_rows) + "\n"})
    return TrainResult(
        adapter_dir=str(out_dir), steps=config.steps, train_loss_first=losses[0], train_loss_last=losses[-1],
        held_out_loss_before=before, held_out_loss_after=after, tokens=tokens_seen, seconds=seconds,
        dataset_stats=data.stats, losses=losses, train_examples=len(data.train),
        held_out_examples=len(data.held_out), seconds_per_step=seconds / max(1, config.steps - first_step + 1),
    )


def iter_training_log(adapter_dir: Path | str) -> Iterator[dict]:
    """Rows of an adapter's ``training_log.jsonl``."""
    with open(Path(adapter_dir) / TRAINING_LOG, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
