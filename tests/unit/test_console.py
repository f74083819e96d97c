"""The quiet console: our lines on the terminal, third-party output (Python and native) in the log."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from qalora_export.console import quiet_console

    log = Path(sys.argv[1])
    verbose = sys.argv[2] == "1"
    with quiet_console(log, verbose=verbose) as console:
        print("foreign print")
        print("foreign stderr", file=sys.stderr)
        logging.getLogger("somelib").warning("foreign logging")
        warnings.warn("foreign warning", FutureWarning)
        os.write(1, b"foreign fd1\\n")
        os.write(2, b"foreign fd2\\n")
        subprocess.run([sys.executable, "-c", "print('foreign child')"], check=True)
        print("our result", file=console.out, flush=True)
        print("our progress", file=console.err, flush=True)
    print("after: restored")
""")

FOREIGN = ("foreign print", "foreign stderr", "foreign logging", "foreign warning", "foreign fd1", "foreign fd2",
           "foreign child")


def _run(tmp_path: Path, verbose: bool) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "logs" / "run.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"],
                          capture_output=True, text=True, check=True)
    return proc, log


def test_everything_foreign_goes_to_the_log(tmp_path):
    proc, log = _run(tmp_path, verbose=False)
    assert proc.stdout.splitlines() == ["our result", "after: restored"]
    assert proc.stderr.splitlines() == ["our progress"]
    text = log.read_text()
    for line in FOREIGN:
        assert line in text, line
    assert "our result" not in text and "after" not in text


def test_verbose_redirects_nothing(tmp_path):
    proc, log = _run(tmp_path, verbose=True)
    both = proc.stdout + proc.stderr
    for line in FOREIGN + ("our result", "our progress", "after: restored"):
        assert line in both, line
    assert not log.exists()
