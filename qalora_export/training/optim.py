"""Optimisation pieces of the training loop: adapter initialisation and parameters, AdamW, the
learning-rate schedule with warm-up, one step, and the trained factors as a :class:`QALoRAAdapter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter
from qalora_export.errors import TrainingError
from qalora_export.modeling.model import qalora_modules
from qalora_export.training.config import TrainConfig
from qalora_export.training.distributed import accumulate_micro_batch, finish_step
from qalora_export.training.examples import IGNORE_INDEX

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
    """One single-process optimizer step on one collated batch (``collate``'s int64 ``[B, T]``
    tensors): (mean response-token loss, response tokens, grad norm before clipping).

    :func:`train_adapter` runs ``train_distributed.data_parallel_step`` instead, which is this
    step split over ranks and micro-batches (and the same operations with one of each)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    value = float(accumulate_micro_batch(model, batch, n_tokens, torch.device(device)))
    if not math.isfinite(value):
        raise TrainingError(f"the training loss became {value}; lower --lr (now {config.lr:g}) or check the data")
    grad_norm = finish_step(optimizer, scheduler, params, config.grad_clip)
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
