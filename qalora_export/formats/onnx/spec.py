"""The ``com.microsoft.MatMulNBits`` layout, as data, plus its codec and the format's tolerances.

MatMulNBits computes ``Y = A @ W.T (+ bias)`` for ``A`` ``[..., K]`` and a block-quantized
``W`` ``[N, K]`` (ONNX Runtime contrib op, domain ``com.microsoft``, version 1). Blocks run along
``K``: ``k_blocks = ceil(K / block_size)``. Dequantization (the project's convention, docs/design.md §2,
with ``g = k // block_size``):

    W[n, k] = scales[n, g] * (q[n, k] - zero_points[n, g])

=================  ===========================  ============================================
input              dtype                        shape / layout
=================  ===========================  ============================================
``A``              T1 (float32 or float16)      ``[..., K]``
``B``              uint8                        ``[N, k_blocks, block_size * bits / 8]``: the
                                                codes of row ``n``, block ``g``, packed
                                                LSB-first, ``8 / bits`` codes per byte (4-bit:
                                                element ``2j`` in the low nibble of byte ``j``)
``scales``         T1                           ``[N, k_blocks]`` (flattening is accepted too)
``zero_points``    uint8 (packed) or T1         packed: ``[N, ceil(k_blocks * bits / 8)]``, the
                                                integer zero of each block packed like ``B``;
                                                float: ``[N, k_blocks]``, any real value
=================  ===========================  ============================================

Attributes: ``K``, ``N``, ``bits``, ``block_size``, ``accuracy_level`` (0 = unset: compute in
T1; 4 = quantize ``A`` to int8 per block, faster, ~5e-3 relative noise). Without zero_points the
implicit zero is ``2**(bits - 1)``.

What onnxruntime 1.32's CPU kernel runs (measured, docs/design.md §8; 2-bit refuses ``block_size`` >
256 at session creation): bits 2, 4, 8; ``block_size`` a power of two >= 16; float zero-points only
for 2 and 4 bits. The QA-LoRA fold makes zero-points fractional, so float zero-points (the default)
hold it exactly; packed uint8 zero-points hold it only when the folded zeros are integral.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from qalora_export.core.packing import WORD_BYTES, column_word_bytes
from qalora_export.core.weight_rows import row_ranges
from qalora_export.errors import FormatLimitError

OP_TYPE = "MatMulNBits"
OP_DOMAIN = "com.microsoft"
OP_VERSION = 1
ONNX_OPSET = 21  # ai.onnx opset of the decoder graph
IR_VERSION = 10

#: Bit widths of MatMulNBits' ``B`` the CPU kernel runs.
KERNEL_BITS = (2, 4, 8)
#: Code width of the record -> width of the MatMulNBits container holding it (3-bit codes in
#: 4-bit nibbles: the values 0..7 are stored unchanged, so the container is exact).
CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 8: 8}
#: Block sizes every kernel bit width accepts (powers of two; 2-bit stops at 256).
BLOCK_SIZES = (16, 32, 64, 128, 256)
#: Bit widths whose CPU kernel accepts float zero-points.
FLOAT_ZERO_POINT_BITS = (2, 4)
#: Accuracy levels of the attribute (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: "float": float zero-points in the node (exact; onnxruntime 1.32's CPU kernel runs them on a slow
#: path). "uint8": packed integer zero-points (exact only for integral zeros). "split": packed
#: integer part plus a per-group residual ``- pool_sum(x) @ R`` (exact, and the fast kernel path).
#: "auto" (the default): "split" per node, which is packed uint8 alone where the folded zeros are
#: integral and in range, its residual factored ``U @ V`` around the base's zeros where that is
#: low rank (``lowrank.py``), with q/k/v and gate/up packed into one node each (``pack.py``): exact, fastest.
ZERO_POINT_KINDS = ("auto", "float", "uint8", "split")
DTYPES = {"fp32": np.float32, "fp16": np.float16}

# --- weight-level tolerance -------------------------------------------------------------------
#: ``read_weights`` decodes the stored scales (the checkpoint's fp16 values, exact in fp32) and
#: zero-points. With fp32 float zero-points the only loss is rounding the float64 folded zero to
#: fp32: ``|dW| <= scale * |zero| * 2**-24``. ``|zero|`` is at most a few times ``2**bits`` (the
#: fold shifts it by the adapter's delta in code units) and ``scale * 2**bits`` is about the
#: group's range, so ``|dW| / max|W| <= ~2**-24 * 2 * (1 + shift / 2**bits)``, below 1e-6 for any
#: shift under ~8 * 2**bits. Integral uint8 zero-points are exact (0 error). The tolerance is
#: relative: ``max|W_onnx - W_ref| <= WEIGHT_TOLERANCE * max|W_ref|`` per layer. An fp16 export or
#: an export with ``allow_rounding`` stores rounded zero-points and fails it, as it should: the
#: export summary reports that rounding error.
WEIGHT_TOLERANCE = 1e-6

# --- runtime tolerances (onnxruntime CPU, accuracy level 0, fp32, exact zero-points) ----------
#: max |logit_onnx - logit_torch| relative to max |logit_torch| over the prompt: fp32
#: accumulation order differs (MLAS blocked dot products vs torch GEMM, fused attention): ~1e-6
#: per op, ~1e-5 after a deep stack; 1e-3 leaves room for 30+ layers without hiding a layout bug
#: (a single wrong group moves logits by percent).
RUNTIME_MAX_DLOGIT_REL = 1e-3
#: mean KL(torch || onnx) over positions, in nats.
RUNTIME_MAX_KL = 1e-5
#: KV-cache decoding vs full recomputation, max |dlogit| relative to max |logit|.
RUNTIME_KV_MAX_DLOGIT_REL = 1e-4
#: A top-1 / greedy disagreement is tolerated only where the reference's top-2 margin is below
#: this many times the measured max |dlogit| (a near-tie, decided by accumulation order).
NEAR_TIE_FACTOR = 2.0
#: An artifact exported at ``accuracy_level`` 4 (int8 activations) is also run as stored and judged as
#: GGUF's Q8_1 dot products are (docs/design.md §4): against the base exported the same way with no
#: adapter, compared with the PyTorch base (the floor),
#:     passed  <=>  mean KL(artifact as stored vs unmerged) <= factor * mean KL(floor) + epsilon.
#: Measured on SmolLM2: floor mean KL 7.6e-3, the folded artifact 6.8e-3 (top-1 0.90-0.94 both).
STORED_LEVEL_KL_FLOOR_FACTOR = 3.0
STORED_LEVEL_KL_EPSILON = 1e-4


def container_bits(bits: int) -> int:
    """The MatMulNBits ``bits`` attribute that holds ``bits``-bit codes."""
    if bits not in CONTAINER_BITS:
        raise FormatLimitError(f"bits={bits}: MatMulNBits has no container for it; supported {sorted(CONTAINER_BITS)}")
    return CONTAINER_BITS[bits]


def block_size_for(group_size: int) -> int:
    """The block size for a quantization group of ``group_size`` contiguous columns.

    The largest of :data:`BLOCK_SIZES` that divides ``group_size``: a group of 96 becomes three
    blocks of 32 sharing one scale and zero-point, which is exact. Raises
    :class:`FormatLimitError` when no block size divides it (e.g. 8, 24, 100).
    """
    for bs in reversed(BLOCK_SIZES):
        if group_size % bs == 0:
            return bs
    raise FormatLimitError(
        f"group size {group_size} cannot be run by onnxruntime's MatMulNBits: its block size must be a "
        f"power of two in {list(BLOCK_SIZES)}, and a group must be a whole number of blocks; "
        f"quantize the base with --group-size 16, 32, 64 or 128 (or a multiple of 16)"
    )


def _pack_lsb_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of integer ``values`` LSB-first into bytes (``8 / bits`` per byte).

    The last axis is padded with zeros to a whole number of bytes.
    """
    per_byte = 8 // bits
    n = values.shape[-1]
    padded = -(-n // per_byte) * per_byte
    v = values.astype(np.uint8)
    if padded != n:
        pad = np.zeros(values.shape[:-1] + (padded - n,), dtype=np.uint8)
        v = np.concatenate([v, pad], axis=-1)
    v = v.reshape(values.shape[:-1] + (padded // per_byte, per_byte))
    out = np.zeros(v.shape[:-1], dtype=np.uint8)
    for j in range(per_byte):
        out |= (v[..., j] << (bits * j)).astype(np.uint8)
    return out


def _unpack_lsb_first(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack_lsb_first`: uint8 ``[..., n]`` codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * j)) & mask for j in range(per_byte)]
    out = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * per_byte,))
    return out[..., :n].astype(np.uint8)


def pack_b(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """``B`` from codes: uint8 ``[N, K]`` -> uint8 ``[N, k_blocks, block_size * bits / 8]``.

    ``bits`` is the container width (2, 4 or 8). ``K`` is padded with zero codes to whole blocks.
    """
    if bits not in KERNEL_BITS:
        raise FormatLimitError(f"MatMulNBits bits={bits} is not one of {KERNEL_BITS}")
    codes = np.asarray(codes)
    if codes.size and int(codes.max()) > (1 << bits) - 1:
        raise FormatLimitError(f"a code {int(codes.max())} does not fit the {bits}-bit container")
    n_rows, k = codes.shape
    k_blocks = math.ceil(k / block_size)
    if k_blocks * block_size != k:
        codes = np.concatenate([codes, np.zeros((n_rows, k_blocks * block_size - k), codes.dtype)], axis=1)
    packed = _pack_lsb_first(codes.reshape(n_rows, k_blocks, block_size), bits)
    return np.ascontiguousarray(packed)


#: Code widths whose GPTQ ``qweight`` words are, byte for byte, MatMulNBits ``B`` (no code
#: straddles a byte; 3-bit codes straddle words and go through unpacking into a 4-bit container).
RELAYABLE_BITS = (2, 4, 8)


#: Bytes of ``B`` laid out at a time by :meth:`BFromQweight.row_blocks`: a block's transpose
#: reads whole runs of ``qweight`` rows and its copy stays in cache (a whole-layer transpose into
#: fresh memory ran at ~1.4 GB/s, 2.5 s of a 7B export).
B_ROW_BLOCK_BYTES = 1 << 20


class BFromQweight:
    """``B`` uint8 ``[N, k_blocks, blob]`` of a relayable layer, kept as its GPTQ ``qweight`` and laid
    out when asked (:func:`b_from_qweight` explains why the words' bytes are ``B``'s):

    - :meth:`row_blocks`: ``B`` as consecutive C-order row blocks, for writing;
    - :meth:`take`: the bytes of a few ``(row, block)`` pairs, for the rounding report;
    - ``np.asarray(b)``: the whole array (:func:`b_from_qweight`).

    Attributes:
        shape: ``(N, k_blocks, blob)``; dtype: uint8; nbytes.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, qweight: np.ndarray, bits: int, block_size: int):
        blob = _relayable_blob(qweight, bits, block_size)
        words, n_rows = qweight.shape
        self.qweight = qweight
        self.shape = (n_rows, words * WORD_BYTES // blob, blob)
        self.nbytes = n_rows * words * WORD_BYTES

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start .. stop - 1`` of ``B``: columns of ``qweight`` as their bytes."""
        return column_word_bytes(self.qweight, slice(start, stop)).reshape(stop - start, *self.shape[1:])

    def row_blocks(self, block_bytes: int = 0) -> Iterator[np.ndarray]:
        """``B``'s rows, ``[rows, k_blocks, blob]`` a block, about ``block_bytes`` each
        (default :data:`B_ROW_BLOCK_BYTES`); concatenated they are ``np.asarray(self)``."""
        n_rows, k_blocks, blob = self.shape
        for start, stop in row_ranges(n_rows, k_blocks * blob, block_bytes or B_ROW_BLOCK_BYTES):
            yield self._rows(start, stop)

    def take(self, rows: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        """``B[rows, blocks]`` uint8 ``[m, blob]`` for index arrays ``rows``, ``blocks`` ``[m]``."""
        words_per_block = self.shape[2] // WORD_BYTES
        word = np.asarray(blocks)[:, None] * words_per_block + np.arange(words_per_block)  # [m, wpb]
        picked = self.qweight[word, np.asarray(rows)[:, None]]  # int32 [m, wpb]
        return np.ascontiguousarray(picked, dtype="<i4").view(np.uint8).reshape(len(word), self.shape[2])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        b = self._rows(0, self.shape[0])
        return b if dtype is None else b.astype(dtype)


def _relayable_blob(qweight: np.ndarray, bits: int, block_size: int) -> int:
    """``blob`` (bytes a block) of a ``qweight`` whose words can be ``B``; else FormatLimitError."""
    if bits not in RELAYABLE_BITS:
        raise FormatLimitError(f"{bits}-bit GPTQ words cannot be re-laid as MatMulNBits B; unpack them (pack_b)")
    words, _ = qweight.shape
    blob = block_size * bits // 8
    if qweight.dtype != np.int32 or (words * WORD_BYTES) % blob or blob % WORD_BYTES:
        raise FormatLimitError(
            f"qweight {qweight.dtype} {tuple(qweight.shape)} does not hold whole {block_size}-code blocks of "
            f"{bits}-bit codes ({blob} bytes each)")
    return blob


def b_from_qweight(qweight: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """``B`` straight from a GPTQ ``qweight``, without unpacking: one transpose-copy of the words.

    GPTQ packs the codes of output column ``n`` along ``in`` into int32 words as one
    little-endian, LSB-first bit stream (``qalora_export.core.packing``); ``B`` packs row ``n`` along
    ``K`` LSB-first into bytes. For ``bits`` in :data:`RELAYABLE_BITS` no code straddles a byte,
    so the little-endian bytes of column ``n``'s words, in order, are row ``n`` of ``B``. Only for
    contiguous groups (act-order layers need their columns permuted first).

    Args:
        qweight: int32 ``[K * bits / 32, N]``.
        bits: the code width, which is also the container width here.
        block_size: ``K`` must be a whole number of blocks.

    Returns:
        uint8 ``[N, K / block_size, block_size * bits / 8]``, equal to ``pack_b`` of the unpacked codes.
    """
    return np.asarray(BFromQweight(qweight, bits, block_size))  # one transpose-copy of the words


def block_code_range(b: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest code of each block of ``B`` ``[..., blob]``: uint8 ``[...]`` each."""
    codes = _unpack_lsb_first(b, bits, b.shape[-1] * 8 // bits)
    return codes.min(axis=-1), codes.max(axis=-1)


def unpack_b(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Codes uint8 ``[N, K]`` from ``B`` ``[N, k_blocks, block_size * bits / 8]``."""
    n_rows, k_blocks, blob = b.shape
    block_size = blob * 8 // bits
    codes = _unpack_lsb_first(b, bits, block_size)  # [N, k_blocks, block_size]
    return codes.reshape(n_rows, k_blocks * block_size)[:, :k]


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """Packed uint8 zero-points ``[N, ceil(k_blocks * bits / 8)]`` from integers ``[N, k_blocks]``."""
    zeros = np.asarray(zeros)
    if zeros.size and (int(zeros.min()) < 0 or int(zeros.max()) > (1 << bits) - 1):
        raise FormatLimitError(
            f"zero-points in [{int(zeros.min())}, {int(zeros.max())}] do not fit {bits}-bit packed zero-points "
            f"[0, {(1 << bits) - 1}]"
        )
    return np.ascontiguousarray(_pack_lsb_first(zeros, bits))


def unpack_zero_points(packed: np.ndarray, bits: int, k_blocks: int) -> np.ndarray:
    """Integer zero-points uint8 ``[N, k_blocks]`` from packed ``[N, ceil(k_blocks * bits / 8)]``."""
    return _unpack_lsb_first(packed, bits, k_blocks)


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int) -> np.ndarray:
    """float64 ``W`` ``[N, K]`` from codes ``[N, K]``, scales and zeros ``[N, k_blocks]``."""
    k = codes.shape[1]
    s = np.repeat(scales.astype(np.float64), block_size, axis=1)[:, :k]
    z = np.repeat(zeros.astype(np.float64), block_size, axis=1)[:, :k]
    return s * (codes.astype(np.float64) - z)


# ------------------------------------------------------------------------------------ files

MODEL_FILE = "model.onnx"  # the graph; every initializer over 1 KiB lives in DATA_FILE
DATA_FILE = MODEL_FILE + ".data"
GENAI_CONFIG_FILE = "genai_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
METADATA_VERSION = "1"
MERGE_METADATA_KEY = "qalora_export.merge"  # metadata_props entry: JSON of what the export rounded
