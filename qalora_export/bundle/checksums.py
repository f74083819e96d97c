"""``SHA256SUMS`` in ``sha256sum``'s format (``<hex>  <path>``, two spaces, paths relative to the
bundle directory, so ``cd BUNDLE && sha256sum -c SHA256SUMS`` checks it) and its check."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from qalora_export.errors import ConfigError

CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_sums(bundle: Path, files: list[Path], out: Path) -> None:
    """Hash ``files`` and write ``out``, each path relative to ``bundle`` (``../model.onnx``)."""
    lines = [f"{sha256_file(f)}  {Path(os.path.relpath(f, bundle)).as_posix()}" for f in sorted(files)]
    Path(out).write_text("\n".join(lines) + "\n")


def read_sums(path: Path) -> list[tuple[str, str]]:
    """``(hex digest, relative path)`` of every line.

    Raises:
        ConfigError: a line that is not ``<64 hex>  <path>``.
    """
    entries = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not line.strip():
            continue
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not name:
            raise ConfigError(f"{path}, line {number}: not '<sha256>  <path>' (sha256sum's format); "
                              f"re-export the artifact to rewrite its bundle")
        entries.append((digest, name))
    return entries


def check_sums(bundle: Path, sums: Path) -> dict:
    """Every entry of ``sums`` against the file it names: ``{"passed", "files", "mismatched", "missing"}``."""
    mismatched, missing, entries = [], [], read_sums(sums)
    for digest, name in entries:
        path = Path(bundle) / name
        if not path.is_file():
            missing.append(name)
        elif sha256_file(path) != digest:
            mismatched.append(name)
    return {"passed": not (mismatched or missing) and bool(entries), "files": len(entries),
            "mismatched": mismatched, "missing": missing}
