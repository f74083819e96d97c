"""A quiet console: our lines and progress bars on the terminal, everything else in a log file.

Third-party code talks a lot: GPTQModel banners and INFO tables, torch.compile recompilation
warnings, torchao's failed optional-kernel loads, transformers FutureWarnings, and native runtimes
(llama.cpp, onnxruntime) that write straight to file descriptors 1 and 2. :func:`quiet_console`
sends all of it — Python streams, ``logging``, ``warnings`` and the two file descriptors, so child
processes too — to a log file, and hands the CLI a :class:`Console` whose ``out`` and ``err`` still
reach the terminal. Only ``cli.py`` writes to them (it is the only module that prints).

With ``verbose`` nothing is redirected: third-party output shows live, as before.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, TextIO


@dataclass
class Console:
    """Where the CLI writes: ``out`` (results), ``err`` (progress, notes, errors); ``log_path`` holds
    what third-party code wrote (None when nothing is redirected)."""

    out: TextIO
    err: TextIO
    log_path: Optional[Path] = None


def default_log_path(command: str) -> Path:
    """``<tmp>/qalora-export-logs/<command>-<YYYYmmdd-HHMMSS>-<pid>.log``: one file per run."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(tempfile.gettempdir()) / "qalora-export-logs" / f"{command}-{stamp}-{os.getpid()}.log"


def _terminal_stream(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """A stream that keeps reaching where ``stream`` reaches after ``fd`` is redirected.

    A stream written through ``fd`` itself (a real terminal or pipe) gets a duplicate of the
    descriptor; any other stream (pytest's capture, a StringIO) is kept as it is. Returns the stream
    and whether it was created here (and must be closed).
    """
    try:
        through_fd = stream.fileno() == fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        through_fd = False
    if not through_fd:
        return stream, False
    encoding = getattr(stream, "encoding", None) or "utf-8"
    return open(os.dup(fd), "w", buffering=1, encoding=encoding, errors="replace"), True


@contextlib.contextmanager
def quiet_console(log_path: Optional[Path], verbose: bool = False) -> Iterator[Console]:
    """Redirect third-party output to ``log_path`` for the duration; yield the :class:`Console`.

    Args:
        log_path: the log file (appended to; its directory is created).
        verbose: redirect nothing (third-party output shows live).
    """
    if verbose or log_path is None:
        yield Console(sys.stdout, sys.stderr, None)
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    out, close_out = _terminal_stream(sys.stdout, 1)
    err, close_err = _terminal_stream(sys.stderr, 2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = (os.dup(1), os.dup(2))
    previous = (sys.stdout, sys.stderr)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    # Python-level streams over the descriptors themselves (not owning them): a logging handler
    # that keeps one after the capture ends writes wherever fd 1/2 lead then, never to a closed file.
    streams = [open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False) for fd in (1, 2)]
    sys.stdout, sys.stderr = streams
    # warnings.showwarning writes to sys.stderr as it is at call time: the log (logging.captureWarnings
    # would drop them: it gives the py.warnings logger a NullHandler when it has none)
    try:
        yield Console(out, err, log_path)
    finally:
        for stream in streams:
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = previous
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for stream, created in ((out, close_out), (err, close_err)):
            with contextlib.suppress(Exception):
                stream.flush()
            if created:
                stream.close()
