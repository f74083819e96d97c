"""scripts/install_llama_cpp.py: the wheel cache is keyed on version and flags, and the llama.cpp
that the tests run is a build without AMX (the native build crashes on AMX CPUs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "install_llama_cpp.py"


def _script():
    spec = importlib.util.spec_from_file_location("install_llama_cpp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cache_directory_depends_on_version_and_flags(tmp_path, monkeypatch):
    script = _script()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    portable = script.wheel_dir("0.3.36", script.PORTABLE_CMAKE_ARGS)
    assert portable.parent == tmp_path / "qalora-export" / "wheels"
    assert portable == script.wheel_dir("0.3.36", script.PORTABLE_CMAKE_ARGS)
    assert portable != script.wheel_dir("0.3.36", "-DGGML_NATIVE=ON")
    assert portable != script.wheel_dir("0.3.37", script.PORTABLE_CMAKE_ARGS)
    assert script.cached_wheel(portable, "0.3.36") is None
    portable.mkdir(parents=True)
    wheel = portable / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.write_bytes(b"")
    assert script.cached_wheel(portable, "0.3.36") == wheel and script.cached_wheel(portable, "0.3.35") is None
    assert "-DGGML_NATIVE=OFF" in script.PORTABLE_CMAKE_ARGS


def _system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode()


def test_the_installed_llama_cpp_has_no_amx_path_on_an_amx_cpu():
    pytest.importorskip("llama_cpp")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info = _system_info()  # only reads the build flags: no decode, nothing that can crash
    assert "AVX2 = 1" in info or "AVX2" not in flags, info
    if "amx" in flags:
        assert "AMX_INT8 = 1" not in info, (
            f"llama.cpp was built with native flags on an AMX CPU ({info}); reinstall it with "
            f"`python scripts/install_llama_cpp.py`")
