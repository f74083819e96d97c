"""Writing behind computing: one writer thread that runs write jobs in order while the caller
computes the next tensor (numpy, torch, hashlib and file writes release the GIL, so the two overlap
on two cores; with write() throttled to disk writeback, the conversion no longer waits for it).

Memory stays bounded: :meth:`WriteBehind.reserve` is called before an item is produced and its
slot is released only once the item is written, so at most ``max_in_flight`` items (default 2: the
one being written and the one being produced) exist at a time.

Errors: a job's exception is kept and raised in the caller's thread by the next
:meth:`~WriteBehind.reserve` or by :meth:`~WriteBehind.close` (the same exception object, so an
``OSError`` still becomes ``OutputWriteError`` in the caller's atomic output); later jobs are
skipped. :meth:`~WriteBehind.abort` stops the thread without raising (the caller is already failing).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional


class WriteBehind:
    def __init__(self, max_in_flight: int = 2, name: str = "qalora-writer"):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._slots = threading.Semaphore(max_in_flight)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._error: Optional[BaseException] = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if self._error is None:
                    job()
            except BaseException as exc:  # raised in the caller's thread (reserve/close)
                self._error = exc
            finally:
                job = None  # drop the item's data before its slot frees
                self._slots.release()

    def reserve(self) -> None:
        """Wait for a free slot (before producing the next item); raise a failed write's error."""
        self._slots.acquire()
        if self._error is not None:
            self._slots.release()
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (it writes the item produced after the last :meth:`reserve`)."""
        self._jobs.put(job)

    def write(self, job: Callable[[], None]) -> None:
        """:meth:`reserve` + :meth:`submit`, for an item that already exists."""
        self.reserve()
        self.submit(job)

    def _stop(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        self._thread.join()

    def close(self) -> None:
        """Wait for every queued write; raise the first failed write's error."""
        self._stop()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Skip what is still queued and stop the thread; never raises."""
        if self._error is None:
            self._error = _Aborted()
        self._stop()


class _Aborted(Exception):
    """Marks a writer whose caller failed: the jobs still queued are skipped."""
