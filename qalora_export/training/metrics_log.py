"""What a training run reports while it runs and when it ends: metrics JSONL, TensorBoard, loss curve.

- **Metrics JSONL** (``train --metrics-file``, by default ``<output>.metrics.jsonl`` next to the
  adapter directory): one JSON object per logged step, ``{"step", "loss", "lr", "tokens",
  "response_tokens", "tokens_per_s", "grad_norm", "seconds"}``, appended and flushed as each step
  ends, so a run killed with SIGKILL keeps every row it logged. It is a log, not an artifact: a
  fresh run replaces the file; a ``--resume`` rewrites it (atomically) with the rows of the
  checkpoint it resumes from, then appends, so the file never holds a step twice. The adapter
  directory gets the complete rows as ``training_log.jsonl`` at the end.
  ``loss`` is the global mean response-token loss of the step; ``tokens`` counts the non-padding
  tokens seen so far (all ranks); ``tokens_per_s`` is this step's tokens over its wall time;
  ``seconds`` the training time so far (resumed runs continue the count).
- **TensorBoard** (``train --tensorboard DIR``, optional: needs ``pip install tensorboard``):
  scalars ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s`` at each
  logged step and ``held_out/loss`` before (step 0) and after training. A resumed run opens the
  writer with ``purge_step`` = the first step it runs, so TensorBoard drops the killed run's rows
  past the checkpoint.
- **Loss curve** (``loss_curve.png`` in the adapter directory): training loss per step and the
  held-out loss before and after, drawn with matplotlib's Agg canvas (no pyplot, no global
  backend change, imported only when drawn) and written inside the adapter's atomic write.

Only rank 0 of a data-parallel run writes any of these.
"""

from __future__ import annotations

import errno
import importlib.util
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Optional

from qalora_export.errors import ConfigError, OutputWriteError
from qalora_export.storage.atomic import atomic_output_file

LOSS_CURVE = "loss_curve.png"
_FULL = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit was reached (ulimit -f)",
         errno.EDQUOT: "the disk quota is exceeded"}
METRICS_SUFFIX = ".metrics.jsonl"


def default_metrics_path(out_dir: Path) -> Path:
    """``<output>.metrics.jsonl``, beside the adapter directory (``<output>.checkpoints`` is its sibling too)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + METRICS_SUFFIX)


def check_tensorboard() -> None:
    """Raise :class:`ConfigError` before training when ``--tensorboard`` cannot write events."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package, which is not installed; "
                          "run `pip install tensorboard`, or drop --tensorboard")


def check_matplotlib() -> None:
    """Raise :class:`ConfigError` before training when the loss curve cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("drawing loss_curve.png needs matplotlib, which is not installed; run "
                          "`pip install matplotlib` (a dependency of qalora-export)")


class MetricsLog:
    """The streaming sinks of one run (rank 0): the JSONL file and, optionally, TensorBoard.

    Args:
        path: metrics JSONL to write, or None for none.
        tensorboard_dir: TensorBoard log directory, or None.
        previous_rows: on resume, the JSON rows of the checkpoint resumed from (the file is
            rewritten with them first); empty for a fresh run.
        first_step: the first step this process will run (TensorBoard's ``purge_step`` on resume).
    """

    def __init__(self, path: Optional[Path], tensorboard_dir: Optional[Path], previous_rows: Sequence[str] = (),
                 first_step: int = 1):
        self.path = Path(path) if path is not None else None
        self._file: Optional[IO[str]] = None
        self._tb = None
        if self.path is not None:
            text = "".join(row + "\n" for row in previous_rows)
            with atomic_output_file(self.path, overwrite=True) as tmp:
                tmp.write_text(text, encoding="utf-8")
            try:
                self._file = open(self.path, "a", encoding="utf-8")
            except OSError as exc:
                raise self._write_error(exc) from exc
        if tensorboard_dir is not None:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=first_step if previous_rows else None)

    def _write_error(self, exc: OSError) -> OutputWriteError:
        reason = _FULL.get(exc.errno, exc.strerror or str(exc))
        return OutputWriteError(
            exc.errno, f"cannot write the metrics file {self.path}: {reason}; training stopped and nothing was "
                       f"written to the output (the rows logged so far stay in the file). Free space there, or "
                       f"pass another --metrics-file")

    def write(self, row: dict) -> None:
        """Append one logged step's row (flushed) and its TensorBoard scalars."""
        if self._file is not None:
            try:
                self._file.write(json.dumps(row) + "\n")
                self._file.flush()
            except OSError as exc:
                raise self._write_error(exc) from exc
        if self._tb is not None:
            step = row["step"]
            for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm"),
                             ("tokens_per_s", "train/tokens_per_s")):
                self._tb.add_scalar(tag, row[key], step)

    def held_out(self, step: int, loss: Optional[float]) -> None:
        """TensorBoard's ``held_out/loss`` at ``step`` (0: before training)."""
        if self._tb is not None and loss is not None:
            self._tb.add_scalar("held_out/loss", loss, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def loss_curve_png(losses: Sequence[float], held_out_before: Optional[float], held_out_after: Optional[float],
                   title: str = "QA-LoRA training") -> bytes:
    """The loss curve as PNG bytes: training loss per step (1-based), held-out loss as two points.

    Drawn on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``), so the caller's
    pyplot backend and state are untouched.
    """
    check_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, list(losses), label="train loss (response tokens)", linewidth=1.2)
    held = [(0, held_out_before), (len(losses), held_out_after)]
    held = [(s, v) for s, v in held if v is not None]
    if held:
        ax.plot([s for s, _ in held], [v for _, v in held], "o--", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()

