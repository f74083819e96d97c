"""Fuzzing the GGUF reading that ``verify`` uses: ``read_weights`` (gguf-py's reader plus our Q4_1
decoder) and ``read_file_types`` (our header scan, ``gguf_spec.scan_tensor_types``).

Invariants: only ``QALoRAExportError`` subclasses come out, no hang; a changed byte inside a
Q4_1 projection is rejected or changes that projection's decoded weight.
Coverage-guided counterpart: ``fuzz/run.py gguf``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import harness  # noqa: E402
from fuzz_common import tpl, ws  # noqa: E402,F401  (module fixtures)
import mutations  # noqa: E402

from qalora_export.formats.gguf import read as gguf_read  # noqa: E402
from qalora_export.errors import CheckpointError, QALoRAExportError  # noqa: E402

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def seed(tpl) -> bytes:
    return (tpl / "model.gguf").read_bytes()


@pytest.fixture(scope="module")
def original(tpl, ws, seed) -> dict:
    result = harness.check_typed("gguf", seed, tpl, ws)
    assert isinstance(result, dict) and result["weights"], result
    return result


def _data_offset(seed: bytes) -> int:
    import tempfile

    from gguf import GGUFReader

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(seed)
        f.flush()
        return int(GGUFReader(f.name).data_offset)


@FUZZ
@given(data=st.data())
def test_byte_damage_gives_only_typed_errors(tpl, ws, seed, data):
    harness.check_typed("gguf", data.draw(mutations.byte_edits(seed)), tpl, ws)


@FUZZ
@given(data=st.data())
def test_header_damage_gives_only_typed_errors(tpl, ws, seed, data):
    """Edits confined to the header (metadata and tensor infos), where the parsing happens."""
    end = _data_offset(seed)
    damaged = data.draw(mutations.byte_edits(seed[:end]))
    harness.check_typed("gguf", damaged + seed[end:], tpl, ws)


@FUZZ
@given(data=st.data())
def test_a_changed_weight_byte_is_never_silent(tpl, ws, seed, original, data):
    from gguf import GGMLQuantizationType

    with_path = ws.fresh() / "seed.gguf"
    with_path.write_bytes(seed)
    from gguf import GGUFReader

    reader = GGUFReader(str(with_path))
    q41 = [t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q4_1]
    t = data.draw(st.sampled_from(q41))
    offset = int(t.data_offset) + data.draw(st.integers(0, int(t.n_bytes) - 1))
    name = t.name
    del reader, t, q41
    damaged = bytearray(seed)
    damaged[offset] ^= 1 << data.draw(st.integers(0, 7))
    result = harness.check_typed("gguf", bytes(damaged), tpl, ws)
    if isinstance(result, QALoRAExportError):
        return
    from qalora_export.formats.gguf.spec import hf_linear_name

    module = hf_linear_name(name)
    assert not torch.equal(result["weights"][module], original["weights"][module]), f"a flipped byte of {name} was not seen"


@pytest.mark.parametrize("cut", [0, 3, 4, 23, 24, 100, -1])
def test_truncated_file_is_a_checkpoint_error(tpl, ws, seed, cut):
    result = harness.check_typed("gguf", seed[:cut] if cut >= 0 else seed[: len(seed) // 2], tpl, ws)
    assert isinstance(result, CheckpointError), result


def test_nan_scale_is_refused(tpl, ws, seed):
    from gguf import GGMLQuantizationType, GGUFReader

    path = ws.fresh() / "seed.gguf"
    path.write_bytes(seed)
    t = next(t for t in GGUFReader(str(path)).tensors if t.tensor_type == GGMLQuantizationType.Q4_1)
    damaged = bytearray(seed)
    damaged[int(t.data_offset):int(t.data_offset) + 2] = np.float16(np.nan).tobytes()  # block 0's d
    result = harness.check_typed("gguf", bytes(damaged), tpl, ws)
    assert isinstance(result, CheckpointError) and "NaN" in str(result)


# ------------------------------------------------------------------- each refusal, deterministically


def _write_gguf(path: Path, tensors: dict, head_count=2) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.attention.head_count", head_count) if isinstance(head_count, int) else \
        w.add_string("llama.attention.head_count", head_count)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_file_is_refused(tmp_path):
    from qalora_export.formats import get_format

    with pytest.raises(CheckpointError, match="does not exist"):
        list(get_format("gguf").read_weights(tmp_path / "nope.gguf"))


def test_unreadable_path_in_type_scan_is_refused(tmp_path):

    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        gguf_read.read_file_types(tmp_path)  # a directory
    (tmp_path / "x.gguf").write_bytes(b"GGML" + bytes(40))
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        gguf_read.read_file_types(tmp_path / "x.gguf")


def test_weight_that_is_not_2d_is_refused(tmp_path):
    from qalora_export.formats import get_format

    path = _write_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": np.ones((2, 4, 32), dtype=np.float32)})
    with pytest.raises(CheckpointError, match="3-D, expected a 2-D weight"):
        list(get_format("gguf").read_weights(path))


def test_undecodable_tensor_is_refused(tmp_path):
    """q rows that cannot be split into the declared heads' rotary pairs."""
    from qalora_export.formats import get_format

    path = _write_gguf(tmp_path / "m.gguf", {"blk.0.attn_q.weight": np.ones((6, 32), dtype=np.float32)}, head_count=4)
    with pytest.raises(CheckpointError, match="cannot be decoded"):
        list(get_format("gguf").read_weights(path))


def test_array_count_past_the_end_is_refused_not_a_hang(tmp_path):
    """Found by atheris: gguf-py reads past the end of the file as empty arrays, so an array whose
    count runs past the end looped (up to 2**64 times). Our bounded header scan refuses it first."""
    import struct

    import gguf

    from qalora_export.formats import get_format

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_array("qalora_export.test", [7, 8, 9])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", 3) + struct.pack("<i", 7)) if struct.pack("<i", 7) in data else None
    assert at is not None, "layout of the test array changed"
    data[at:at + 8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(data))
    with mutations.deadline(20), pytest.raises(CheckpointError, match="not a readable GGUF file"):
        list(get_format("gguf").read_weights(path))
