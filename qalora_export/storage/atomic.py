"""Small file-system helpers: atomic outputs and checked JSON reading.

Outputs are built in a temporary sibling path and renamed into place only when complete, so an
interrupted run leaves either nothing or a whole artifact, never a partial one.

Temporary siblings are hidden and named ``.NAME.<pid>-<host>.<random>.partial`` (``.old`` for
the previous output while ``--overwrite`` swaps it out). A run killed with SIGKILL cannot remove
its own; the next run writing the same ``NAME`` removes those whose process, on this host, is
gone (:func:`remove_stale_siblings`), so leftovers never accumulate and never look like output.

An ``OSError`` while writing (disk full, file too large for ``ulimit -f``, no permission; also
the same errors reported by the safetensors writer as text) becomes :class:`OutputWriteError`,
raised after the temporary output has been removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence, Type

from qalora_export.errors import OutputExistsError, OutputWriteError, QALoRAExportError


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an existing output path unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists; choose another path or pass --overwrite")


@contextlib.contextmanager
def atomic_output_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; rename it to ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is untouched; an ``OSError``
    (disk full, ...) is re-raised as :class:`OutputWriteError`.
    """
    path = Path(path)
    check_output_path(path, overwrite)
    tmp = _temp_dir_beside(path)
    try:
        with _write_errors(path):
            yield tmp
            _normal_permissions(tmp)
            if path.exists():
                if not overwrite:  # appeared while we worked
                    raise OutputExistsError(f"output {path} appeared while writing; nothing was replaced")
                backup = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
                os.rename(path, backup / "old")
                os.rename(tmp, path)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temp_dir_beside(path: Path) -> Path:
    """A fresh hidden ``.partial`` directory next to ``path`` (its parent created, stale siblings of
    dead runs removed first); errors as :func:`atomic_output_dir`."""
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(path)
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".partial", dir=path.parent))


@contextlib.contextmanager
def atomic_output_file(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it over ``path`` on success.

    Errors as :func:`atomic_output_dir`.
    """
    path = Path(path)
    check_output_path(path, overwrite)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_siblings(path)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".partial", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with _write_errors(path):
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_output_files(paths: Sequence[Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to ``paths`` (one directory); on success move each
    ``tmp / path.name`` onto its ``path`` (split outputs: several files that belong together).

    Nothing is visible until everything is written; each file then appears by an atomic rename,
    so only a crash between the renames (milliseconds) could leave part of the set. Errors as
    :func:`atomic_output_dir`.
    """
    paths = [Path(p) for p in paths]
    if not paths or any(p.parent != paths[0].parent for p in paths):
        raise ValueError(f"atomic_output_files needs paths in one directory, got {paths}")
    for path in paths:
        check_output_path(path, overwrite)
    first = paths[0]
    tmp = _temp_dir_beside(first)
    try:
        with _write_errors(first):
            yield tmp
            _normal_permissions(tmp)
            for path in paths:
                os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_group(anchor: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``anchor``; on success move every entry made in it into
    ``anchor``'s directory: an artifact and what ships beside it (its handoff bundle) appear together.

    Directories move before files, so a single-file artifact never appears without the bundle
    directory beside it. Each target is checked before anything moves (``OutputExistsError`` unless
    ``overwrite``); errors as :func:`atomic_output_dir`.
    """
    anchor = Path(anchor)
    check_output_path(anchor, overwrite)
    tmp = _temp_dir_beside(anchor)
    try:
        with _write_errors(anchor):
            yield tmp
            _normal_permissions(tmp)
            entries = sorted(tmp.iterdir(), key=lambda p: (not p.is_dir(), p.name))
            for entry in entries:
                check_output_path(anchor.parent / entry.name, overwrite)
            for entry in entries:
                target = anchor.parent / entry.name
                if target.exists() or target.is_symlink():
                    backup = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".old", dir=anchor.parent))
                    os.rename(target, backup / "old")
                    os.rename(entry, target)
                    shutil.rmtree(backup, ignore_errors=True)
                else:
                    os.rename(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# errno values that mean "the output does not fit", and how the safetensors writer (Rust) words them.
_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_NEARLY_FULL = 1 << 20  # a short write with less free space than this: the disk is full


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Turn OSErrors (and the safetensors writer's I/O errors) while writing ``path`` into
    :class:`OutputWriteError`; typed errors and everything else pass through."""
    try:
        yield
    except QALoRAExportError:
        raise
    except OSError as exc:
        code = exc.errno
        if code is None and _SHORT_WRITE.search(str(exc)):  # numpy's tofile reports a short write so
            code = errno.ENOSPC if _free_bytes(path) < _NEARLY_FULL else errno.EFBIG
        raise _write_error(path, code, exc.strerror or str(exc)) from exc
    except Exception as exc:
        match = _OS_ERROR_TEXT.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
        if match is None:
            raise
        raise _write_error(path, int(match.group(1)), str(exc)) from exc


def _write_error(path: Path, code: Optional[int], detail: str) -> OutputWriteError:
    where = Path(path).parent
    if code in _FULL_ERRNOS:
        what = ("the disk is full" if code == errno.ENOSPC else
                "the file size limit was reached (ulimit -f)" if code == errno.EFBIG else "the disk quota is exceeded")
        return OutputWriteError(
            code, f"cannot write {path}: {what} ({detail}); nothing was written (the partial output was removed). "
                  f"Free space in {where} (or raise the limit), or pass an --output on another disk")
    return OutputWriteError(code, f"cannot write {path} ({detail}); nothing was written. Check that {where} is "
                                  f"writable, or pass another --output")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{_host_tag()}."


def remove_stale_siblings(path: Path) -> list[Path]:
    """Remove ``.NAME.<pid>-<host>.*.partial|.old`` siblings of ``path`` left by dead processes.

    Only entries of this exact ``NAME``, made on this host by a process that no longer exists,
    are removed, so a concurrent run (or one on another machine sharing the directory) is never
    disturbed. Returns what was removed.
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"(\d+)-([0-9a-f]{8})\.[^.]+\.(partial|old)$")
    removed = []
    if not path.parent.is_dir():
        return removed
    host = _host_tag()
    for entry in path.parent.iterdir():
        m = pattern.match(entry.name)
        if m is None or m.group(2) != host or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal_permissions(directory: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give outputs the usual umask modes."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def read_json(path: Path, error: Type[QALoRAExportError]) -> dict:
    """Read a JSON object from ``path``, raising ``error`` with the path on any problem."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 JSON") from exc
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except (ValueError, RecursionError) as exc:  # integers over Python's digit limit; absurd nesting
        raise error(f"{path} is not JSON this tool can read ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value
