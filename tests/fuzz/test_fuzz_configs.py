"""Fuzzing GPTQ configurations: ``config.json`` (``quantization_config``) and
``quantize_config.json`` damaged structurally (wrong types, huge/negative/float values, missing
or extra keys) and byte-wise, then the checkpoint opened, every layer decoded and fingerprinted.

Invariants: only ``QALoRAExportError`` subclasses come out, no hang; and a damaged config that
still decodes to different weights never keeps the base's fingerprint (an adapter trained on
the original would otherwise fold into the wrong weights silently).
Coverage-guided counterpart: ``fuzz/run.py gptq_config``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import harness  # noqa: E402
from fuzz_common import tpl, ws  # noqa: E402,F401  (module fixtures)
import mutations  # noqa: E402
from test_fuzz_safetensors import assert_fingerprint_sound  # noqa: E402

from qalora_export.errors import CheckpointError  # noqa: E402

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
CONFIG, QUANTIZE_CONFIG = range(2)


@pytest.fixture(scope="module")
def original(tpl, ws) -> dict:
    result = harness.check_typed("gptq_config", harness.encode_choice(CONFIG, (tpl / "base" / "config.json").read_bytes()),
                                 tpl, ws)
    assert isinstance(result, dict), result
    return result


@FUZZ
@given(data=st.data(), which=st.sampled_from([CONFIG, QUANTIZE_CONFIG]))
def test_quantization_config_damage_gives_only_typed_errors(tpl, ws, original, data, which):
    cfg = json.loads((tpl / "base" / "config.json").read_text())
    qcfg = data.draw(mutations.json_edits(cfg["quantization_config"]))
    if which == CONFIG:
        cfg["quantization_config"] = qcfg
        payload = mutations.json_dumps_loose(cfg)
    else:
        payload = mutations.json_dumps_loose(qcfg)
    assert_fingerprint_sound(harness.check_typed("gptq_config", harness.encode_choice(which, payload), tpl, ws), original)


@FUZZ
@given(data=st.data())
def test_config_damage_gives_only_typed_errors(tpl, ws, original, data):
    cfg = json.loads((tpl / "base" / "config.json").read_text())
    payload = mutations.json_dumps_loose(data.draw(mutations.json_edits(cfg)))
    if data.draw(st.booleans()):
        payload = data.draw(mutations.byte_edits(payload))
    assert_fingerprint_sound(harness.check_typed("gptq_config", harness.encode_choice(CONFIG, payload), tpl, ws), original)


@pytest.mark.parametrize("field,value", [("bits", 4.0), ("bits", True), ("group_size", 32.0), ("group_size", 2**70),
                                         ("checkpoint_format", ["gptq"]), ("desc_act", "no"), ("sym", [1])])
def test_wrongly_typed_fields_are_refused(tpl, ws, original, field, value):
    cfg = json.loads((tpl / "base" / "config.json").read_text())
    cfg["quantization_config"][field] = value
    result = harness.check_typed("gptq_config", harness.encode_choice(CONFIG, json.dumps(cfg).encode()), tpl, ws)
    if field == "group_size" and value == 2**70:
        assert isinstance(result, CheckpointError), result  # does not divide the layer widths
    else:
        assert isinstance(result, CheckpointError) and field in str(result), result
