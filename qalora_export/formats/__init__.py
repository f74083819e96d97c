"""The output formats: one package each under ``formats/<name>/``, registered here by name.

Each package exposes ``FORMAT``, an object implementing :class:`~.protocol.Format` (what a format
implements, and how to add one: docs/design.md §10). Adding a format is one package and one line in
:data:`FORMATS`; nothing outside ``formats/`` names a format.

Importing this package (or looping over the registry) imports no runtime (onnxruntime, llama.cpp,
GPTQModel) and no container library: a format's package ``__init__`` defers its stages.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from qalora_export.errors import ConfigError
from qalora_export.extras import EXTRA_MODULES, Requirement, require
from qalora_export.formats.protocol import Format

# name -> package; order is the order of --help listings and of detection
FORMATS: dict[str, str] = {
    "gptq": "qalora_export.formats.gptq",
    "onnx": "qalora_export.formats.onnx",
    "gguf": "qalora_export.formats.gguf",
    "mlx": "qalora_export.formats.mlx",
}
#: ``merge --to`` without the flag: the format the base already is (an AutoGPTQ checkpoint).
DEFAULT_FORMAT = "gptq"


def get_format(name: str) -> Format:
    """The format registered as ``name``.

    Raises:
        ConfigError: no format of that name.
        MissingExtraError: its package needs an optional package that is not installed.
    """
    if name not in FORMATS:
        raise ConfigError(f"--to {name!r} is not a known format; choose one of {sorted(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[name]).FORMAT
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("qalora_export.formats"):
            raise ConfigError(f"the {name} format is not available in this build") from exc
        extra = next((e for e, modules in EXTRA_MODULES.items() if exc.name in modules), None)
        if extra is not None:
            require(Requirement(extra, (exc.name,)), f"the {name} format")
        raise


def all_formats() -> list[Format]:
    """Every registered format, in registry order."""
    return [get_format(name) for name in FORMATS]


def detect_format(path: Path) -> Format:
    """The format of the artifact at ``path`` (each format's ``detect``, in registry order).

    Raises:
        ConfigError: no format recognises it.
    """
    path = Path(path)
    for fmt in all_formats():
        if fmt.detect(path):
            return fmt
    kinds = ", ".join(f"{fmt.artifact} ({fmt.name})" for fmt in all_formats())
    raise ConfigError(f"cannot tell the format of {path}: expected {kinds}")
