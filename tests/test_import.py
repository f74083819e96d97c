"""Importing the package is cheap (docs/design.md §6): no CUDA initialisation, no optional runtime.

Each check runs in a fresh interpreter, since this test process itself imports GPTQModel, PEFT
and friends in other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

OPTIONAL_RUNTIMES = ("onnxruntime", "llama_cpp", "gptqmodel", "peft", "optimum", "triton")

CORE_MODULES = (
    "qalora_export",
    "qalora_export.formats",
    "qalora_export.errors",
    "qalora_export.storage.atomic",
    "qalora_export.core.packing",
    "qalora_export.core.record",
    "qalora_export.checkpoint.gptq",
    "qalora_export.core.adapter",
    "qalora_export.core.fold",
    "qalora_export.checkpoint.merged_view",
    "qalora_export.modeling.qalora_linear",
    "qalora_export.modeling.model",
    "qalora_export.quantization.quantize",
    "qalora_export.checkpoint.float_source",
    "qalora_export.cli",
    "qalora_export.console",
    "qalora_export.extras",
    "qalora_export.runtimes.isolation",
    "qalora_export.verify",
)

PROBE = r"""
import importlib, json, sys
importlib.import_module(sys.argv[1])
import torch
print(json.dumps({
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in %r),
    "cuda_initialized": torch.cuda.is_initialized(),
}))
""" % (OPTIONAL_RUNTIMES,)


def probe(module: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["qalora_export", "qalora_export.formats"])
def test_package_import_is_cheap(module):
    result = probe(module)
    assert result["modules"] == [], f"importing {module} imported {result['modules']}"
    assert result["cuda_initialized"] is False


def test_core_modules_import_no_optional_runtime():
    code = ("import importlib, json, sys\n"
            f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
            "import torch\n"
            f"print(json.dumps([m for m in sys.modules if m.split('.')[0] in {OPTIONAL_RUNTIMES!r}]"
            " + (['CUDA'] if torch.cuda.is_initialized() else [])))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
