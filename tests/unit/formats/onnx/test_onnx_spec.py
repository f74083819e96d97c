"""MatMulNBits layout codec (qalora_export/formats/onnx/spec.py): round trips, pinned bytes, onnxruntime agreement."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_export.errors import FormatLimitError
from qalora_export.formats.onnx import spec as spec


@st.composite
def codes_case(draw):
    record_bits = draw(st.sampled_from([2, 3, 4, 8]))
    bits = spec.container_bits(record_bits)
    block_size = draw(st.sampled_from(spec.BLOCK_SIZES))
    n = draw(st.integers(1, 7))
    k = draw(st.integers(1, 3 * block_size))  # odd K: last block padded
    seed = draw(st.integers(0, 2**31 - 1))
    codes = np.random.default_rng(seed).integers(0, 1 << record_bits, (n, k)).astype(np.uint8)
    return bits, block_size, codes


@settings(max_examples=150, deadline=None)
@given(codes_case())
def test_b_round_trip(case):
    bits, block_size, codes = case
    b = spec.pack_b(codes, bits, block_size)
    n, k = codes.shape
    assert b.dtype == np.uint8
    assert b.shape == (n, -(-k // block_size), block_size * bits // 8)
    np.testing.assert_array_equal(spec.unpack_b(b, bits, k), codes)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.integers(1, 9), st.integers(1, 37), st.integers(0, 2**31 - 1))
def test_zero_point_round_trip(record_bits, n, k_blocks, seed):
    bits = spec.container_bits(record_bits)
    zeros = np.random.default_rng(seed).integers(0, 1 << bits, (n, k_blocks)).astype(np.uint8)
    packed = spec.pack_zero_points(zeros, bits)
    assert packed.shape == (n, -(-k_blocks * bits // 8))
    np.testing.assert_array_equal(spec.unpack_zero_points(packed, bits, k_blocks), zeros)


def test_worked_example_exact_bytes():
    # One row, one block of 16 codes 0..15 (4-bit): element 2j in the low nibble of byte j.
    codes = np.arange(16, dtype=np.uint8)[None, :]
    assert spec.pack_b(codes, 4, 16).tobytes() == bytes([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE])
    # 2-bit: codes 0,1,2,3 -> 0b11_10_01_00 = 0xE4; 16 codes -> 4 bytes.
    codes2 = np.tile(np.arange(4, dtype=np.uint8), 4)[None, :]
    assert spec.pack_b(codes2, 2, 16).tobytes() == bytes([0xE4] * 4)
    # 8-bit is the identity.
    assert spec.pack_b(np.arange(16, dtype=np.uint8)[None, :], 8, 16).tobytes() == bytes(range(16))
    # zero-points: 3 blocks of 4-bit zeros 1, 2, 3 -> bytes 0x21, 0x03 (last nibble padded).
    assert spec.pack_zero_points(np.array([[1, 2, 3]]), 4).tobytes() == bytes([0x21, 0x03])
    # A K that is not a whole block is padded with zero codes.
    assert spec.pack_b(np.full((1, 3), 15, np.uint8), 4, 16).tobytes() == bytes([0xFF, 0x0F] + [0] * 6)


def test_three_bit_codes_in_four_bit_container():
    assert spec.container_bits(3) == 4
    codes = np.arange(8, dtype=np.uint8).repeat(4)[None, :]
    np.testing.assert_array_equal(spec.unpack_b(spec.pack_b(codes, 4, 32), 4, 32), codes)


@pytest.mark.parametrize("group_size, block", [(16, 16), (32, 32), (64, 64), (128, 128), (256, 256),
                                               (96, 32), (576, 64), (1024, 256)])
def test_block_size_for(group_size, block):
    assert spec.block_size_for(group_size) == block


@pytest.mark.parametrize("group_size", [8, 24, 100, 1])
def test_block_size_refused(group_size):
    with pytest.raises(FormatLimitError, match="group size"):
        spec.block_size_for(group_size)


def test_out_of_range_refused():
    with pytest.raises(FormatLimitError):
        spec.pack_zero_points(np.array([[16]]), 4)
    with pytest.raises(FormatLimitError):
        spec.pack_b(np.array([[4]], dtype=np.uint8), 2, 16)


@pytest.mark.parametrize("bits, zero_kind", [(2, "float"), (4, "float"), (2, "uint8"), (4, "uint8"), (8, "uint8")])
def test_codec_matches_onnxruntime(bits, zero_kind):
    """onnxruntime's kernel computes x @ W.T with W decoded by this module's ``dequantize``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    n, k, block = 24, 80, 32  # K not a multiple of the block
    k_blocks = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    scales = (rng.random((n, k_blocks)) * 0.1 + 0.01).astype(np.float32)
    if zero_kind == "float":
        zeros = (rng.random((n, k_blocks)) * (1 << bits)).astype(np.float32)
        zp = zeros
    else:
        zeros = rng.integers(0, 1 << bits, (n, k_blocks))
        zp = spec.pack_zero_points(zeros, bits)
    inits = [numpy_helper.from_array(spec.pack_b(codes, bits, block), "B"),
             numpy_helper.from_array(scales, "S"), numpy_helper.from_array(zp, "Z")]
    node = helper.make_node(spec.OP_TYPE, ["X", "B", "S", "Z"], ["Y"], domain=spec.OP_DOMAIN,
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", spec.ONNX_OPSET),
                                                    helper.make_opsetid(spec.OP_DOMAIN, 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = sess.run(None, {"X": x})[0]
    w = spec.dequantize(codes, scales, zeros, block)
    ref = x.astype(np.float64) @ w.T
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
