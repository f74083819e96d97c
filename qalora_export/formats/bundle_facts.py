"""Facts the format packages' ``handoff`` stages share (docs/design.md §11): package versions read
from installed metadata (no runtime is imported), the fingerprint of a directory's tokenizer, and
the floor-based limits of a runtime level turned into the handoff bundle's limits.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Optional

# the files that define a tokenizer's vocabulary and splitting (configs name paths and versions too,
# which a copy of the same tokenizer may change: they are left out)
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` ("not installed" when it is not)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(*distributions: str) -> str:
    """``"onnxruntime 1.23.0, onnxruntime-genai 0.9.0"``."""
    return ", ".join(f"{d} {package_version(d)}" for d in distributions)


def directory_tokenizer_fingerprint(directory: Path) -> str:
    """sha256 over the vocabulary files of ``directory`` (names and bytes, in a fixed order);
    ``"none"`` when it has none."""
    digest = hashlib.sha256()
    found = False
    for name in VOCABULARY_FILES:
        path = Path(directory) / name
        if path.is_file():
            found = True
            digest.update(name.encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest() if found else "none"


def floor_limit(floor: Optional[dict], key: str, factor: float, epsilon: float, op: str = "max") -> dict:
    """``{"max": factor * floor[key] + epsilon}`` (``{"min": factor * floor[key]}`` for ``op="min"``)
    from a floor measured by the export's runtime level; ``{op: None}`` with the reason when the
    export did not run it (verify without a base then fails the check, naming ``--verify``)."""
    if not floor or floor.get(key) is None:
        return {op: None, "reason": "the export did not run the runtime level, so no floor was measured; "
                                    "re-export with --verify"}
    value = float(floor[key])
    return {op: factor * value + epsilon if op == "max" else factor * value, "floor": value}
