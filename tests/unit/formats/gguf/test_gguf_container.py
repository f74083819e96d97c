"""``container.read_header`` / ``container.GGUFFile`` (our fast GGUF header decoder) read what gguf-py's
``GGUFReader`` reads: every value type, nested string arrays, tensor types, shapes, offsets and data."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from qalora_export.formats.gguf import container


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    import gguf
    from gguf import GGMLQuantizationType, quants

    path = tmp_path_factory.mktemp("container") / "sample.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ 🦙")
    w.add_array("t.strs", ["a", "", "Ġ Ġ", "<0x0A>", "日本"])
    w.add_array("t.f32s", [0.5, -1e-20, 3.25e10])
    w.add_array("t.i32s", [1, -2, 3])
    w.add_array("t.bools", [True, False])
    w.add_token_scores([0.0, -1000.0, -10000.0])
    w.add_key_value("t.u64s", [1, 2**40], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 64)).astype(np.float16))
    w.add_tensor("vec", rng.standard_normal(7).astype(np.float32))
    for name, qtype in (("q8", GGMLQuantizationType.Q8_0), ("q41", GGMLQuantizationType.Q4_1)):
        blocks = quants.quantize(rng.standard_normal((6, 64)).astype(np.float32), qtype)
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_and_tensors_are_what_gguf_py_reads(sample):
    from gguf import GGUFReader

    reader = GGUFReader(str(sample))
    metadata, tensors = container.read_header(sample)
    expected = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(metadata) == list(expected)
    for key, field in expected.items():
        kind = field.types[0].name if len(field.types) == 1 else f"ARRAY[{field.types[1].name}]"
        assert metadata[key] == (kind, field.contents()), key
    assert tensors == {t.name: (int(t.tensor_type), tuple(int(d) for d in t.shape)) for t in reader.tensors}

    opened = container.GGUFFile(sample)
    assert opened.fields == {k: f.contents() for k, f in expected.items()}
    for ours, theirs in zip(opened.tensors, reader.tensors):
        assert (ours.name, ours.tensor_type, ours.shape) == (theirs.name, theirs.tensor_type, tuple(theirs.shape))
        assert (ours.data_offset, ours.n_bytes) == (theirs.data_offset, theirs.n_bytes)
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        assert np.array_equal(ours.data, theirs.data)


@pytest.mark.parametrize("cut", [3, 30, 200])
def test_truncated_headers_fail_cleanly(sample, tmp_path, cut):
    short = tmp_path / "short.gguf"
    short.write_bytes(sample.read_bytes()[:cut])
    with pytest.raises((ValueError, struct.error)):
        container.read_header(short)
