"""The handoff bundle of a GPTQ export (docs/design.md §11), as test_bundle.py checks it for gguf and
onnx: the checkpoint directory copied to a clean directory re-verifies with neither base nor adapter
present, PEFT absent and our trainer and model code blocked from import; GPTQModel stays importable,
since it is the gptq format's runtime. One changed byte of a model file fails,
naming the file.

A tiny model (hidden 64, 2 layers) and an integer-shift adapter, so that the export is exact
(docs/design.md §3.1); GPTQModel on CPU takes about 30 s per run here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import tiny_models

from qalora_export.bundle import CARD, REFERENCE, SUMS, bundle_dir
from qalora_export.bundle.checksums import read_sums
from qalora_export.cli import EXIT_OK, EXIT_VERIFY_FAILED, main

pytest.importorskip("gptqmodel")

# the clean re-verify: PEFT is not installed there (``sys.modules[name] = None``: imports fail and
# ``importlib.util.find_spec`` says absent, as transformers probes it), and our training and model code
# must not be imported at all (a finder that raises); GPTQModel is the runtime and stays
ABSENT = ("peft",)
BLOCKED = ("qalora_export.training", "qalora_export.modeling")
SITECUSTOMIZE = f'''
import importlib.abc, sys
for name in {ABSENT!r}:
    sys.modules[name] = None
BLOCKED = {BLOCKED!r}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is blocked: verify without a base must not import it")
        return None
sys.meta_path.insert(0, _Block())
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bundle-gptq")
    models = root / "models"
    base = tiny_models.make_tiny_base(models / "base", bits=4, group_size=32)
    adapter = tiny_models.make_random_adapter(base, models / "adapter", rank=4, seed=0, integral_shift=True)
    out = root / "out" / "merged-gptq"
    assert main(["merge", str(base), str(adapter), "--to", "gptq", "-o", str(out),
                 "--log-file", str(root / "log.txt")]) == EXIT_OK
    return {"root": root, "models": models, "base": base, "adapter": adapter, "gptq": out}


def _copy(artifact: Path, to: Path) -> Path:
    """The checkpoint directory, its bundle inside, copied into ``to`` (what the receiving team gets)."""
    to.mkdir(parents=True, exist_ok=True)
    shutil.copytree(artifact, to / artifact.name)
    return to / artifact.name


def _verify_clean(copy: Path, tmp_path: Path, world: dict) -> tuple[subprocess.CompletedProcess, dict, ET.Element]:
    """``qalora-export verify COPY`` in a child with the training stack blocked and the models moved away."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    hidden = world["root"] / "models-away"
    os.rename(world["models"], hidden)  # the base and the adapter are not there
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "qalora_export.cli", "verify", str(copy), "--junit-xml",
                               str(tmp_path / "results.xml"), "--report", str(tmp_path / "report.json"),
                               "--log-file", str(tmp_path / "log.txt")],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    finally:
        os.rename(hidden, world["models"])
    return (proc, json.loads((tmp_path / "report.json").read_text()),
            ET.parse(tmp_path / "results.xml").getroot())


def _check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def test_export_writes_the_bundle(world):
    bundle = bundle_dir(world["gptq"])
    assert bundle.parent == world["gptq"]  # a directory artifact carries its bundle inside
    listed = {name for _, name in read_sums(bundle / SUMS)}
    assert {CARD, REFERENCE, "verify.json", "verify.md", "../model.safetensors", "../config.json"} <= listed
    verify = json.loads((bundle / "verify.json").read_text())
    assert verify["passed"] and verify["runtime"]["passed"] and verify["weights"]["merge"]["exact"]
    assert "GPTQModel" in (bundle / CARD).read_text()


def test_copied_checkpoint_reverifies_without_base_adapter_or_training_stack(world, tmp_path):
    copy = _copy(world["gptq"], tmp_path / "edge")
    proc, report, suite = _verify_clean(copy, tmp_path, world)
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr + (tmp_path / "log.txt").read_text()
    names = [c["name"] for c in report["checks"]]
    assert names[:3] == ["checksums", "reference", "tokenizer"]
    assert {"runtime max_abs_logit_diff", "runtime mean_kl", "runtime top1_agreement"} <= set(names)
    assert report["passed"] and report["format"] == "gptq" and report["skipped"][0].startswith("weight level")
    assert all(c["passed"] for c in report["checks"])
    assert int(suite.get("failures")) == 0 and int(suite.get("tests")) == len(names) + 1
    # the blocker works: our trainer cannot be imported under it, and PEFT looks absent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "blocker"), os.environ.get("PYTHONPATH", "")]))
    code = "import importlib.util; assert importlib.util.find_spec('peft') is None; import qalora_export.training.train"
    probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr, probe.stderr


def test_one_changed_byte_of_a_model_file_fails_naming_the_file(world, tmp_path):
    copy = _copy(world["gptq"], tmp_path / "edge")
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) - 100] ^= 0x01  # in the tensor data (the header is at the start)
    weights.write_bytes(bytes(raw))
    report_path = tmp_path / "report.json"
    code = main(["verify", str(copy), "--report", str(report_path), "--junit-xml", str(tmp_path / "results.xml"),
                 "--log-file", str(tmp_path / "log.txt")])
    assert code == EXIT_VERIFY_FAILED
    report = json.loads(report_path.read_text())
    check = _check(report, "checksums")
    assert not check["passed"] and check["mismatched"] == ["../model.safetensors"]
    assert "model.safetensors" in check["reason"]
    failure = ET.parse(tmp_path / "results.xml").getroot().find("testcase[@name='checksums']/failure")
    assert failure is not None and "model.safetensors" in failure.get("message")
