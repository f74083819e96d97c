"""Optional dependencies ("extras") and the check every verb makes before it needs one.

The core (quantize, train, merge to AutoGPTQ and GGUF) needs only the base requirements. Each
runtime and the ONNX writer come with a pip extra; a verb that needs one checks for its modules
first and fails with :class:`~qalora_export.errors.MissingExtraError`, naming the exact
``pip install`` line, instead of a traceback from deep inside the work.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

from qalora_export.errors import MissingExtraError

# extra name -> the import names of what it installs (pyproject.toml's [project.optional-dependencies])
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "gptq": ("gptqmodel", "optimum", "peft"),
    "onnx": ("onnx", "onnxruntime", "onnxruntime_genai"),
    "llamacpp": ("llama_cpp",),
    "mlx": ("mlx", "mlx_lm"),
}

# What to add to the message of an extra whose plain pip install can go wrong.
_EXTRA_NOTES = {
    "llamacpp": (" llama-cpp-python is built from source; on CPUs that advertise AMX build it without native "
                 "flags: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" "
                 "pip install --no-cache-dir 'qalora-export[llamacpp]' (README, 'Installing llama-cpp-python')."),
}


@dataclass(frozen=True)
class Requirement:
    """Modules of one extra that a piece of work imports (a subset of ``EXTRA_MODULES[extra]``)."""

    extra: str
    modules: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = set(self.modules) - set(EXTRA_MODULES[self.extra])
        if unknown:
            raise ValueError(f"modules {sorted(unknown)} are not in the {self.extra!r} extra")


def module_available(name: str) -> bool:
    """True when ``name`` can be imported (without importing it: some runtimes print banners)."""
    if name in sys.modules:
        return sys.modules[name] is not None  # None: import blocked (as tests do to simulate absence)
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(requirements: "Requirement | tuple[Requirement, ...] | list[Requirement]", purpose: str) -> None:
    """Raise :class:`MissingExtraError` if any module of ``requirements`` is missing.

    Args:
        requirements: one requirement or several.
        purpose: what needs them, as the message says it, e.g. ``"verify (onnxruntime)"``.
    """
    if isinstance(requirements, Requirement):
        requirements = (requirements,)
    for requirement in requirements:
        missing = [m for m in requirement.modules if not module_available(m)]
        if missing:
            raise MissingExtraError(
                f"{purpose} needs {', '.join(missing)}, which is not installed: "
                f"pip install 'qalora-export[{requirement.extra}]'{_EXTRA_NOTES.get(requirement.extra, '')}")
