"""Bit packing of integer codes into 32-bit words, as AutoGPTQ lays them out.

Layout (the one AutoGPTQ, GPTQModel, vLLM and ExLlama read): along the packed axis, the codes
form one little-endian bit stream, code ``j`` occupying bits ``[b*j, b*j + b)``; the stream is cut
into 32-bit words, word ``w`` holding stream bits ``[32*w, 32*w + 32)`` with stream bit ``32*w``
in the word's least significant bit. For b in {2, 4, 8} every word holds ``32 // b`` whole codes;
for b = 3 a *cycle* of 32 codes fills 3 words and codes 10 and 21 straddle word boundaries.

Shapes: packing ``n`` codes along an axis gives ``ceil(n / c) * c * b / 32`` words, with
``c = cycle_codes(b)`` (16, 32, 8, 4 for b = 2, 3, 4, 8): a partial last cycle is padded with zero
codes, as GPTQModel pads ``qzeros`` when ``out`` is not a multiple of ``32 / b``. Unpacking needs
the true count to drop the padding. Words are stored as ``int32`` (the bit pattern of the
unsigned word), as the safetensors checkpoints hold them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import FormatLimitError

SUPPORTED_BITS = (2, 3, 4, 8)
WORD_BITS = 32


def cycle_codes(bits: int) -> int:
    """Codes per packing cycle: the smallest count that fills whole 32-bit words."""
    _check_bits(bits)
    return math.lcm(WORD_BITS, bits) // bits


def packed_length(n_codes: int, bits: int) -> int:
    """Number of 32-bit words that ``n_codes`` codes of ``bits`` bits occupy (last cycle padded)."""
    per_cycle = cycle_codes(bits)
    return -(-n_codes // per_cycle) * per_cycle * bits // WORD_BITS


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatLimitError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes along ``dim`` into int32 words.

    Args:
        codes: integer tensor, values in ``[0, 2**bits - 1]``; any shape.
        bits: 2, 3, 4 or 8.
        dim: the axis to pack (0 for GPTQ ``qweight`` from ``[in, out]`` codes, 1 for ``qzeros``
            from ``[G, out]`` codes).

    Returns:
        int32 tensor with ``shape[dim] = packed_length(codes.shape[dim], bits)``, other axes
        unchanged.
    """
    n = codes.shape[dim]
    n_words = packed_length(n, bits)
    c = codes.detach().cpu().to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise FormatLimitError(
            f"codes out of range for {bits}-bit packing: min {int(c.min())}, max {int(c.max())}, "
            f"allowed [0, {(1 << bits) - 1}]"
        )
    arr = np.moveaxis(c.numpy(), dim, 0)
    rest = arr.shape[1:]
    per_cycle = cycle_codes(bits)
    padded = n_words * WORD_BITS // bits
    if padded != n:
        arr = np.concatenate([arr, np.zeros((padded - n,) + rest, dtype=arr.dtype)], axis=0)
        n = padded
    words_per_cycle = per_cycle * bits // WORD_BITS
    cycles = arr.reshape(n // per_cycle, per_cycle, -1).astype(np.uint64)
    out = np.zeros((n // per_cycle, words_per_cycle, cycles.shape[2]), dtype=np.uint64)
    for j in range(per_cycle):
        start = bits * j
        word, offset = divmod(start, WORD_BITS)
        out[:, word] |= cycles[:, j] << np.uint64(offset)
        if offset + bits > WORD_BITS:  # the code straddles into the next word
            out[:, word + 1] |= cycles[:, j] >> np.uint64(WORD_BITS - offset)
    out &= np.uint64(0xFFFFFFFF)
    words = out.astype(np.uint32).view(np.int32).reshape((n_words,) + rest)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(words, 0, dim)))


def unpack_codes(words: torch.Tensor, bits: int, dim: int, n_codes: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words along ``dim`` to uint8 codes.

    Args:
        words: int32 tensor of packed words.
        bits: 2, 3, 4 or 8.
        dim: the packed axis.
        n_codes: the true number of codes along ``dim`` (drops the padding of a partial cycle);
            default: every code the words hold.

    Returns a uint8 tensor with ``shape[dim] = n_codes``.
    """
    _check_bits(bits)
    if words.dtype != torch.int32:
        raise FormatLimitError(f"packed words must be int32, got {words.dtype}")
    per_cycle = cycle_codes(bits)
    words_per_cycle = per_cycle * bits // WORD_BITS
    n_words = words.shape[dim]
    if n_words % words_per_cycle:
        raise FormatLimitError(
            f"{n_words} packed words along dim {dim} is not a multiple of {words_per_cycle}, "
            f"as {bits}-bit packing requires"
        )
    arr = np.moveaxis(words.detach().cpu().numpy().view(np.uint32), dim, 0)
    rest = arr.shape[1:]
    cycles = arr.reshape(n_words // words_per_cycle, words_per_cycle, -1).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((cycles.shape[0], per_cycle, cycles.shape[2]), dtype=np.uint8)
    for j in range(per_cycle):
        word, offset = divmod(bits * j, WORD_BITS)
        value = cycles[:, word] >> np.uint64(offset)
        if offset + bits > WORD_BITS:
            value = value | (cycles[:, word + 1] << np.uint64(WORD_BITS - offset))
        out[:, j] = (value & mask).astype(np.uint8)
    codes = out.reshape((n_words // words_per_cycle * per_cycle,) + rest)
    if n_codes is not None:
        if n_codes > codes.shape[0] or packed_length(n_codes, bits) != n_words:
            raise FormatLimitError(
                f"{n_words} packed words of {bits}-bit codes along dim {dim} cannot hold exactly "
                f"{n_codes} codes (expected {packed_length(n_codes, bits)} words)"
            )
        codes = codes[:n_codes]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(codes, 0, dim)))


def unpack_codes_torch(words: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """:func:`unpack_codes` along dim 0 with torch ops, on the words' device (for forward passes).

    Args:
        words: int32 ``[n_words, cols]``.
    Returns:
        int32 codes ``[n_codes, cols]``.
    """
    _check_bits(bits)
    per_cycle = cycle_codes(bits)
    words_per_cycle = per_cycle * bits // WORD_BITS
    n_words, cols = words.shape
    w = words.reshape(n_words // words_per_cycle, words_per_cycle, cols)
    mask = (1 << bits) - 1
    parts = []
    for j in range(per_cycle):
        word, offset = divmod(bits * j, WORD_BITS)
        # Arithmetic right shift of int32 then masking keeps only the field's bits.
        value = torch.bitwise_right_shift(w[:, word], offset) & mask
        if offset + bits > WORD_BITS:
            spill = offset + bits - WORD_BITS
            high = w[:, word + 1] & ((1 << spill) - 1)
            value = value & ((1 << (WORD_BITS - offset)) - 1) | torch.bitwise_left_shift(high, WORD_BITS - offset)
        parts.append(value)
    codes = torch.stack(parts, dim=1).reshape(-1, cols)
    return codes[:n_codes]
