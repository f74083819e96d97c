"""The handoff bundle (docs/design.md §11) on tiny random models: every export writes it; an artifact
copied to a clean directory re-verifies with neither base nor adapter present and with the training
stack (GPTQModel, PEFT, our trainer and model code) blocked from import, in this process and in the
runtime's child; damaged bundles fail naming what is wrong; the JUnit report carries values and limits.

One module fixture exports gguf and onnx with the runtime level (about 25 s on 2 cores); every other
test copies those artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import gguf_helpers
import pytest
import tiny_models

from qalora_export.bundle import CARD, REFERENCE, SUMS, bundle_dir
from qalora_export.bundle.checksums import read_sums, write_sums
from qalora_export.bundle.reference import META_KEY, load_reference
from qalora_export.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY_FAILED, main
from qalora_export.errors import ConfigError

ARTIFACTS = {"gguf": "merged.gguf", "onnx": "merged-onnx"}
# blocked in the clean re-verify: the training stack the receiving team does not have
BLOCKED = ("gptqmodel", "peft", "optimum", "qalora_export.training", "qalora_export.modeling")
SITECUSTOMIZE = f'''
import importlib.abc, sys
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
    root = tmp_path_factory.mktemp("bundle")
    models = root / "models"
    base = gguf_helpers.make_bpe_base(models / "base", bits=4, group_size=32)
    adapter = tiny_models.make_random_adapter(base, models / "adapter", rank=4, seed=0, magnitude=0.1)
    w = {"root": root, "models": models, "base": base, "adapter": adapter}
    for fmt, name in ARTIFACTS.items():
        w[fmt] = root / "out" / name
        assert main([fmt, str(base), str(adapter), "-o", str(w[fmt]), "--log-file", str(root / "log.txt")]) == EXIT_OK
    return w


def _copy(artifact: Path, to: Path) -> Path:
    """The artifact and its bundle copied into ``to`` (what the receiving team gets)."""
    to.mkdir(parents=True, exist_ok=True)
    if artifact.is_dir():
        shutil.copytree(artifact, to / artifact.name)
    else:
        shutil.copy2(artifact, to / artifact.name)
        shutil.copytree(bundle_dir(artifact), to / bundle_dir(artifact).name)
    return to / artifact.name


def _verify(artifact: Path, tmp_path: Path) -> tuple[int, dict, ET.Element]:
    report, junit = tmp_path / "report.json", tmp_path / "results.xml"
    code = main(["verify", str(artifact), "--report", str(report), "--junit-xml", str(junit),
                 "--log-file", str(tmp_path / "log.txt")])
    return code, json.loads(report.read_text()), ET.parse(junit).getroot()


def _check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


def _rewrite_reference(artifact: Path, **meta_changes) -> None:
    """Change the reference's metadata and re-sign SHA256SUMS (so only the changed fact is wrong)."""
    from safetensors.numpy import load_file, save_file

    bundle = bundle_dir(artifact)
    path = bundle / REFERENCE
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()[META_KEY])
    save_file(load_file(str(path)), str(path), metadata={META_KEY: json.dumps({**meta, **meta_changes})})
    files = [bundle / name for _, name in read_sums(bundle / SUMS)]
    write_sums(bundle, files, bundle / SUMS)


