"""Tests of qalora_export.core.packing: GPTQ bit-stream packing of 2/3/4/8-bit codes into int32 words."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_export.errors import FormatLimitError
from qalora_export.core.packing import (
    SUPPORTED_BITS,
    cycle_codes,
    pack_codes,
    packed_length,
    unpack_codes,
    unpack_codes_torch,
)


def reference_words(codes: list[int], bits: int) -> list[int]:
    """The layout written as arithmetic on one Python integer (the spec, independent of the code):
    code j occupies stream bits [b*j, b*j + b), word w holds stream bits [32w, 32w + 32)."""
    stream = sum(int(c) << (bits * j) for j, c in enumerate(codes))
    n_words = packed_length(len(codes), bits)
    words = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(n_words)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # int32 bit patterns


def random_codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int64).to(torch.uint8)


# ----------------------------------------------------------------------------- worked examples


def test_3bit_worked_example_pinned_to_exact_words():
    # 32 codes c_j = j % 8 fill one 3-bit cycle = 3 words (96 bits).
    # Codes 0..7 as 3-bit fields are octal 76543210 = 0x00FAC688 (bits 0..23).
    # Word 0: + codes 8, 9 (= 0, 1) at bits 24..29 -> 1 << 27 = 0x08000000;
    #         code 10 (= 2 = 0b010) straddles: its low two bits 0b10 go to bits 30..31 -> 0x80000000,
    #         its high bit (0) to bit 0 of word 1.          word 0 = 0x88FAC688
    # Word 1: bit 0 = 0 (code 10's high bit), codes 11..20 (= 3,4,5,6,7,0,1,2,3,4) at bits 1..30,
    #         code 21 (= 5 = 0b101) straddles: low bit 1 -> bit 31, high bits 0b10 -> word 2 bits 0..1.
    #         (3 + 4<<3 + 5<<6 + 6<<9 + 7<<12 + 1<<18 + 2<<21 + 3<<24 + 4<<27) << 1 | 1<<31 = 0xC688FAC6
    # Word 2: bits 0..1 = 0b10 (code 21's high bits), codes 22..31 (= 6,7,0,1,...,7) at bits 2..31.
    #         0b10 | (6 + 7<<3 + 1<<9 + 2<<12 + 3<<15 + 4<<18 + 5<<21 + 6<<24 + 7<<27) << 2 = 0xFAC688FA
    codes = torch.tensor([j % 8 for j in range(32)], dtype=torch.uint8)
    expected = [0x88FAC688, 0xC688FAC6, 0xFAC688FA]
    assert (3 + (4 << 3) + (5 << 6) + (6 << 9) + (7 << 12) + (1 << 18) + (2 << 21) + (3 << 24) + (4 << 27)) << 1 \
        | (1 << 31) == expected[1]
    expected_int32 = np.array(expected, dtype=np.uint32).view(np.int32).tolist()
    assert expected_int32 == [-1996831096, -964101434, -87652102]
    assert reference_words(codes.tolist(), 3) == expected_int32

    words = pack_codes(codes[:, None], 3, dim=0)
    assert words.dtype == torch.int32 and words.shape == (3, 1)
    assert words[:, 0].tolist() == expected_int32
    assert torch.equal(unpack_codes(words, 3, dim=0, n_codes=32)[:, 0], codes)
    assert torch.equal(unpack_codes_torch(words, 3, 32)[:, 0], codes.to(torch.int32))


@pytest.mark.parametrize("bits, codes, word", [
    (2, [j % 4 for j in range(16)], 0xE4E4E4E4),  # 0b11100100 repeated: codes 0,1,2,3 per byte
    (4, list(range(8)), 0x76543210),  # one nibble per code, code 0 in the low nibble
    (8, [0x10, 0x32, 0x54, 0xF6], 0xF6543210),  # one byte per code, LSB first
])
def test_whole_code_widths_worked_examples(bits, codes, word):
    packed = pack_codes(torch.tensor(codes, dtype=torch.uint8)[:, None], bits, dim=0)
    expected = int(np.array([word], dtype=np.uint32).view(np.int32)[0])
    assert packed.shape == (1, 1) and int(packed[0, 0]) == expected


def test_cycle_and_length_table():
    assert [cycle_codes(b) for b in SUPPORTED_BITS] == [16, 32, 8, 4]
    assert packed_length(64, 4) == 8
    assert packed_length(64, 3) == 6
    assert packed_length(33, 3) == 6  # a partial cycle is padded to a whole one
    assert packed_length(1, 2) == 1
    assert packed_length(5, 8) == 2
    assert packed_length(0, 4) == 0


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(1, 70), cols=st.integers(1, 5),
       dim=st.sampled_from([0, 1]), seed=st.integers(0, 2**31 - 1))
def test_round_trip_both_axes_odd_shapes(bits, n, cols, dim, seed):
    shape = (n, cols) if dim == 0 else (cols, n)
    codes = random_codes(shape, bits, seed)
    words = pack_codes(codes, bits, dim=dim)
    expected_shape = list(shape)
    expected_shape[dim] = packed_length(n, bits)
    assert list(words.shape) == expected_shape and words.dtype == torch.int32
    back = unpack_codes(words, bits, dim=dim, n_codes=n)
    assert back.dtype == torch.uint8 and torch.equal(back, codes)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(1, 70), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_bit_stream(bits, n, seed):
    codes = random_codes((n,), bits, seed)
    words = pack_codes(codes[:, None], bits, dim=0)[:, 0]
    assert words.tolist() == reference_words(codes.tolist(), bits)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(SUPPORTED_BITS), n=st.integers(1, 70), cols=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_numpy_and_torch_unpack_agree(bits, n, cols, seed):
    codes = random_codes((n, cols), bits, seed)
    words = pack_codes(codes, bits, dim=0)
    a = unpack_codes(words, bits, dim=0, n_codes=n)
    b = unpack_codes_torch(words, bits, n)
    assert b.dtype == torch.int32
    assert torch.equal(a.to(torch.int32), b)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes_and_sign_bit(bits):
    # All-ones codes set the int32 sign bit: the arithmetic shifts must not leak it into fields.
    n = cycle_codes(bits) * 3
    for value in (0, (1 << bits) - 1):
        codes = torch.full((n, 3), value, dtype=torch.uint8)
        words = pack_codes(codes, bits, dim=0)
        assert torch.equal(unpack_codes(words, bits, dim=0, n_codes=n), codes)
        assert torch.equal(unpack_codes_torch(words, bits, n), codes.to(torch.int32))
    ones = pack_codes(torch.full((n, 1), (1 << bits) - 1, dtype=torch.uint8), bits, dim=0)
    assert bool((ones == -1).all())  # every bit set: whole words of -1


def test_dim1_is_dim0_transposed():
    codes = random_codes((7, 45), 3, 5)
    assert torch.equal(pack_codes(codes, 3, dim=1), pack_codes(codes.T, 3, dim=0).T)


def test_partial_cycle_padding_is_zero_codes():
    codes = torch.full((5, 1), 7, dtype=torch.uint8)  # 5 of a 32-code 3-bit cycle
    words = pack_codes(codes, 3, dim=0)
    full = unpack_codes(words, 3, dim=0)  # every code the words hold
    assert full.shape == (32, 1)
    assert full[:5, 0].tolist() == [7] * 5 and full[5:, 0].tolist() == [0] * 27


def test_input_tensor_is_not_modified():
    codes = random_codes((40, 3), 4, 1)
    before = codes.clone()
    words = pack_codes(codes, 4, dim=0)
    w_before = words.clone()
    unpack_codes(words, 4, dim=0, n_codes=40)
    unpack_codes_torch(words, 4, 40)
    assert torch.equal(codes, before) and torch.equal(words, w_before)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_out_of_range_codes_raise(bits):
    too_big = torch.tensor([[1 << bits]], dtype=torch.int64)
    with pytest.raises(FormatLimitError, match=rf"{bits}-bit packing.*max {1 << bits}"):
        pack_codes(too_big, bits, dim=0)
    with pytest.raises(FormatLimitError, match="min -1"):
        pack_codes(torch.tensor([[-1]]), bits, dim=0)


@pytest.mark.parametrize("bits", [1, 5, 6, 16])
def test_unsupported_bits_raise(bits):
    with pytest.raises(FormatLimitError, match="not supported"):
        pack_codes(torch.zeros(4, 1, dtype=torch.uint8), bits, dim=0)
    with pytest.raises(FormatLimitError, match="not supported"):
        unpack_codes(torch.zeros(4, 1, dtype=torch.int32), bits, dim=0)
    with pytest.raises(FormatLimitError, match="not supported"):
        unpack_codes_torch(torch.zeros(4, 1, dtype=torch.int32), bits, 4)


def test_unpack_refuses_wrong_word_count_and_dtype():
    with pytest.raises(FormatLimitError, match="not a multiple of 3"):
        unpack_codes(torch.zeros(4, 2, dtype=torch.int32), 3, dim=0)
    with pytest.raises(FormatLimitError, match="cannot hold exactly 40 codes"):
        unpack_codes(torch.zeros(3, 2, dtype=torch.int32), 3, dim=0, n_codes=40)
    with pytest.raises(FormatLimitError, match="cannot hold exactly 8 codes"):
        # 2 words of 4-bit codes hold 16 codes; 8 codes would need 1 word
        unpack_codes(torch.zeros(2, 2, dtype=torch.int32), 4, dim=0, n_codes=8)
    with pytest.raises(FormatLimitError, match="must be int32"):
        unpack_codes(torch.zeros(2, 2, dtype=torch.int64), 4, dim=0)
