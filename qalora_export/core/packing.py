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

from qalora_export.errors import FormatLimitError

SUPPORTED_BITS = (2, 3, 4, 8)
WORD_BITS = 32


WORD_BYTES = WORD_BITS // 8


def column_word_bytes(qweight: np.ndarray, columns=slice(None)) -> np.ndarray:
    """The words of each chosen column of a packed int32 ``qweight`` ``[words, cols]`` as their
    little-endian bytes: uint8 ``[n, words * 4]`` for ``columns`` (a slice or an index array).

    Each column's words hold that output's codes as one LSB-first bit stream along ``in``, so these
    bytes are the stream in order, whatever the host's byte order (one transpose-copy).
    """
    return np.ascontiguousarray(qweight.T[columns], dtype="<i4").view(np.uint8)


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
    if WORD_BITS % bits == 0:
        codes = _unpack_whole_bytes(arr.reshape(n_words, -1), bits).reshape((n_words * WORD_BITS // bits,) + rest)
    else:
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


def _unpack_whole_bytes(words: np.ndarray, bits: int) -> np.ndarray:
    """Unpack uint32 words ``[n_words, cols]`` of 2/4/8-bit codes to uint8 ``[n_words * 32 / bits, cols]``.

    For these widths no code straddles a byte, and the stream is little-endian, so byte ``k`` of
    word ``w`` holds codes ``(4w + k) * c .. + c - 1`` (``c = 8 / bits``), LSB first: the codes come
    from uint8 shifts of the words' bytes, never widened to 64 bits (this is the hot loop of
    every decode; same result as the general path).
    """
    n_words, cols = words.shape
    per_byte = 8 // bits
    as_bytes = np.ascontiguousarray(words).astype("<u4", copy=False).view(np.uint8).reshape(n_words, cols, 4)
    if per_byte == 1:
        return as_bytes.transpose(0, 2, 1).reshape(n_words * 4, cols)
    mask = np.uint8((1 << bits) - 1)
    out = np.empty((n_words, 4, per_byte, cols), dtype=np.uint8)
    for k in range(per_byte):
        np.bitwise_and(as_bytes >> np.uint8(bits * k), mask, out=out[:, :, k, :].transpose(0, 2, 1))
    return out.reshape(n_words * 4 * per_byte, cols)


def _unpack_plan(bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-code constants of one packing cycle, as ``[1, per_cycle, 1]`` int32/int64 tensors.

    Code ``j`` starts at bit ``b*j`` of its cycle: word ``w_j``, offset ``o_j``. Its low part is
    ``(word[w_j] >> o_j) & low_mask_j``; a code that straddles into the next word (3-bit codes 10
    and 21) takes its high part ``(word[w_j + 1] & spill_mask_j) << (32 - o_j)``, which is zero for
    every other code (``spill_mask_j = 0``).
    """
    key = (bits, str(device))
    plan = _UNPACK_PLANS.get(key)
    if plan is None:
        per_cycle = cycle_codes(bits)
        words_per_cycle = per_cycle * bits // WORD_BITS
        word, offset, low_mask, spill_mask, high_shift = [], [], [], [], []
        for j in range(per_cycle):
            w, o = divmod(bits * j, WORD_BITS)
            straddles = o + bits > WORD_BITS
            word.append(w)
            offset.append(o)
            low_mask.append((1 << (WORD_BITS - o)) - 1 if straddles else (1 << bits) - 1)
            spill_mask.append((1 << (o + bits - WORD_BITS)) - 1 if straddles else 0)
            high_shift.append(WORD_BITS - o if straddles else 0)
        as_col = lambda v, dt=torch.int32: torch.tensor(v, dtype=dt, device=device).view(1, -1, 1)  # noqa: E731
        plan = (as_col(word, torch.int64), as_col([min(w + 1, words_per_cycle - 1) for w in word], torch.int64),
                as_col(offset), as_col(low_mask), as_col(spill_mask), as_col(high_shift))
        _UNPACK_PLANS[key] = plan
    return plan


_UNPACK_PLANS: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}


def unpack_codes_torch(words: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """:func:`unpack_codes` along dim 0 with torch ops, on the words' device (for forward passes).

    Vectorised over the codes of a cycle (a handful of whole-tensor ops, no per-code loop), since
    the QA-LoRA layer unpacks its frozen base at every forward.

    Args:
        words: int32 ``[n_words, cols]``.
    Returns:
        int32 codes ``[n_codes, cols]``.
    """
    _check_bits(bits)
    per_cycle = cycle_codes(bits)
    words_per_cycle = per_cycle * bits // WORD_BITS
    n_words, cols = words.shape
    word, next_word, offset, low_mask, spill_mask, high_shift = _unpack_plan(bits, words.device)
    w = words.reshape(n_words // words_per_cycle, words_per_cycle, cols)
    if words_per_cycle == 1:  # 2, 4, 8 bits: whole codes per word, broadcast the word over its codes
        # Arithmetic right shift of int32 then masking keeps only the field's bits.
        codes = torch.bitwise_right_shift(w, offset).bitwise_and_(low_mask)
    else:  # 3 bits: 32 codes in 3 words, two of them straddling a word boundary
        codes = w.index_select(1, word.view(-1)).bitwise_right_shift_(offset).bitwise_and_(low_mask)
        high = w.index_select(1, next_word.view(-1)).bitwise_and_(spill_mask).bitwise_left_shift_(high_shift)
        codes.bitwise_or_(high)
    return codes.reshape(-1, cols)[:n_codes]
