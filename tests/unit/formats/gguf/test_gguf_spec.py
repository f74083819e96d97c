"""The Q4_1 block codec and the q/k permutation of qalora_export/formats/gguf/spec.py, without models."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qalora_export.formats.gguf import spec as spec


def _finite_f16(shape):
    return hnp.arrays(np.float16, shape, elements=st.floats(-1000, 1000, width=16, allow_nan=False))


@st.composite
def q4_1_tensors(draw):
    rows = draw(st.integers(1, 7))
    nb = draw(st.integers(1, 5))
    codes = draw(hnp.arrays(np.uint8, (rows, nb * spec.QK4_1), elements=st.integers(0, 15)))
    return codes, draw(_finite_f16((rows, nb))), draw(_finite_f16((rows, nb)))


@settings(max_examples=200, deadline=None)
@given(q4_1_tensors())
def test_pack_unpack_round_trip(t):
    codes, d, m = t
    blocks = spec.pack_q4_1(codes, d, m)
    assert blocks.dtype == np.uint8
    assert blocks.shape == (codes.shape[0], codes.shape[1] // spec.QK4_1 * spec.Q4_1_BLOCK_BYTES)
    codes2, d2, m2 = spec.unpack_q4_1(blocks)
    np.testing.assert_array_equal(codes2, codes)
    np.testing.assert_array_equal(d2.view(np.uint16), d.view(np.uint16))  # bit-exact, -0.0 included
    np.testing.assert_array_equal(m2.view(np.uint16), m.view(np.uint16))


@settings(max_examples=100, deadline=None)
@given(q4_1_tensors())
def test_dequantize_is_d_times_q_plus_m(t):
    codes, d, m = t
    w = spec.dequantize_q4_1(spec.pack_q4_1(codes, d, m))
    rep = np.repeat
    expect = codes * rep(d.astype(np.float64), spec.QK4_1, axis=1) + rep(m.astype(np.float64), spec.QK4_1, axis=1)
    np.testing.assert_array_equal(w, expect)


@settings(max_examples=100, deadline=None)
@given(q4_1_tensors())
def test_our_blocks_decode_identically_in_gguf_py(t):
    """gguf-py's Q4_1 (a port of ggml's reference) reads our blocks as we do."""
    from gguf import GGMLQuantizationType, quants

    codes, d, m = t
    blocks = spec.pack_q4_1(codes, d, m)
    ours = spec.dequantize_q4_1(blocks).astype(np.float32)
    theirs = quants.dequantize(blocks, GGMLQuantizationType.Q4_1)
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-6)


def test_worked_example_exact_bytes():
    """One block: codes 0..15 then 15..0, d = 0.5, m = -2: pinned to the bytes llama.cpp reads."""
    codes = np.concatenate([np.arange(16), np.arange(15, -1, -1)]).astype(np.uint8)[None, :]
    d = np.array([[0.5]], dtype=np.float16)   # 0x3800
    m = np.array([[-2.0]], dtype=np.float16)  # 0xC000
    blocks = spec.pack_q4_1(codes, d, m)
    expected = bytes([0x00, 0x38, 0x00, 0xC0]) + bytes((j | (15 - j) << 4) for j in range(16))
    assert blocks.tobytes() == expected
    assert blocks.tobytes().hex() == "003800c0f0e1d2c3b4a5968778695a4b3c2d1e0f"
    w = spec.dequantize_q4_1(blocks)[0]
    assert w[0] == -2.0 and w[15] == 0.5 * 15 - 2 and w[16] == 0.5 * 15 - 2 and w[31] == -2.0


def test_pack_refuses_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        spec.pack_q4_1(np.zeros((1, 48), np.uint8), np.zeros((1, 1), np.float16), np.zeros((1, 1), np.float16))
    with pytest.raises(ValueError, match="d and m"):
        spec.pack_q4_1(np.zeros((1, 64), np.uint8), np.zeros((1, 1), np.float16), np.zeros((1, 1), np.float16))


@pytest.mark.parametrize("rows,heads", [(8, 2), (64, 4), (192, 3), (576, 9)])
def test_qk_permutation_matches_design_formula(rows, heads):
    """docs/design.md §8: w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)."""
    cols = 5
    w = np.random.default_rng(0).normal(size=(rows, cols))
    expect = w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    perm = spec.qk_row_permutation(rows, heads)
    np.testing.assert_array_equal(w[perm], expect)
    assert sorted(perm.tolist()) == list(range(rows))
    np.testing.assert_array_equal(w[perm][np.argsort(perm)], w)


def test_qk_permutation_refuses_odd_heads():
    with pytest.raises(ValueError, match="rotary pairs"):
        spec.qk_row_permutation(10, 4)


def test_tensor_name_map_round_trips():
    for hf, stem in spec.BLOCK_LINEARS.items():
        module = f"model.layers.7.{hf}"
        assert spec.gguf_linear_name(module) == f"blk.7.{stem}"
        assert spec.hf_linear_name(f"blk.7.{stem}.weight") == module
    assert spec.gguf_tensor_name("model.layers.2.input_layernorm.weight") == "blk.2.attn_norm.weight"
    assert spec.gguf_tensor_name("model.layers.2.post_attention_layernorm.weight") == "blk.2.ffn_norm.weight"
    assert spec.gguf_tensor_name("model.embed_tokens.weight") == "token_embd.weight"
    assert spec.gguf_tensor_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    with pytest.raises(KeyError):
        spec.gguf_tensor_name("model.vision_tower.weight")