@pytest.mark.parametrize("fmt", sorted(ARTIFACTS))
def test_copied_artifact_reverifies_without_base_adapter_or_training_stack(world, fmt, tmp_path):
    copy = _copy(world[fmt], tmp_path / "edge")
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    hidden = world["root"] / "models-away"
    os.rename(world["models"], hidden)  # the base and the adapter are not there
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, "-m", "qalora_export.cli", "verify", str(copy), "--junit-xml",
                               str(tmp_path / "results.xml"), "--report", str(tmp_path / "report.json"),
                               "--log-file", str(tmp_path / "log.txt")],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    finally:
        os.rename(hidden, world["models"])
    assert proc.returncode == EXIT_OK, proc.stdout + proc.stderr + (tmp_path / "log.txt").read_text()
    report = json.loads((tmp_path / "report.json").read_text())
    names = [c["name"] for c in report["checks"]]
    assert names[:3] == ["checksums", "reference", "tokenizer"] and any(n.startswith("runtime ") for n in names)
    assert report["passed"] and report["skipped"][0].startswith("weight level")
    suite = ET.parse(tmp_path / "results.xml").getroot()
    assert int(suite.get("failures")) == 0 and int(suite.get("tests")) == len(names) + 1
    # the blocker works: importing the trainer under it fails
    probe = subprocess.run([sys.executable, "-c", "import qalora_export.training.train"], env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr


def test_one_changed_byte_fails_naming_the_file(world, tmp_path):
    copy = _copy(world["onnx"], tmp_path / "edge")
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    code, report, suite = _verify(copy, tmp_path)
    assert code == EXIT_VERIFY_FAILED
    check = _check(report, "checksums")
    assert not check["passed"] and check["mismatched"] == ["../model.onnx.data"]
    failure = suite.find("testcase[@name='checksums']/failure")
    assert failure is not None and "model.onnx.data" in failure.get("message")


def test_truncated_model_file_fails(world, tmp_path):
    copy = _copy(world["gguf"], tmp_path / "edge")
    size = copy.stat().st_size
    with open(copy, "r+b") as f:
        f.truncate(size // 2)
    code, report, _ = _verify(copy, tmp_path)
    assert code == EXIT_VERIFY_FAILED and not report["passed"]
    assert _check(report, "checksums")["mismatched"] == [f"../{copy.name}"]
    # llama.cpp (or the tokenizer read before it) refuses the file: a failed check, not a crash of ours
    assert any(not c["passed"] for c in report["checks"] if c["name"] != "checksums")


def test_reference_for_another_tokenizer_fails_and_skips_the_runtime(world, tmp_path):
    copy = _copy(world["gguf"], tmp_path / "edge")
    _rewrite_reference(copy, tokenizer_fingerprint="0" * 64)
    code, report, _ = _verify(copy, tmp_path)
    assert code == EXIT_VERIFY_FAILED
    assert _check(report, "checksums")["passed"]
    tok = _check(report, "tokenizer")
    assert not tok["passed"] and "another model" in tok["reason"]
    assert any(s.startswith("runtime comparison") for s in report["skipped"])
    assert not any(c["name"].startswith("runtime") for c in report["checks"])


@pytest.mark.parametrize("missing", [REFERENCE, SUMS])
def test_bundle_without_reference_or_checksums_fails_saying_what_is_missing(world, tmp_path, missing):
    copy = _copy(world["onnx"], tmp_path / "edge")
    (bundle_dir(copy) / missing).unlink()
    code, report, suite = _verify(copy, tmp_path)
    assert code == EXIT_VERIFY_FAILED
    failed = [c for c in report["checks"] if not c["passed"]]
    assert failed and missing in failed[0]["reason"]
    if missing == REFERENCE:
        assert any(s.startswith("runtime comparison") for s in report["skipped"])
        assert suite.find("testcase[@name='runtime comparison']/skipped") is not None


def test_no_bundle_at_all_is_bad_input(world, tmp_path, capsys):
    copy = _copy(world["gguf"], tmp_path / "edge")
    shutil.rmtree(bundle_dir(copy))
    assert main(["verify", str(copy), "--log-file", str(tmp_path / "log.txt")]) == EXIT_BAD_INPUT
    assert "no handoff bundle" in capsys.readouterr().err
    assert main(["verify", str(copy), "--adapter", str(world["adapter"])]) == EXIT_BAD_INPUT
    assert "--adapter needs --base" in capsys.readouterr().err


def test_junit_failure_carries_the_value_and_the_limit(world, tmp_path):
    copy = _copy(world["gguf"], tmp_path / "edge")
    _rewrite_reference(copy, gate={"mean_kl": {"max": 0.0}})
    code, report, suite = _verify(copy, tmp_path)
    assert code == EXIT_VERIFY_FAILED
    check = _check(report, "runtime mean_kl")
    assert not check["passed"] and check["value"] > 0 and check["limit"] == 0.0
    message = suite.find("testcase[@name='runtime mean_kl']/failure").get("message")
    assert f"measured {check['value']:.6g}" in message and "limit max 0" in message
    assert int(suite.get("failures")) == 1


def test_model_card_and_sha256sums(world):
    for fmt, artifact in ((f, world[f]) for f in ARTIFACTS):
        bundle = bundle_dir(artifact)
        card = (bundle / CARD).read_text()
        for needle in ("## Base", "## Adapter", "## The fold", "## Format limits", "## Versions", "## Run it",
                       "fingerprint", '"rank": 4', '"pooling": "peft"', "--junit-xml results.xml",
                       f"qalora-export verify {artifact.name}"):
            assert needle in card, (fmt, needle)
        snippets = {"gguf": ("llama-cli -m merged.gguf", "from llama_cpp import Llama", "llama-cpp-python 0.3"),
                    "onnx": ("import onnxruntime_genai as og", 'og.Model("merged-onnx")', "onnxruntime ")}[fmt]
        assert all(s in card for s in snippets), fmt
        proc = subprocess.run(["sha256sum", "-c", SUMS], cwd=bundle, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        listed = {name for _, name in read_sums(bundle / SUMS)}
        assert {CARD, REFERENCE, "verify.json", "verify.md"} <= listed
        assert all(n.startswith("../") for n in listed - {CARD, REFERENCE, "verify.json", "verify.md"})
        reference = load_reference(bundle / REFERENCE)
        assert reference["meta"]["format"] == fmt and (bundle / REFERENCE).stat().st_size < 1 << 20
        assert json.loads((bundle / "verify.json").read_text())["runtime"]["passed"]


def test_no_verify_export_has_no_floor_and_says_so(world, tmp_path):
    out = tmp_path / "plain.gguf"
    assert main(["gguf", str(world["base"]), str(world["adapter"]), "-o", str(out), "--no-verify",
                 "--log-file", str(tmp_path / "log.txt")]) == EXIT_OK
    verify = json.loads((bundle_dir(out) / "verify.json").read_text())
    assert "runtime" not in verify and verify["weights"]["passed"]
    assert "weight level only" in (bundle_dir(out) / CARD).read_text()
    # no runtime level, no reference (it would run the whole model; --no-verify exports stream)
    assert not (bundle_dir(out) / REFERENCE).exists()
    code, report, _ = _verify(out, tmp_path)
    assert code == EXIT_VERIFY_FAILED
    assert _check(report, "checksums")["passed"]
    assert "--verify" in _check(report, "reference")["reason"]
    # an existing output is refused before any work, and left as it was
    before = out.read_bytes()
    assert main(["gguf", str(world["base"]), "-o", str(out), "--no-verify"]) == EXIT_BAD_INPUT
    assert out.read_bytes() == before and not list(tmp_path.glob(".plain.gguf.*"))


def test_damaged_bundle_files_are_typed_errors(tmp_path):
    (tmp_path / SUMS).write_text("not a checksum line\n")
    with pytest.raises(ConfigError, match="sha256sum's format"):
        read_sums(tmp_path / SUMS)
    (tmp_path / REFERENCE).write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="not a reference file"):
        load_reference(tmp_path / REFERENCE)
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"p0.ids": np.arange(3)}, str(tmp_path / REFERENCE), metadata={META_KEY: json.dumps({"prompts": 1})})
    with pytest.raises(ConfigError, match="lacks tensor"):
        load_reference(tmp_path / REFERENCE)
