"""Fuzzing the GPTQ checkpoint reader on damaged ``model.safetensors`` files (hypothesis).

Invariants (``fuzz/harness.py``): reading a damaged checkpoint returns or raises a
``QALoRAExportError`` subclass, never another exception or a hang; and nothing wrong is silent:
a changed byte in a quantized tensor is rejected or changes that layer's record, and a
checkpoint that decodes to different weights never keeps the fingerprint an adapter was
trained against. The coverage-guided counterpart is ``fuzz/run.py safetensors``.
"""

from __future__ import annotations

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

from qalora_export.errors import QALoRAExportError  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def seeds(tpl) -> list[bytes]:
    return [(tpl / d / "model.safetensors").read_bytes() for d in ("base", "act-order")]


@pytest.fixture(scope="module")
def original(tpl, ws) -> dict:
    result = harness.check_typed("safetensors", (tpl / "base" / "model.safetensors").read_bytes(), tpl, ws)
    assert isinstance(result, dict), result
    return result


def layer_bits(layer) -> tuple:
    """Everything a record decodes to, bit for bit (``-0.0`` and ``0.0`` scales differ)."""
    return (layer.bits, layer.group_size, layer.codes.tolist(), layer.scales.view(torch.int32).tolist(),
            layer.zeros.tolist(), layer.g_idx.tolist(),
            None if layer.bias is None else layer.bias.view(torch.int32).tolist())


def same_weights(a: dict, b: dict) -> bool:
    if sorted(a["layers"]) != sorted(b["layers"]):
        return False
    return all(torch.equal(a["layers"][n].dequantize(torch.float64), b["layers"][n].dequantize(torch.float64))
               and a["layers"][n].bits == b["layers"][n].bits for n in a["layers"])


def assert_fingerprint_sound(result, original: dict) -> None:
    """Same fingerprint => same decoded weights (else an adapter would fold into another base)."""
    if isinstance(result, dict) and result["fingerprint"] == original["fingerprint"]:
        assert same_weights(result, original), "decoded weights changed but the fingerprint did not"


@FUZZ
@given(data=st.data(), which=st.integers(0, 1))
def test_byte_damage_gives_only_typed_errors(tpl, ws, seeds, original, data, which):
    damaged = data.draw(mutations.byte_edits(seeds[which]))
    assert_fingerprint_sound(harness.check_typed("safetensors", damaged, tpl, ws), original)


@FUZZ
@given(data=st.data(), which=st.integers(0, 1))
def test_header_damage_gives_only_typed_errors(tpl, ws, seeds, original, data, which):
    damaged = data.draw(mutations.safetensors_header_edits(seeds[which]))
    assert_fingerprint_sound(harness.check_typed("safetensors", damaged, tpl, ws), original)


@FUZZ
@given(data=st.data())
def test_a_changed_quantized_byte_is_never_silent(tpl, ws, seeds, original, data):
    header, body = mutations.split_safetensors(seeds[0])
    keys = sorted(k for k in header if k.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx"))
    key = data.draw(st.sampled_from(keys))
    start, end = header[key]["data_offsets"]
    offset = data.draw(st.integers(start, end - 1))
    body = bytearray(body)
    body[offset] ^= 1 << data.draw(st.integers(0, 7))
    result = harness.check_typed("safetensors", mutations.join_safetensors(header, bytes(body)), tpl, ws)
    if isinstance(result, QALoRAExportError):
        return
    module = key.rsplit(".", 1)[0]
    assert layer_bits(result["layers"][module]) != layer_bits(original["layers"][module]), \
        f"a flipped byte of {key} decoded to the same record"
    assert result["fingerprint"] != original["fingerprint"]


def test_relabelled_dtype_is_refused_or_changes_the_fingerprint(tpl, ws, seeds, original):
    """scales re-declared as bfloat16 (same bytes, other values): not silently the same base."""
    header, body = mutations.split_safetensors(seeds[0])
    key = next(k for k in sorted(header) if k.endswith(".scales"))
    header[key]["dtype"] = "BF16"
    result = harness.check_typed("safetensors", mutations.join_safetensors(header, body), tpl, ws)
    assert isinstance(result, QALoRAExportError) or result["fingerprint"] != original["fingerprint"]
