"""A runtime made to crash or hang: verify still writes its report and exits 1; a direct llama.cpp
call fails with a typed error, not the test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import gguf_helpers
import tiny_models
from qalora_export.cli import EXIT_VERIFY_FAILED, main
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.errors import RuntimeCrashError
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.formats.gguf import runtime as llamacpp

# Imported at start-up by every child interpreter whose PYTHONPATH starts with its directory:
# llama.cpp's decode then dereferences NULL, a real segmentation fault inside the runtime's process
# (what the native AMX build does on a Q4_1 model), or blocks forever.
SITECUSTOMIZE = {
    "crash": "import ctypes, llama_cpp\nllama_cpp.Llama.eval = lambda self, tokens: ctypes.string_at(0)\n",
    "hang": "import time, llama_cpp\nllama_cpp.Llama.eval = lambda self, tokens: time.sleep(3600)\n",
}


@pytest.fixture(scope="module")
def gguf_artifact(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("crash")
    base = gguf_helpers.make_bpe_base(root / "base")
    adapter = tiny_models.make_random_adapter(base, root / "adapter")
    out = root / "model.gguf"
    G.export(MergedView.open(base, adapter), out)
    return base, adapter, out


def _broken_llama_cpp(tmp_path: Path, monkeypatch, how: str) -> None:
    site = tmp_path / f"sitecustomize-{how}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE[how])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))


def test_verify_reports_a_llama_cpp_crash_and_exits_1(gguf_artifact, tmp_path, monkeypatch, capsys):
    base, adapter, artifact = gguf_artifact
    _broken_llama_cpp(tmp_path, monkeypatch, "crash")
    report = tmp_path / "verify.json"
    code = main(["verify", str(artifact), "--base", str(base), "--adapter", str(adapter), "--report", str(report),
                 "--log-file", str(tmp_path / "verify.log")])
    assert code == EXIT_VERIFY_FAILED
    data = json.loads(report.read_text())
    runtime = data["runtime"]
    assert data["passed"] is False and runtime["passed"] is False
    assert runtime["cause"] == "SIGSEGV" and runtime["runtime"] == "llama.cpp (llama-cpp-python)"
    assert "crashed" in runtime["error"] and "GGML_NATIVE=OFF" in runtime["error"]
    assert data["weights"]["passed"] is True  # the weight level ran and is reported as measured
    out = capsys.readouterr().out
    assert "FAILED" in out and "SIGSEGV" in out
    assert report.with_suffix(".md").is_file()


def test_verify_stops_a_hung_runtime_at_its_timeout(gguf_artifact, tmp_path, monkeypatch):
    base, adapter, artifact = gguf_artifact
    _broken_llama_cpp(tmp_path, monkeypatch, "hang")
    report = tmp_path / "verify.json"
    code = main(["verify", str(artifact), "--base", str(base), "--adapter", str(adapter), "--report", str(report),
                 "--runtime-timeout", "20", "--log-file", str(tmp_path / "verify.log")])
    assert code == EXIT_VERIFY_FAILED
    runtime = json.loads(report.read_text())["runtime"]
    assert runtime["cause"] == "timeout" and "did not finish within 20 s" in runtime["error"]


def test_a_direct_llama_cpp_call_that_crashes_fails_with_a_typed_error(gguf_artifact, tmp_path, monkeypatch):
    _, _, artifact = gguf_artifact
    _broken_llama_cpp(tmp_path, monkeypatch, "crash")
    with pytest.raises(RuntimeCrashError, match="SIGSEGV") as info:
        llamacpp.run_logits(artifact, [[1, 2, 3]])
    assert info.value.runtime == llamacpp.RUNTIME.name


def test_the_same_calls_work_without_the_breakage(gguf_artifact):
    _, _, artifact = gguf_artifact
    [logits] = llamacpp.run_logits(artifact, [[1, 2, 3]])
    assert logits.shape[0] == 3 and logits.dtype.name == "float32"
