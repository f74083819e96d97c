"""Fuzz targets for every reader qalora-export owns, shared by atheris (``fuzz/run.py``) and the
hypothesis tests (``tests/fuzz/test_fuzz_*.py``).

Each target takes one input (bytes) and the template directory written by ``fuzz/seeds.py``,
rebuilds an artifact around the input in a fresh directory, and runs the project's reader on it.
The contract under test: the reader returns a result or raises a
:class:`qalora_export.errors.QALoRAExportError` subclass; any other exception, a crash or a hang
is a bug. Targets return what they decoded so that tests can also check for silent wrong results.

Input encodings (what the corpora under ``fuzz/corpus/<target>/`` hold):

==============  =============================================================================
target          input bytes
==============  =============================================================================
safetensors     a whole ``model.safetensors`` of a GPTQ base (configs from the template)
gptq_config     choice byte (0: config.json, 1: quantize_config.json) + that file's bytes
adapter         choice byte (0: adapter_config.json, 1: qalora_export.json,
                2: adapter_model.safetensors) + that file's bytes (empty: file removed)
gguf            a whole ``.gguf`` file (``read_weights`` and ``read_file_types``)
onnx            choice byte (0: model.onnx, 1: model.onnx.data) + that file's bytes
jsonl           a whole JSONL training-data file (``data.read_jsonl``)
==============  =============================================================================
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

CONFIG_FILES = ("config.json", "quantize_config.json")
ADAPTER_FILES = ("adapter_config.json", "qalora_export.json", "adapter_model.safetensors")
ONNX_FILES = ("model.onnx", "model.onnx.data")
TARGETS = ("safetensors", "gptq_config", "adapter", "gguf", "onnx", "jsonl")


def encode_choice(choice: int, payload: bytes) -> bytes:
    return bytes([choice]) + payload


def decode_choice(data: bytes, n: int) -> tuple[int, bytes]:
    if not data:
        return 0, b""
    return data[0] % n, data[1:]


class Workspace:
    """Hands out a fresh empty directory per execution and removes the previous one.

    A fresh path per input matters: readers memory-map files, and rewriting a file that an old
    mapping still covers could fault.
    """

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="qalora-fuzz-"))
        self._counter = itertools.count()
        self._current: Optional[Path] = None

    def fresh(self) -> Path:
        if self._current is not None:
            shutil.rmtree(self._current, ignore_errors=True)
        self._current = self.root / f"x{next(self._counter)}"
        self._current.mkdir(parents=True)
        return self._current

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _copy_dir(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    for item in src.iterdir():
        if item.is_file() and item.name not in skip:
            shutil.copyfile(item, dst / item.name)


def _read_checkpoint(directory: Path) -> dict:
    from qalora_export.checkpoint.gptq import GPTQCheckpoint

    ckpt = GPTQCheckpoint(directory)
    layers = {name: ckpt.read_layer(name) for name in ckpt.quantized_modules}
    others = {key: ckpt.read_tensor(key) for key in ckpt.other_tensor_names()}
    return {"config": ckpt.config, "layers": layers, "others": others, "fingerprint": ckpt.fingerprint()}


# ----------------------------------------------------------------------------------- targets


def target_safetensors(data: bytes, tpl: Path, ws: Workspace) -> dict:
    d = ws.fresh()
    _copy_dir(tpl / "base", d, skip=("model.safetensors",))
    (d / "model.safetensors").write_bytes(data)
    return _read_checkpoint(d)


def target_gptq_config(data: bytes, tpl: Path, ws: Workspace) -> dict:
    choice, payload = decode_choice(data, len(CONFIG_FILES))
    d = ws.fresh()
    _copy_dir(tpl / "base", d, skip=CONFIG_FILES)
    cfg = json.loads((tpl / "base" / "config.json").read_text())
    if choice == 0:
        (d / "config.json").write_bytes(payload)
        shutil.copyfile(tpl / "base" / "quantize_config.json", d / "quantize_config.json")
    else:  # config.json without quantization_config: the reader falls back to quantize_config.json
        cfg.pop("quantization_config", None)
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "quantize_config.json").write_bytes(payload)
    return _read_checkpoint(d)


def target_adapter(data: bytes, tpl: Path, ws: Workspace) -> dict:
    from qalora_export.core.adapter import adapter_delta
    from qalora_export.checkpoint.adapter_files import load_adapter
    from qalora_export.checkpoint.gptq import GPTQCheckpoint
    from qalora_export.checkpoint.merged_view import MergedView

    choice, payload = decode_choice(data, len(ADAPTER_FILES))
    d = ws.fresh()
    _copy_dir(tpl / "adapter", d, skip=(ADAPTER_FILES[choice],))
    if payload:
        (d / ADAPTER_FILES[choice]).write_bytes(payload)
    adapter = load_adapter(d, pooling="peft" if choice == 1 and not payload else None)
    model = MergedView(GPTQCheckpoint(tpl / "base"), adapter)
    folded = {}
    for name in sorted(adapter.layers):
        layer, _ = model.read_layer(name)
        adapter_delta(adapter, name, layer.in_features)
        folded[name] = layer
    # load_adapter reads factors from the file on demand, and the workspace is reused: keep them
    return {"adapter": dataclasses.replace(adapter, layers=dict(adapter.layers)), "folded": folded}


def target_gguf(data: bytes, tpl: Path, ws: Workspace) -> dict:
    from qalora_export.formats import get_format
    from qalora_export.formats.gguf.read import read_file_types

    gguf = get_format("gguf")
    path = ws.fresh() / "model.gguf"
    path.write_bytes(data)
    weights = dict(gguf.read_weights(path))
    return {"weights": weights, "types": read_file_types(path)}


def target_onnx(data: bytes, tpl: Path, ws: Workspace) -> dict:
    from qalora_export.formats import get_format

    onnx = get_format("onnx")
    choice, payload = decode_choice(data, len(ONNX_FILES))
    d = ws.fresh()
    _copy_dir(tpl / "onnx", d, skip=(ONNX_FILES[choice],))
    (d / ONNX_FILES[choice]).write_bytes(payload)
    weights = dict(onnx.read_weights(d))
    return {"weights": weights, "meta": onnx.merge_metadata(d)}


def target_jsonl(data: bytes, tpl: Path, ws: Workspace) -> dict:
    from qalora_export.training.examples import read_jsonl

    path = ws.fresh() / "data.jsonl"
    path.write_bytes(data)
    return {"records": read_jsonl(path)}


TARGET_FUNCS: dict[str, Callable[[bytes, Path, Workspace], dict]] = {
    name: globals()[f"target_{name}"] for name in TARGETS
}


def run_one(target: str, data: bytes, tpl: Path, ws: Workspace):
    """Run ``target`` on ``data``: its result, or the typed error it raised (any other exception
    propagates: that is a finding)."""
    from qalora_export.errors import QALoRAExportError

    try:
        return TARGET_FUNCS[target](data, tpl, ws)
    except QALoRAExportError as exc:
        return exc


def default_templates() -> Path:
    """``fuzz/corpus/_templates`` (``fuzz/seeds.py`` writes it)."""
    return Path(os.environ.get("QALORA_FUZZ_CORPUS", Path(__file__).resolve().parent / "corpus")) / "_templates"


_BUILT: dict[str, Path] = {}


def build_test_templates() -> Path:
    """Templates built once per process in a temporary directory (for the hypothesis tests, which
    must not depend on a corpus directory that may be stale)."""
    if "tpl" not in _BUILT:
        import sys

        here = str(Path(__file__).resolve().parent)
        if here not in sys.path:
            sys.path.insert(0, here)
        import seeds

        _BUILT["tpl"] = seeds.build_templates(Path(tempfile.mkdtemp(prefix="qalora-fuzz-tpl-")))
    return _BUILT["tpl"]


def check_typed(target: str, data: bytes, tpl: Path, ws: Workspace, seconds: float = 20.0):
    """:func:`run_one` under a deadline: the result or the typed error; anything else raises."""
    from mutations import deadline

    with deadline(seconds):
        return run_one(target, data, tpl, ws)
