"""DirectWriter (qalora_export/storage/direct_io.py): the bytes are those a plain file would hold, with or
without O_DIRECT, from any start offset, for writes of any size; failures surface in the caller."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_export.storage import direct_io
from qalora_export.storage.direct_io import ALIGN, DirectWriter


def _chunks(rng: np.random.Generator, sizes: list[int]) -> list[bytes]:
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


def _write_all(path: Path, chunks: list[bytes], offset: int = 0, **kw) -> DirectWriter:
    w = DirectWriter(path, offset, **kw)
    for c in chunks:
        assert w.write(c) == memoryview(c).nbytes
    w.close()
    return w


@pytest.mark.parametrize("direct", [True, False])
@given(sizes=st.lists(st.integers(0, 3 * 8192 + 17), max_size=12),
       prefix=st.integers(0, 3 * ALIGN + 5), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=25, deadline=None)
def test_bytes_equal_a_plain_file(tmp_path_factory, direct, sizes, prefix, seed):
    """Random chunk sizes (empty, 1 byte, several buffers), small buffers so that every write
    crosses hand-overs, after a prefix already in the file (a GGUF header) or from 0."""
    tmp = tmp_path_factory.mktemp("dw")
    rng = np.random.default_rng(seed)
    head = rng.integers(0, 256, prefix, dtype=np.uint8).tobytes()
    chunks = _chunks(rng, sizes)
    path = tmp / "out.bin"
    path.write_bytes(head + b"tail that is overwritten" * 10 if prefix else b"old content")
    w = DirectWriter(path, prefix, buffer_bytes=8192, direct=direct)
    for c in chunks:
        w.write(c)
    assert w.tell() == prefix + sum(sizes)
    w.close()
    expected = head + b"".join(chunks)
    got = path.read_bytes()
    assert got[:len(expected)] == expected
    # a file that was longer than what was written keeps its old bytes after the end (as a file
    # opened "r+b"); at offset 0 it is truncated
    if prefix == 0:
        assert len(got) == len(expected)


def test_numpy_arrays_and_memoryviews_are_written_as_their_bytes(tmp_path):
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((33, 7)).astype(np.float16), rng.integers(-9, 9, (5, 4, 3), dtype=np.int32),
             memoryview(b"abc"), bytearray(b"xyz" * 5000)]
    path = tmp_path / "arrays.bin"
    _write_all(path, parts, buffer_bytes=ALIGN)
    assert path.read_bytes() == b"".join(bytes(memoryview(p).cast("B")) for p in parts)


def test_large_write_goes_around_the_page_cache_where_supported(tmp_path):
    """On a file system with O_DIRECT (ext4, xfs, tmpfs since 6.6) the writer stays direct; where
    it is refused at open it falls back; the bytes are the same."""
    data = np.random.default_rng(2).integers(0, 256, 5 * (1 << 20) + 123, dtype=np.uint8)
    path = tmp_path / "big.bin"
    w = _write_all(path, [data[: 1 << 20], data[1 << 20:]], buffer_bytes=1 << 20)
    assert path.read_bytes() == data.tobytes()
    assert isinstance(w.direct, bool)


def test_einval_at_a_write_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    """O_DIRECT refused at write time (alignment rules of another device): same bytes, plainly."""
    real_pwrite = os.pwrite
    direct_fds: set[int] = set()
    real_open = os.open

    def fake_open(path, flags, *args):
        fd = real_open(path, flags & ~getattr(os, "O_DIRECT", 0), *args)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_fds.add(fd)
        return fd

    def fake_pwrite(fd, data, at):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, at)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "pwrite", fake_pwrite)
    monkeypatch.setattr(direct_io, "direct_io_enabled", lambda: True)
    monkeypatch.setattr(os, "O_DIRECT", getattr(os, "O_DIRECT", 0o40000), raising=False)
    chunks = _chunks(np.random.default_rng(3), [10000, 20000, 5])
    path = tmp_path / "f.bin"
    w = DirectWriter(path, buffer_bytes=8192)
    assert w.direct
    for c in chunks:
        w.write(c)
    w.close()
    assert not w.direct
    assert path.read_bytes() == b"".join(chunks)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EIO])
def test_a_failed_write_is_raised_in_the_callers_thread(tmp_path, monkeypatch, code):
    def failing(fd, data, at):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwrite", failing)
    w = DirectWriter(tmp_path / "f.bin", buffer_bytes=ALIGN)
    with pytest.raises(OSError) as info:
        for _ in range(10):  # the thread's error comes out at a later write or at close
            w.write(b"x" * ALIGN)
        w.close()
    assert info.value.errno == code
    w.abort()  # after a failure: never raises, closes
    w.close()  # and closing again is a no-op


def test_error_in_the_final_tail_is_raised_by_close(tmp_path, monkeypatch):
    w = DirectWriter(tmp_path / "f.bin", buffer_bytes=ALIGN, direct=False)
    w.write(b"y" * 10)
    monkeypatch.setattr(os, "pwrite", lambda fd, data, at: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError) as info:
        w.close()
    assert info.value.errno == errno.ENOSPC


def test_abort_writes_nothing_more_and_never_raises(tmp_path):
    path = tmp_path / "f.bin"
    w = DirectWriter(path, buffer_bytes=ALIGN)
    w.write(b"z" * 100)
    w.abort()
    assert path.stat().st_size == 0
    w.abort()


def test_offset_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"12345")
    with pytest.raises(ValueError, match="fewer than offset"):
        DirectWriter(path, 6)
    assert path.read_bytes() == b"12345"


def test_environment_switch_turns_direct_io_off(tmp_path, monkeypatch):
    monkeypatch.setenv(direct_io.ENV_SWITCH, "0")
    w = DirectWriter(tmp_path / "f.bin")
    assert not w.direct
    w.write(b"plain")
    w.close()
    assert (tmp_path / "f.bin").read_bytes() == b"plain"


def test_write_after_close_is_refused(tmp_path):
    w = DirectWriter(tmp_path / "f.bin")
    w.write(b"done")
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write(b"more")
    assert (tmp_path / "f.bin").read_bytes() == b"done"


def test_close_after_a_reported_failure_writes_nothing_more(tmp_path, monkeypatch):
    real_pwrite = os.pwrite
    calls = []

    def failing_once(fd, data, at):
        calls.append(at)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "full")
        return real_pwrite(fd, data, at)

    monkeypatch.setattr(os, "pwrite", failing_once)
    w = DirectWriter(tmp_path / "f.bin", buffer_bytes=ALIGN)
    with pytest.raises(OSError):
        for _ in range(6):
            w.write(b"q" * ALIGN)
    n = len(calls)
    w.write(b"r" * 10)  # the caller may still write while unwinding: ignored
    w.close()  # no tail written after the failure
    assert len(calls) == n
