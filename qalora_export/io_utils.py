"""Small file-system helpers: atomic outputs and checked JSON reading.

Outputs are built in a temporary sibling path and renamed into place only when complete, so an
interrupted run leaves either nothing or a whole artifact, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Type

from .errors import OutputExistsError, QALoRAExportError


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an existing output path unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"output {path} already exists; choose another path or pass --overwrite")


@contextlib.contextmanager
def atomic_output_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; rename it to ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if path.exists():
            if not overwrite:  # appeared while we worked
                raise OutputExistsError(f"output {path} appeared while writing; nothing was replaced")
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, backup / "old")
            os.rename(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_output_file(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; rename it over ``path`` on success."""
    path = Path(path)
    check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


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
