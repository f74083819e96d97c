"""Missing optional packages: every verb that needs one exits 2 naming the pip extra, no traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qalora_export.cli import EXIT_BAD_INPUT, main
from qalora_export.errors import MissingExtraError
from qalora_export.extras import EXTRA_MODULES, Requirement, module_available, require


def _verb_args(tmp_path: Path, verb: str) -> list[str]:
    """Arguments for ``verb`` that reach its extras check (the inputs need not be valid beyond that)."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")
    mlx_dir = tmp_path / "mlx"
    mlx_dir.mkdir()
    (mlx_dir / "config.json").write_text('{"quantization": {"bits": 4, "group_size": 32}}')
    return {
        "onnx": ["onnx", str(base), "-o", str(tmp_path / "out-onnx")],
        "merge-onnx": ["merge", str(base), str(base), "--to", "onnx", "-o", str(tmp_path / "out-merge")],
        "verify-gptq": ["verify", str(base), "--base", str(base), "--format", "gptq"],
        "verify-onnx": ["verify", str(onnx_dir), "--base", str(base)],
        "verify-gguf": ["verify", str(gguf_file), "--base", str(base)],
        "inspect-onnx": ["inspect", str(onnx_dir)],
        "demo-gptq": ["demo", "--workdir", str(tmp_path / "demo"), "--formats", "gptq"],
        "demo-onnx": ["demo", "--workdir", str(tmp_path / "demo"), "--formats", "onnx"],
        "demo-gguf": ["demo", "--workdir", str(tmp_path / "demo"), "--formats", "gguf"],
        "mlx": ["mlx", str(base), "-o", str(tmp_path / "out-merge")],
        "merge-mlx": ["merge", str(base), str(base), "--to", "mlx", "-o", str(tmp_path / "out-merge")],
        "verify-mlx": ["verify", str(mlx_dir), "--base", str(base)],
        "demo-mlx": ["demo", "--workdir", str(tmp_path / "demo"), "--formats", "mlx"],
    }[verb]


CASES = [
    ("gptqmodel", "gptq", "verify-gptq"),
    ("optimum", "gptq", "verify-gptq"),
    ("gptqmodel", "gptq", "demo-gptq"),
    ("onnx", "onnx", "onnx"),
    ("onnx", "onnx", "merge-onnx"),
    ("onnx", "onnx", "inspect-onnx"),
    ("onnxruntime", "onnx", "verify-onnx"),
    ("onnxruntime_genai", "onnx", "verify-onnx"),
    ("onnxruntime", "onnx", "demo-onnx"),
    ("llama_cpp", "llamacpp", "verify-gguf"),
    ("llama_cpp", "llamacpp", "demo-gguf"),
    ("mlx", "mlx", "mlx"),
    ("mlx", "mlx", "merge-mlx"),
    ("mlx_lm", "mlx", "verify-mlx"),
    ("mlx_lm", "mlx", "demo-mlx"),
]


@pytest.mark.parametrize("module,extra,verb", CASES, ids=[f"{v}-without-{m}" for m, _, v in CASES])
def test_verb_without_its_extra_exits_2_naming_the_install(module, extra, verb, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # removed from the import system: `import` fails
    code = main(_verb_args(tmp_path, verb) + ["--log-file", str(tmp_path / "log.txt")])
    captured = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert f"pip install 'qalora-export[{extra}]'" in captured.err and module in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out-onnx").exists() and not (tmp_path / "out-merge").exists()
    assert not (tmp_path / "demo" / "base-w4g32").exists()  # the demo stopped before any work


def test_every_extra_module_is_covered_or_needed_by_no_verb():
    covered = {m for m, _, _ in CASES}
    needed_by_no_verb = {"peft"}  # PEFT compatibility tests only
    assert covered | needed_by_no_verb == {m for modules in EXTRA_MODULES.values() for m in modules}


def test_require_names_every_missing_module_and_the_llamacpp_build_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert not module_available("llama_cpp")
    with pytest.raises(MissingExtraError, match=r"verify needs llama_cpp.*qalora-export\[llamacpp\].*GGML_NATIVE=OFF"):
        require(Requirement("llamacpp", ("llama_cpp",)), "verify")
    require((), "nothing")  # no requirement: no error


def test_requirement_modules_must_belong_to_the_extra():
    with pytest.raises(ValueError, match="not in the 'onnx' extra"):
        Requirement("onnx", ("llama_cpp",))


def test_get_format_maps_a_missing_extra_module(tmp_path, monkeypatch):
    from qalora_export import formats as converters

    (tmp_path / "needs_genai_format.py").write_text("import onnxruntime_genai\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(converters.FORMATS, "needs-genai", "needs_genai_format")
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    with pytest.raises(MissingExtraError, match=r"the needs-genai format needs onnxruntime_genai.*qalora-export\[onnx\]"):
        converters.get_format("needs-genai")
