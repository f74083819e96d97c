"""Fuzzing adapter directories: ``adapter_config.json``, ``qalora_export.json`` and
``adapter_model.safetensors`` damaged one at a time, then loaded and folded into the base.

Invariants: only ``QALoRAExportError`` subclasses come out (no other exception, no hang); a
changed byte of a factor is rejected or changes that factor (never silently the old adapter);
a factor re-declared with an integer dtype (same bytes, other values) is refused.
Coverage-guided counterpart: ``fuzz/run.py adapter``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import harness  # noqa: E402
from fuzz_common import tpl, ws  # noqa: E402,F401  (module fixtures)
import mutations  # noqa: E402

from qalora_export.errors import AdapterError, QALoRAExportError  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
CONFIG, META, WEIGHTS = range(3)


def seed(tpl: Path, which: int) -> bytes:
    return (tpl / "adapter" / harness.ADAPTER_FILES[which]).read_bytes()


@pytest.fixture(scope="module")
def original(tpl, ws) -> dict:
    result = harness.check_typed("adapter", harness.encode_choice(CONFIG, seed(tpl, CONFIG)), tpl, ws)
    assert isinstance(result, dict), result
    return result


@FUZZ
@given(data=st.data(), which=st.sampled_from([CONFIG, META]))
def test_json_damage_gives_only_typed_errors(tpl, ws, data, which):
    doc = data.draw(mutations.json_edits(json.loads(seed(tpl, which))))
    harness.check_typed("adapter", harness.encode_choice(which, mutations.json_dumps_loose(doc)), tpl, ws)


@FUZZ
@given(data=st.data(), which=st.sampled_from([CONFIG, META, WEIGHTS]))
def test_byte_damage_gives_only_typed_errors(tpl, ws, data, which):
    damaged = data.draw(mutations.byte_edits(seed(tpl, which)))
    harness.check_typed("adapter", harness.encode_choice(which, damaged), tpl, ws)


@FUZZ
@given(data=st.data())
def test_weights_header_damage_gives_only_typed_errors(tpl, ws, data):
    damaged = data.draw(mutations.safetensors_header_edits(seed(tpl, WEIGHTS)))
    harness.check_typed("adapter", harness.encode_choice(WEIGHTS, damaged), tpl, ws)


@FUZZ
@given(data=st.data())
def test_a_changed_factor_byte_is_never_silent(tpl, ws, original, data):
    header, body = mutations.split_safetensors(seed(tpl, WEIGHTS))
    key = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    start, end = header[key]["data_offsets"]
    offset = data.draw(st.integers(start, end - 1))
    body = bytearray(body)
    body[offset] ^= 1 << data.draw(st.integers(0, 7))
    result = harness.check_typed("adapter", harness.encode_choice(WEIGHTS, mutations.join_safetensors(header, bytes(body))),
                                 tpl, ws)
    if isinstance(result, QALoRAExportError):
        return
    module = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
    part = "lora_A" if ".lora_A." in key else "lora_B"
    new = getattr(result["adapter"].layers[module], part)
    old = getattr(original["adapter"].layers[module], part)
    assert not torch.equal(new.view(torch.int32), old.view(torch.int32)), f"a flipped byte of {key} was not seen"


@pytest.mark.parametrize("dtype", ["I32", "U8"])
def test_factor_with_an_integer_dtype_is_refused(tpl, ws, dtype):
    header, body = mutations.split_safetensors(seed(tpl, WEIGHTS))
    key = next(k for k in sorted(header) if k.endswith("lora_A.weight"))
    if dtype == "U8":
        header[key]["shape"] = [*header[key]["shape"][:-1], header[key]["shape"][-1] * 4]
    header[key]["dtype"] = dtype
    result = harness.check_typed("adapter", harness.encode_choice(WEIGHTS, mutations.join_safetensors(header, body)),
                                 tpl, ws)
    assert isinstance(result, AdapterError) and "floating point" in str(result)


def test_non_string_fingerprint_is_refused(tpl, ws):
    meta = json.loads(seed(tpl, META))
    meta["base_fingerprint"] = ["sha256:0"]
    result = harness.check_typed("adapter", harness.encode_choice(META, json.dumps(meta).encode()), tpl, ws)
    assert isinstance(result, AdapterError) and "base_fingerprint" in str(result)
