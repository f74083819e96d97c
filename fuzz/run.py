"""Coverage-guided fuzzing of one reader with atheris (libFuzzer for Python).

    .venv/bin/python fuzz/seeds.py                     # once: seed corpora + templates
    .venv/bin/python fuzz/run.py TARGET [libFuzzer flags...]

TARGET is one of ``harness.TARGETS``. The corpus directory ``fuzz/corpus/TARGET`` is passed to
libFuzzer, which adds the inputs that reach new coverage to it. Useful flags: ``-runs=N``,
``-max_total_time=S``, ``-timeout=S`` (per input; a hang is a finding), ``-rss_limit_mb=M``,
``-max_len=BYTES``, ``-artifact_prefix=fuzz/crashes/``. A finding is any exception that is not a
``QALoRAExportError`` (see ``harness.py``); libFuzzer stops on the first one and writes the input
to ``fuzz/crashes/``. Reproduce with ``fuzz/run.py TARGET fuzz/crashes/crash-...``.

``-keep_going=1`` (ours, not libFuzzer's) records each distinct finding (exception type and the
innermost project frame) with one input in ``fuzz/crashes/TARGET-findings.txt`` and carries on,
to collect several bugs in one session; without it the first finding stops the run.

Only the project's own modules and the file-format libraries they call are instrumented
(``atheris.instrument_imports``), so coverage guides the mutations through our parsing code.
"""

from __future__ import annotations

import base64
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["qalora_export", "gguf", "onnx.numpy_helper", "harness"]):
    import harness  # noqa: E402
    import qalora_export.core.adapter  # noqa: E402,F401
    import qalora_export.formats.gguf.read  # noqa: E402,F401
    import qalora_export.formats.gguf.spec  # noqa: E402,F401
    import qalora_export.formats.onnx.read  # noqa: E402,F401
    import qalora_export.formats.onnx.spec  # noqa: E402,F401
    import qalora_export.training.examples  # noqa: E402,F401
    import qalora_export.checkpoint.gptq  # noqa: E402,F401
    import qalora_export.checkpoint.merged_view  # noqa: E402,F401


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in harness.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} TARGET [libFuzzer flags]; TARGET one of {harness.TARGETS}")
    target = sys.argv[1]
    tpl = harness.default_templates()
    if not tpl.is_dir():
        sys.exit(f"{tpl} is missing; run fuzz/seeds.py first")
    corpus = tpl.parent / target
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    ws = harness.Workspace()
    func = harness.TARGET_FUNCS[target]
    from qalora_export.errors import QALoRAExportError

    keep_going = "-keep_going=1" in sys.argv
    findings: dict[str, bytes] = {}
    findings_path = crashes / f"{target}-findings.txt"

    def one_input(data: bytes) -> None:
        try:
            func(data, tpl, ws)
        except QALoRAExportError:
            pass
        except Exception as exc:
            if not keep_going:
                raise
            key = _signature(exc)
            if key not in findings:
                findings[key] = data
                with open(findings_path, "a") as f:
                    f.write(f"{key}\n  {str(exc)[:300]!r}\n  input (base64): {base64.b64encode(data[:4096]).decode()}\n")
                print(f"FINDING {key}", file=sys.stderr, flush=True)

    args = [sys.argv[0], *(a for a in sys.argv[2:] if a != "-keep_going=1")]
    if not any(a.startswith("-artifact_prefix") for a in args):
        args.append(f"-artifact_prefix={crashes}/{target}-")
    if not any(not a.startswith("-") for a in args[1:]):  # no corpus/reproducer path given
        args.append(str(corpus))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    atheris.Setup(args, one_input)
    try:
        atheris.Fuzz()
    finally:
        ws.close()


def _signature(exc: BaseException) -> str:
    """Exception type and the innermost frame in our code (or the innermost frame)."""
    tb = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in tb if "qalora_export" in f.filename]
    frame = (ours or tb)[-1]
    return f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"


if __name__ == "__main__":
    main()
