"""Large output files written around the page cache (``O_DIRECT``) by a writer thread.

Why: the ONNX and GGUF exports write 4–5 GB per 7B model. Through ``write()`` every byte is first
copied into freshly allocated page-cache pages; on the VMs this project is measured on (and on
hosts under memory pressure), fresh pages are the expensive part: 4 GB of ``write()`` took 1.6 to
10 s in one session, while the same 4 GB written with ``O_DIRECT`` from two reused buffers took
2.2–2.6 s every time, already on disk (``docs/scale.md``). So :class:`DirectWriter` copies what it
is given into one of two page-aligned staging buffers, and a writer thread writes each full buffer
with ``O_DIRECT`` while the caller fills the other (``os.pwrite`` and ``numpy.copyto`` release the
GIL, so computing, copying and writing overlap on two cores).

``O_DIRECT`` needs aligned offsets and lengths (:data:`ALIGN`): the buffers are written whole, a
start in the middle of a block (a GGUF header written by gguf-py before the tensors) re-reads that
block's head into the first buffer, and the last partial block is written through the page cache at
:meth:`~DirectWriter.close`. Where ``O_DIRECT`` is refused (a file system without it, an odd
alignment: ``EINVAL`` at open or at a write) the writer goes on with plain ``pwrite`` from the same
offset, so the bytes are the same either way; ``QALORA_EXPORT_DIRECT_IO=0`` turns it off.

Errors: a failed write (disk full, ``ulimit -f``) is raised in the caller's thread, as the same
``OSError``, by the next :meth:`~DirectWriter.write` or by :meth:`~DirectWriter.close`, so the atomic
output turns it into ``OutputWriteError`` as before. :meth:`~DirectWriter.abort` stops without raising.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import Optional

import numpy as np

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (logical block size <= 4096 here)
DEFAULT_BUFFER_BYTES = 16 << 20  # per staging buffer; two of them
ENV_SWITCH = "QALORA_EXPORT_DIRECT_IO"


def direct_io_enabled() -> bool:
    """``O_DIRECT`` exists on this platform and ``QALORA_EXPORT_DIRECT_IO`` is not ``0``."""
    return hasattr(os, "O_DIRECT") and os.environ.get(ENV_SWITCH, "1") != "0"


class DirectWriter:
    """A write-only binary file (``write``, ``tell``, ``flush``, ``close``) whose bytes go to disk
    with ``O_DIRECT`` from two reused staging buffers, written by a background thread.

    Args:
        path: the file. With ``offset == 0`` it is created (or truncated); otherwise it must
            already hold at least ``offset`` bytes, and writing continues at ``offset`` (bytes
            after it are overwritten).
        offset: where the first :meth:`write` lands.
        buffer_bytes: size of each staging buffer (rounded up to :data:`ALIGN`).
        direct: ``None``: :func:`direct_io_enabled`; ``False``: plain ``pwrite`` (same bytes).
    """

    def __init__(self, path: Path | str, offset: int = 0, *, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 direct: Optional[bool] = None):
        self.path = Path(path)
        self.name = str(self.path)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0) | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self.path, flags, 0o666)
        self._dfd: Optional[int] = None
        try:
            if os.fstat(self._fd).st_size < offset:
                raise ValueError(f"{self.path} holds {os.fstat(self._fd).st_size} bytes, fewer than offset {offset}")
            if direct_io_enabled() if direct is None else direct:
                try:
                    self._dfd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError:  # EINVAL: this file system has no O_DIRECT; write through the page cache
                    self._dfd = None
            size = max(ALIGN, -(-buffer_bytes // ALIGN) * ALIGN)
            self._maps = [mmap.mmap(-1, size), mmap.mmap(-1, size)]  # page aligned, reused
            self._bufs = [np.frombuffer(m, dtype=np.uint8) for m in self._maps]
            self._written = [threading.Event(), threading.Event()]  # set: the buffer may be filled
            for event in self._written:
                event.set()
            self._cap = size
            self._cur = 0
            # the current buffer's byte 0 lands at self._base in the file; a start inside a block
            # re-reads the block's head so that the buffer can be written whole
            self._base = offset - offset % ALIGN
            self._fill = offset - self._base
            if self._fill:
                head = os.pread(self._fd, self._fill, self._base)
                if len(head) != self._fill:
                    raise OSError(errno.EIO, f"short read of {self.path} at {self._base}")
                self._bufs[0][: self._fill] = np.frombuffer(head, dtype=np.uint8)
        except BaseException:
            self._close_fds()
            raise
        self._error: Optional[BaseException] = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="qalora-direct-writer", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def direct(self) -> bool:
        """Whether writes still go around the page cache (False after a fallback)."""
        return self._dfd is not None

    # ---------------------------------------------------------------- caller's side

    def tell(self) -> int:
        return self._base + self._fill

    def write(self, data) -> int:
        """Append ``data`` (any C-contiguous buffer: bytes, memoryview, numpy array)."""
        if self._closed:
            raise ValueError(f"write to closed file {self.path}")
        self._raise_error()
        src = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        done = 0
        while done < src.size:
            n = min(src.size - done, self._cap - self._fill)
            np.copyto(self._bufs[self._cur][self._fill:self._fill + n], src[done:done + n])
            self._fill += n
            done += n
            if self._fill == self._cap:
                self._hand_over(self._cap)
        return src.size

    def flush(self) -> None:
        """Nothing to do: bytes are written when a buffer fills and at :meth:`close`."""
        self._raise_error()

    def close(self) -> None:
        """Write what is buffered, wait for the writer thread, close; raise a failed write's error."""
        if self._closed:
            return
        try:
            self._raise_error()
            if self._error is not None:  # failed before and already reported: write nothing more
                return
            whole = self._fill - self._fill % ALIGN
            tail = bytes(self._bufs[self._cur][whole:self._fill])
            tail_at = self._base + whole
            if whole:
                self._hand_over(whole)
            self._stop()
            self._raise_error()
            if tail:
                _pwrite_all(self._fd, memoryview(tail), tail_at)
        finally:
            self._stop()
            self._close_fds()

    def abort(self) -> None:
        """Stop the writer thread and close the file without writing what is buffered; never raises."""
        if self._error is None:
            self._error = _Aborted()
        try:
            self._stop()
        finally:
            self._close_fds()

    def __enter__(self) -> "DirectWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ---------------------------------------------------------------- internals

    def _hand_over(self, length: int) -> None:
        """Queue the current buffer's first ``length`` bytes and continue in the other buffer."""
        index, at = self._cur, self._base
        self._written[index].clear()
        self._jobs.put((index, length, at))
        self._cur = 1 - index
        self._base = at + length
        self._fill = 0
        self._written[self._cur].wait()  # the other buffer's last write is done
        self._raise_error()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            index, length, at = job
            try:
                if self._error is None:
                    self._write_block(memoryview(self._maps[index])[:length], at)
            except BaseException as exc:  # raised in the caller's thread
                self._error = exc
            finally:
                self._written[index].set()

    def _write_block(self, view: memoryview, at: int) -> None:
        if self._dfd is not None:
            try:
                _pwrite_all(self._dfd, view, at)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # O_DIRECT refused at write time (alignment, a short write before): same bytes,
                # through the page cache, from here on
                os.close(self._dfd)
                self._dfd = None
        _pwrite_all(self._fd, view, at)

    def _raise_error(self) -> None:
        if self._error is not None and not isinstance(self._error, _Aborted):
            error, self._error = self._error, _Aborted()
            raise error

    def _stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._closed = True
        self._bufs = self._maps = []  # unmapped once unreferenced (a split GGUF closes files early)

    def _close_fds(self) -> None:
        for attr in ("_dfd", "_fd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                setattr(self, attr, None)
                try:
                    os.close(fd)
                except OSError:
                    pass


class _Aborted(Exception):
    """Marks a writer that failed or was aborted: later jobs are skipped."""


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, at)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite wrote {n} bytes")
        view, at = view[n:], at + n
