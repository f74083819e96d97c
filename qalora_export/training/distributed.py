"""Data-parallel QA-LoRA training: one process per device under ``torchrun`` or ``accelerate launch``.

The launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
(MPI launchers, which ``accelerate launch --cpu`` uses for several processes, set ``PMI_*`` or
``OMPI_COMM_WORLD_*`` instead of the first three; they are read too); :func:`setup_distributed`
reads them and opens the process group (``env://``; gloo on CPU, nccl on CUDA, process ``r`` on
``cuda:LOCAL_RANK``). A group that already exists (a caller that created an
``accelerate.Accelerator`` or called ``init_process_group`` itself) is used as it is. Without a
launcher, or with ``WORLD_SIZE=1``, there is one process and no group: the same code runs with
every collective skipped, and a step is exactly the single-process loop's (same operations, same
bits).

The result does not depend on the number of processes ``W`` (up to float summation order):

- ``--batch-size`` ``B`` is the *global* batch of one optimizer step. Every process draws the same
  seeded global batch from the same ``BatchStream``; process ``r`` takes the contiguous share
  :func:`shard_bounds` ``(B, r, W)`` and splits it into ``--grad-accum`` micro-batches.
- Every process sees the whole global batch, so each knows the global number ``N`` of response
  tokens without a collective. A micro-batch's loss is its response-token loss *sum* divided by
  ``N``, so the gradients a process accumulates add up, over all processes, to the gradient of the
  global mean loss.
- One flat ``all_reduce(SUM)`` of ``[adapter grads..., loss, one failure flag per rank]`` gives
  every process that gradient; clipping and AdamW then run on identical values everywhere, so the
  replicas stay identical. No DDP wrapper: the packed base lives in buffers (which DDP would
  broadcast) and only the small adapter factors need reducing.
- Only rank 0 evaluates and writes (checkpoints, metrics, adapter). :meth:`DistContext.on_main`
  runs such a section on rank 0 and broadcasts whether it failed, so the other ranks raise a typed
  error too instead of waiting forever in the next collective; a failure inside one rank's step is
  carried by its flag in the all-reduce the same way.

Not covered: a process that dies outright (SIGKILL, segfault) cannot tell the others; the launcher
(torchrun's agent) then stops them. Several nodes need a file system shared by all ranks (every
rank reads the data and, on ``--resume``, the checkpoint that rank 0 wrote).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, TypeVar

import torch
from torch import nn

from qalora_export import errors
from qalora_export.errors import ConfigError, QALoRAExportError, TrainingError
from qalora_export.training.evaluate import autocast_context, response_loss
from qalora_export.training.examples import IGNORE_INDEX, TokenizedExample, collate

if TYPE_CHECKING:
    from qalora_export.training.config import TrainConfig

T = TypeVar("T")
_MESSAGE_BYTES = 2048  # room for a failed rank-0 section's error message in the status broadcast


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer; launch with torchrun or "
                          f"accelerate launch, which set it") from None
    if value < 0:
        raise ConfigError(f"environment variable {name}={value} is negative; launch with torchrun or accelerate launch")
    return value


# torchrun (and ``accelerate launch --multi_gpu``, which runs it) set the first name of each tuple;
# MPI launchers (``accelerate launch --cpu`` with several processes runs mpirun) set the others.
WORLD_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _first_env_int(names: Sequence[str], default: Optional[int]) -> Optional[int]:
    for name in names:
        if os.environ.get(name):
            return _env_int(name, default)
    return default


def launcher_rank() -> int:
    """This process's rank as the launcher set it (``RANK``, or an MPI launcher's; 0 without one)."""
    return _first_env_int(RANK_VARIABLES, 0) or 0


@dataclass
class DistContext:
    """Where this process stands: rank ``r`` of ``world_size``, its device, and whether it opened
    (and so must close) the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def on_main(self, fn: Callable[[], T], what: str, share_float: bool = False) -> Optional[T]:
        """Run ``fn`` on rank 0 only; every rank learns whether it failed.

        Returns ``fn()``'s result on rank 0; on the other ranks None, or, with ``share_float``,
        rank 0's result (a float or None) broadcast to them. When ``fn`` raises, rank 0 re-raises
        it and every other rank raises the same typed error class (a :class:`TrainingError` for
        an untyped one) naming rank 0's message, so no rank is left waiting in a collective.
        One process: just ``fn()``.
        """
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        result: Optional[T] = None
        failure: Optional[BaseException] = None
        status = torch.zeros(3, dtype=torch.float64, device=self.device)  # failed, has value, value
        if self.is_main:
            try:
                result = fn()
            except BaseException as exc:  # every rank must learn of it, even of a KeyboardInterrupt
                failure = exc
                status[0] = 1.0
            if failure is None and share_float and result is not None:
                status[1], status[2] = 1.0, float(result)  # type: ignore[arg-type]
        dist.broadcast(status, src=0)
        if status[0] > 0:
            message = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
            if self.is_main:
                text = f"{type(failure).__name__}\n{failure}".encode("utf-8", "replace")[:_MESSAGE_BYTES]
                message[:len(text)] = torch.tensor(list(text), dtype=torch.uint8)
            dist.broadcast(message, src=0)
            if failure is not None:
                raise failure
            name, _, detail = bytes(message.cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace").partition("\n")
            cls = getattr(errors, name, None)
            if not (isinstance(cls, type) and issubclass(cls, QALoRAExportError)):
                cls = TrainingError
            raise cls(f"rank 0 failed while {what} ({name}: {detail}); rank {self.rank} stops too")
        if self.is_main:
            return result
        return float(status[2]) if share_float and status[1] > 0 else None  # type: ignore[return-value]

    def close(self) -> None:
        """Destroy the process group if this context opened it."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device: str | torch.device) -> DistContext:
    """The process group of this run (or none), from the launcher's environment.

    Args:
        device: "cpu" or "cuda" (each process of a multi-process run takes ``cuda:LOCAL_RANK``;
            an explicit index is refused there). CUDA availability is the caller's check.

    Raises:
        ConfigError: launcher variables missing or malformed, an explicit CUDA index with several
            processes, or a process group that cannot be opened.
    """
    import torch.distributed as dist

    dev = torch.device(device)
    existing = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if existing else (_first_env_int(WORLD_VARIABLES, 1) or 1)
    if world <= 1:
        return DistContext(device=dev)
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this PyTorch build has no torch.distributed; run one process")
    if existing:
        rank = dist.get_rank()
    else:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if _first_env_int(RANK_VARIABLES, None) is None:
            missing.insert(0, "RANK")
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={world} but {', '.join(missing)} not set; start several processes with "
                f"`torchrun --nproc_per_node N` or `accelerate launch`, which set them (or unset WORLD_SIZE)"
            )
        rank = _first_env_int(RANK_VARIABLES, 0) or 0
    local_rank = _first_env_int(LOCAL_RANK_VARIABLES, rank) or 0
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError(
                f"--device {device} with {world} processes: each process takes cuda:LOCAL_RANK; pass --device cuda "
                f"(and CUDA_VISIBLE_DEVICES to choose the GPUs)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if existing:
        if dist.get_backend() == "nccl" and dev.type != "cuda":
            raise ConfigError(f"the process group uses nccl, which needs CUDA tensors; pass --device cuda, not {device}")
        return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=False)
    try:
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    except (RuntimeError, ValueError) as exc:  # DistNetworkError, DistStoreError, timeouts
        raise ConfigError(
            f"cannot open the {backend} process group (rank {rank} of {world}, "
            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')} MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}; "
            f"check that every process was started by the same launcher and the port is free"
        ) from exc
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=True)


# --------------------------------------------------------------------------------------- the step


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items (sizes differ by at most 1)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def response_token_count(examples: Sequence[TokenizedExample]) -> int:
    """Tokens that carry a loss, counted as :func:`evaluate.response_loss` counts them: labels at
    positions 1.. (position ``t`` predicts label ``t + 1``)."""
    return sum(sum(1 for label in ex.labels[1:] if label != IGNORE_INDEX) for ex in examples)


def accumulate_micro_batch(model: nn.Module, batch: dict[str, torch.Tensor], normaliser: int,
                           device: torch.device) -> torch.Tensor:
    """Forward and backward one micro-batch; its loss is the response-token loss sum over
    ``normaliser`` (the global response-token count). Returns that loss, detached (float32 scalar)."""
    with autocast_context(device):
        loss_sum, _ = response_loss(model, **batch)
    loss = loss_sum / max(normaliser, 1)
    loss.backward()
    return loss.detach()


def finish_step(optimizer: torch.optim.Optimizer, scheduler, params: Sequence[nn.Parameter],
                grad_clip: float) -> float:
    """Clip (``grad_clip`` > 0), step AdamW and the schedule; return the gradient norm before clipping."""
    if grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    optimizer.step()
    scheduler.step()
    return grad_norm


@dataclass
class StepStats:
    """One optimizer step: the global mean response-token loss, the global response-token count,
    the non-padding tokens of the global batch and the gradient norm (before clipping)."""

    loss: float
    response_tokens: int
    tokens: int
    grad_norm: float


def _out_of_memory(exc: BaseException, ctx: DistContext, step: int) -> Optional[TrainingError]:
    if not isinstance(exc, torch.OutOfMemoryError):
        return None
    return TrainingError(
        f"rank {ctx.rank}: out of {ctx.device.type} memory at step {step} ({str(exc).splitlines()[0]}); "
        f"raise --grad-accum, pass --gradient-checkpointing, or lower --batch-size or --max-length"
    )


def data_parallel_step(model: nn.Module, global_batch: Sequence[TokenizedExample], pad_token_id: int,
                       optimizer: torch.optim.Optimizer, scheduler, params: Sequence[nn.Parameter],
                       config: "TrainConfig", ctx: DistContext, step: int) -> StepStats:
    """One optimizer step on this rank's share of ``global_batch`` (module docstring).

    Args:
        global_batch: the ``B`` examples of this step, the same list on every rank.
        params: the adapter factors in the fixed order of ``train.adapter_parameters`` (the same
            on every rank: the flat all-reduce relies on it).

    Raises:
        TrainingError: the loss became NaN/inf (every rank), a rank ran out of memory, or another
            rank failed in this step; a rank's own error is re-raised on that rank.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_global = response_token_count(global_batch)
    tokens = sum(len(ex.input_ids) for ex in global_batch)
    lo, hi = shard_bounds(len(global_batch), ctx.rank, ctx.world_size)
    share = list(global_batch[lo:hi])
    loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    failure: Optional[BaseException] = None
    try:
        for a in range(config.grad_accum):
            m_lo, m_hi = shard_bounds(len(share), a, config.grad_accum)
            if m_hi == m_lo:  # B < W * grad_accum is refused up front; this is only a guard
                continue
            batch = {k: v.to(ctx.device) for k, v in collate(share[m_lo:m_hi], pad_token_id).items()}
            loss += accumulate_micro_batch(model, batch, n_global, ctx.device).to(torch.float64)
    except Exception as exc:
        failure = _out_of_memory(exc, ctx, step) or exc
        if not ctx.distributed:
            if failure is exc:
                raise
            raise failure from exc
    if ctx.distributed:
        loss = _all_reduce_step(params, loss, failure, ctx, step)
    value = float(loss)
    if value != value or value in (float("inf"), float("-inf")):
        raise TrainingError(f"the training loss became {value}; lower --lr (now {config.lr:g}) or check the data")
    grad_norm = finish_step(optimizer, scheduler, params, config.grad_clip)
    return StepStats(loss=value, response_tokens=n_global, tokens=tokens, grad_norm=grad_norm)


def _all_reduce_step(params: Sequence[nn.Parameter], loss: torch.Tensor, failure: Optional[BaseException],
                     ctx: DistContext, step: int) -> torch.Tensor:
    """Sum gradients, loss and failure flags over all ranks in one collective; write the summed
    gradients back. Returns the global loss; raises when any rank failed."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flags = torch.zeros(ctx.world_size, dtype=torch.float32, device=ctx.device)
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]
                     + [loss.to(torch.float32).reshape(1), flags])
    if failure is not None:
        flat.zero_()
        flat[-ctx.world_size + ctx.rank] = 1.0
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    failed = [r for r in range(ctx.world_size) if float(flat[-ctx.world_size + r]) > 0]
    if failure is not None:  # this rank's own error, after the others have learnt of it
        raise failure
    if failed:
        raise TrainingError(
            f"rank(s) {failed} failed at step {step} (their own error says why); rank {ctx.rank} stops too, "
            f"nothing was written"
        )
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        reduced = flat[offset:offset + n].view_as(g).to(p.dtype)
        if p.grad is None:
            p.grad = reduced.clone()
        else:
            p.grad.copy_(reduced)
        offset += n
    return flat[offset].to(torch.float64)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (transformers' activation
    checkpointing on the decoder layers, non-reentrant so that gradients reach the adapters inside
    the frozen layers without inputs that require grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
