"""Run a runtime check in a child process, so that a runtime that crashes or hangs fails one check.

llama.cpp, onnxruntime and GPTQModel are native code: a segmentation fault (llama.cpp built with
native CPU flags on a CPU that advertises AMX), an abort or a deadlock in them would otherwise take
the caller down with it — no report, no exit code of ours, a whole test session lost.
:func:`call_isolated` runs ``module:function(**kwargs)`` in a fresh interpreter
(``python -m qalora_export.runtimes.isolation REQUEST_DIR``) and turns what can go wrong into a
typed :class:`~qalora_export.errors.RuntimeCrashError` naming the runtime, the signal or the
timeout, and the likely fix.

The request and the result cross the process boundary as JSON plus ``.npy`` files (numpy arrays,
``allow_pickle=False``): nothing is unpickled. Arguments and results may nest dicts, lists, tuples
(returned as lists), strings, numbers, booleans, None, paths (passed as strings) and numpy arrays.

The child's stdout and stderr go to a file that is copied to the caller's ``sys.stderr`` when the
child ends (the CLI sends that to its log file); the last lines are quoted in a crash error. A typed
error of ours raised in the child (a :class:`~qalora_export.errors.QALoRAExportError`, e.g. a file
llama.cpp cannot load) is raised again in the caller as the same class with the same message.

Inside a child, :func:`call_isolated` calls the function directly: a check already isolated does not
start grandchildren.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from qalora_export.errors import QALoRAExportError, RuntimeCrashError

# Set in the child's environment: a nested call_isolated runs inline.
INSIDE_CHILD_ENV = "QALORA_EXPORT_ISOLATED_CHILD"
REQUEST_FILE, RESULT_FILE, ERROR_FILE, LOG_FILE = "request.json", "result.json", "error.json", "child.log"
TAIL_LINES = 20
_ARRAY_KEY = "__npy__"


@dataclass(frozen=True)
class RuntimeInfo:
    """A runtime as a crash report names it: its name and the fix to suggest when it crashes."""

    name: str
    crash_hint: str


def _encode(value: Any, directory: Path, prefix: str, counter: list[int]) -> Any:
    if isinstance(value, np.ndarray):
        counter[0] += 1
        name = f"{prefix}{counter[0]}.npy"
        np.save(directory / name, value, allow_pickle=False)
        return {_ARRAY_KEY: name}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _encode(v, directory, prefix, counter) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, directory, prefix, counter) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"call_isolated cannot pass a {type(value).__name__} across processes")


def _decode(value: Any, directory: Path) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_KEY}:
            return np.load(directory / value[_ARRAY_KEY], allow_pickle=False)
        return {k: _decode(v, directory) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, directory) for v in value]
    return value


def _resolve(target: str):
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _replay(path: Path) -> None:
    """Copy the child's output to ``sys.stderr`` (the CLI's log file, or pytest's capture)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return
    if text:
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()


def _raise_child_error(error: dict, runtime: RuntimeInfo) -> None:
    from qalora_export import errors

    cls = getattr(errors, error.get("type", ""), None)
    if isinstance(cls, type) and issubclass(cls, QALoRAExportError) and cls is not RuntimeCrashError:
        raise cls(error["message"])
    if error.get("type") == "RuntimeCrashError":
        raise RuntimeCrashError(error["message"], runtime=runtime.name, cause=error.get("cause", "error"))
    raise RuntimeCrashError(
        f"{runtime.name} failed in its child process: {error.get('type')}: {error.get('message')}\n"
        f"{error.get('traceback', '').rstrip()}", runtime=runtime.name, cause="exception")


def call_isolated(target: str, kwargs: dict, runtime: RuntimeInfo, timeout: Optional[float] = None) -> Any:
    """``target(**kwargs)`` (``target`` = ``"package.module:function"``) run in a child process.

    Args:
        target: the function to run, importable in a fresh interpreter.
        kwargs: its keyword arguments (JSON values, paths, numpy arrays; see the module docstring).
        runtime: the runtime the function drives, named in errors.
        timeout: seconds before the child is killed and the call fails as a hang (None: no limit).

    Returns:
        what the function returned (numpy arrays come back as arrays, tuples as lists).

    Raises:
        RuntimeCrashError: the child was killed by a signal, exited without a result, raised an
            exception that is not one of ours, or ran past ``timeout``.
        QALoRAExportError: the function raised one of our typed errors (same class, same message).
    """
    if os.environ.get(INSIDE_CHILD_ENV) == "1":
        return _resolve(target)(**kwargs)
    with tempfile.TemporaryDirectory(prefix="qalora-runtime-") as tmp:
        directory = Path(tmp)
        request = {"target": target, "kwargs": _encode(kwargs, directory, "arg", [0])}
        (directory / REQUEST_FILE).write_text(json.dumps(request))
        log_path = directory / LOG_FILE
        env = dict(os.environ, **{INSIDE_CHILD_ENV: "1"})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", __name__, str(directory)], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                _replay(log_path)
                raise RuntimeCrashError(
                    f"{runtime.name} did not finish within {timeout:g} s and was stopped (a hang, or a machine too "
                    f"slow for the limit): raise the limit (verify --runtime-timeout SECONDS) if the machine is "
                    f"just slow; otherwise {runtime.crash_hint}. Last output:\n{_tail(log_path) or '(none)'}",
                    runtime=runtime.name, cause="timeout")
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        _replay(log_path)
        error_path = directory / ERROR_FILE
        if error_path.is_file():
            _raise_child_error(json.loads(error_path.read_text()), runtime)
        if returncode < 0:
            raise RuntimeCrashError(
                f"{runtime.name} crashed: its process was killed by {_signal_name(returncode)}. Likely fix: "
                f"{runtime.crash_hint}. Last output:\n{_tail(log_path) or '(none)'}",
                runtime=runtime.name, cause=_signal_name(returncode))
        result_path = directory / RESULT_FILE
        if returncode != 0 or not result_path.is_file():
            raise RuntimeCrashError(
                f"{runtime.name} exited with status {returncode} before returning a result. Likely fix: "
                f"{runtime.crash_hint}. Last output:\n{_tail(log_path) or '(none)'}",
                runtime=runtime.name, cause=f"exit {returncode}")
        return _decode(json.loads(result_path.read_text()), directory)


def _child_main(directory: Path) -> int:
    """The child's side: run the request, write the result or the error, exit 0 (a crash exits otherwise)."""
    request = json.loads((directory / REQUEST_FILE).read_text())
    try:
        result = _resolve(request["target"])(**_decode(request["kwargs"], directory))
        encoded = _encode(result, directory, "result", [0])
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent, typed
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
        if isinstance(exc, RuntimeCrashError):
            error["cause"] = exc.cause
        (directory / ERROR_FILE).write_text(json.dumps(error))
        return 0
    (directory / RESULT_FILE).write_text(json.dumps(encoded))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(Path(sys.argv[1])))
