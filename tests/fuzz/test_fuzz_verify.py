"""The verification gate on damaged artifacts: no silent pass.

For each export format (GPTQ ``model.safetensors``, ONNX ``model.onnx``, GGUF), a damaged artifact
run through ``verify_artifact(..., runtime=False)`` must raise a ``QALoRAExportError``, report
``passed: False``, or decode (with the format's own reader) to exactly the weights of the
undamaged artifact — i.e. the damage did not touch what the gate guarantees.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
from fuzz_common import tpl, ws  # noqa: E402,F401  (module fixtures)
import mutations  # noqa: E402

from qalora_export.formats import get_format  # noqa: E402
from qalora_export.errors import QALoRAExportError  # noqa: E402
from qalora_export.verify import verify_artifact  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
ARTIFACTS = {"gptq": ("merged", "model.safetensors"), "onnx": ("onnx", "model.onnx"), "gguf": (None, "model.gguf")}


@pytest.fixture(scope="module")
def originals(tpl) -> dict:
    out = {}
    for fmt, (d, f) in ARTIFACTS.items():
        path = tpl / d if d else tpl / f
        assert verify_artifact(path, tpl / "base", tpl / "adapter", runtime=False)["passed"], fmt
        out[fmt] = dict(get_format(fmt).read_weights(path))
    return out


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(sorted(ARTIFACTS)))
def test_damaged_artifact_never_passes_with_other_weights(tpl, ws, originals, data, fmt):
    d, f = ARTIFACTS[fmt]
    work = ws.fresh()
    if d:
        shutil.copytree(tpl / d, work / d)
        artifact, target = work / d, work / d / f
    else:
        artifact = target = work / f
    seed = (tpl / d / f if d else tpl / f).read_bytes()
    target.write_bytes(data.draw(mutations.byte_edits(seed, max_edits=2)))
    with mutations.deadline(30):
        try:
            report = verify_artifact(artifact, tpl / "base", tpl / "adapter", fmt=fmt, runtime=False)
        except QALoRAExportError:
            return
    if not report["passed"]:
        return
    decoded = dict(get_format(fmt).read_weights(artifact))
    assert sorted(decoded) == sorted(originals[fmt])
    for name, w in decoded.items():
        assert torch.equal(w, originals[fmt][name]), f"{fmt}: {name} changed but verify passed"
