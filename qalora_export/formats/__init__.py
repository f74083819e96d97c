"""Output formats, one module each, registered by name and imported only when used.

Each converter module exposes:

- ``FORMAT``: its name on the command line (``--to NAME``);
- ``export(model: MergedModel, out: Path, **options) -> ExportSummary``: writes the artifact
  atomically and returns what it did (rounded zeros, refused constraints, sizes);
- ``read_weights(path) -> Iterator[tuple[str, torch.Tensor]]``: decodes the artifact with the
  project's own reader into effective float64 ``[out, in]`` weights, for verify's weight level;
- ``read_weight_rows(path) -> Iterator[tuple[str, WeightRows]]`` (optional): the same weights
  decoded a row block at a time (``qalora_export.core.weight_rows``), which verify prefers;
- ``declared_layer(model, name, meta) -> QuantizedLinear`` (optional): the record the artifact
  declares it holds (the fold, rounded as its metadata says); default: the exact fold;
- ``WEIGHT_TOLERANCE``: the weight-level tolerance next to the format's spec;
- ``EXPORT_REQUIRES`` / ``RUNTIME_REQUIRES``: the optional packages (``qalora_export.extras``) that
  writing and verifying need, checked before the work starts;
- ``RUNTIME``: the runtime ``verify_runtime`` drives (``runtimes.isolation.RuntimeInfo``), named
  when it crashes in verify's child process.

Importing this package imports no runtime (onnxruntime, llama.cpp, GPTQModel).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from qalora_export.errors import ConfigError
from qalora_export.extras import EXTRA_MODULES, Requirement, require

FORMATS: dict[str, str] = {
    "gptq": "qalora_export.formats.gptq.format",
    "onnx": "qalora_export.formats.onnx.format",
    "gguf": "qalora_export.formats.gguf.format",
}


def get_converter(name: str) -> ModuleType:
    """The converter module registered as ``name``."""
    if name not in FORMATS:
        raise ConfigError(f"--to {name!r} is not a known format; choose one of {sorted(FORMATS)}")
    try:
        return importlib.import_module(FORMATS[name])
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("qalora_export.formats"):
            raise ConfigError(f"the {name} converter is not available in this build") from exc
        extra = next((e for e, modules in EXTRA_MODULES.items() if exc.name in modules), None)
        if extra is not None:
            require(Requirement(extra, (exc.name,)), f"the {name} format")
        raise
