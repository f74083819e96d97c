"""Shared pieces of the hypothesis fuzz tests (``test_fuzz_*.py``): the template models the
mutations start from and a scratch workspace, both built once per module.

The mutation strategies and the typed-error checks live in ``fuzz/harness.py`` and
``fuzz/mutations.py``, shared with the coverage-guided atheris harness ``fuzz/run.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import harness  # noqa: E402


@pytest.fixture(scope="module")
def tpl() -> Path:
    """Directory of small template artifacts (base, adapter, GGUF, ONNX) to mutate."""
    return harness.build_test_templates()


@pytest.fixture(scope="module")
def ws():
    """A scratch workspace where mutated copies are written and read back."""
    w = harness.Workspace()
    yield w
    w.close()
