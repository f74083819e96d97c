"""``demo`` on the SmolLM2 fixture prints only our lines; third-party output lands in its log file.

The quickest whole path: 1 training step, 2 held-out examples, GPTQ and GGUF exports verified in
their runtimes (GPTQModel's banners and torch.compile messages, transformers warnings, llama.cpp's
own output all occur on it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# What our CLI prints on the demo path (stdout: the table; stderr: stage and progress lines).
OUR_LINES = re.compile(
    r"^$"
    r"|^\[\d/6\] "               # stages
    r"|^  \S"                    # per-stage details (scores, training steps)
    r"|^QA-LoRA demo on "        # table title
    r"|^\|"                      # table rows
    r"|^verify \w+: (PASSED|FAILED) "
    r"|^time: total "
    r"|^log: .* \(third-party messages; -v shows them live\)$"
)


@pytest.mark.slow
def test_demo_prints_only_our_lines(smollm2_gguf, tmp_path):
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-m", "qalora_export.cli", "demo", "--workdir", str(workdir),
                           "--steps", "1", "--held-out-examples", "2", "--formats", "gptq,gguf"],
                          capture_output=True, text=True, env=env, timeout=1800)
    lines = (proc.stdout + proc.stderr).splitlines()
    foreign = [line for line in lines if not OUR_LINES.search(line)]
    assert foreign == [], f"{len(foreign)} foreign line(s) on the console:\n" + "\n".join(foreign[:40])
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: a gate failed, still only our lines
    assert "verify gptq:" in proc.stdout and "verify gguf:" in proc.stdout
    # every demo artifact carries its handoff bundle (docs/design.md §11)
    for bundle in (workdir / "merged-gptq" / "handoff", workdir / "merged-gguf.gguf.bundle"):
        assert {"README.md", "verify.json", "reference.safetensors", "SHA256SUMS"} <= {p.name for p in bundle.iterdir()}
    log = workdir / "demo.log"
    assert f"log: {log}" in proc.stderr
    assert log.stat().st_size > 0  # what was kept off the console is in the log, not lost


def test_demo_refuses_zero_held_out_examples(tmp_path):
    """``--held-out-examples 0`` is a ConfigError (exit 2) before any work, naming the flag."""
    from qalora_export.cli import EXIT_BAD_INPUT, main

    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), "--held-out-examples", "0"]) == EXIT_BAD_INPUT
    assert not (workdir / "demo_report.json").exists()
