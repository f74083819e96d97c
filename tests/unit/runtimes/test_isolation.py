"""runtimes.isolation: a runtime check in a child process; crashes, hangs and errors come back typed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from qalora_export.errors import ConfigError, RuntimeCrashError
from qalora_export.runtimes import isolation
from qalora_export.runtimes.isolation import RuntimeInfo, call_isolated

HERE = Path(__file__).resolve().parent
RUNTIME = RuntimeInfo(name="test runtime", crash_hint="reinstall the test runtime")


# Targets, run in the child (which imports this module by name: PYTHONPATH points here).

def echo(**kwargs):
    return {"got": kwargs, "pid": os.getpid(), "inside": os.environ.get(isolation.INSIDE_CHILD_ENV)}


def double(values: np.ndarray, scale: float) -> tuple:
    return values * scale, np.float32(scale), [values[:1], {"nested": values.sum()}]


def crash() -> None:
    print("about to crash", flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)


def hang() -> None:
    time.sleep(600)


def raise_config_error() -> None:
    raise ConfigError("the file is not a GGUF model: give a .gguf file")


def raise_bug() -> None:
    raise KeyError("a bug")


def exit_quietly() -> None:
    os._exit(3)


def nested() -> dict:
    return call_isolated(f"{__name__}:echo", {"x": 1}, RUNTIME)


@pytest.fixture(autouse=True)
def _importable_here(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def _target(name: str) -> str:
    return f"{Path(__file__).stem}:{name}"


def test_arrays_and_nesting_cross_the_boundary():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 5)).astype(np.float32)
    scaled, scale, rest = call_isolated(_target("double"), {"values": values, "scale": 2.5}, RUNTIME)
    np.testing.assert_array_equal(scaled, values * 2.5)
    assert scaled.dtype == np.float32 and scale == 2.5
    np.testing.assert_array_equal(rest[0], values[:1])
    assert rest[1]["nested"] == pytest.approx(float(values.sum()))


def test_runs_in_another_process_and_passes_paths_as_strings(tmp_path):
    result = call_isolated(_target("echo"), {"path": tmp_path, "ids": (1, 2), "none": None}, RUNTIME)
    assert result["pid"] != os.getpid() and result["inside"] == "1"
    assert result["got"] == {"path": str(tmp_path), "ids": [1, 2], "none": None}


def test_a_nested_call_runs_inline_in_the_child():
    outer = call_isolated(_target("nested"), {}, RUNTIME)
    assert outer["inside"] == "1" and outer["got"] == {"x": 1}


def test_a_crash_is_a_typed_error_naming_runtime_signal_and_fix(capsys):
    with pytest.raises(RuntimeCrashError) as info:
        call_isolated(_target("crash"), {}, RUNTIME)
    message = str(info.value)
    assert info.value.cause == "SIGSEGV" and info.value.runtime == "test runtime"
    assert "test runtime crashed" in message and "SIGSEGV" in message and "reinstall the test runtime" in message
    assert "about to crash" in message  # the child's last output is quoted
    assert "about to crash" in capsys.readouterr().err  # and replayed to the caller's stderr


def test_a_hang_is_stopped_at_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(RuntimeCrashError, match="did not finish within 3 s") as info:
        call_isolated(_target("hang"), {}, RUNTIME, timeout=3)
    assert info.value.cause == "timeout" and time.monotonic() - t0 < 60


def test_our_typed_errors_keep_their_class_and_message():
    with pytest.raises(ConfigError, match="not a GGUF model: give a .gguf file"):
        call_isolated(_target("raise_config_error"), {}, RUNTIME)


def test_other_exceptions_and_silent_exits_are_runtime_failures():
    with pytest.raises(RuntimeCrashError, match="KeyError: 'a bug'") as info:
        call_isolated(_target("raise_bug"), {}, RUNTIME)
    assert info.value.cause == "exception" and "Traceback" in str(info.value)
    with pytest.raises(RuntimeCrashError, match="exited with status 3") as info:
        call_isolated(_target("exit_quietly"), {}, RUNTIME)
    assert info.value.cause == "exit 3"


def test_unsupported_arguments_are_refused_before_starting():
    with pytest.raises(TypeError, match="cannot pass a object"):
        call_isolated(_target("echo"), {"x": object()}, RUNTIME)
