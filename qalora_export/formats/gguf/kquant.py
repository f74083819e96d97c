"""Q6_K, the k-quant llama.cpp stores an output head in (``--embeddings q6_k``): layout as data, a
vectorized numpy encoder and this project's own decoder.

Q6_K is a requantization of a float table (the token embedding and the lm head are float in the
base and untouched by the adapter), never used for the folded projections. It is what llama.cpp's
own quantizer writes for ``output.weight`` (and for a tied ``token_embd``) in a Q4_1 file.

Block (ggml ``block_q6_K``, ``QK_K = 256`` weights, 210 bytes, little-endian)::

    offset  size  field
    0       128   ql      uint8  low 4 bits of the codes
    128     64    qh      uint8  high 2 bits of the codes
    192     16    scales  int8   one per sub-block of 16 weights
    208     2     d       fp16   super-block scale

    value[i] = d * scales[i // 16] * (q[i] - 32),   q in 0..63

Within each half ``h`` (weights ``128 h .. 128 h + 127``) the codes form four rows ``r0..r3`` of 32
(``r_k[l]`` = code ``128 h + 32 k + l``) and, for ``l = 0..31``::

    ql[64 h + l]      = r0[l] & 15 | (r2[l] & 15) << 4
    ql[64 h + 32 + l] = r1[l] & 15 | (r3[l] & 15) << 4
    qh[32 h + l]      = r0[l] >> 4 | (r1[l] >> 4) << 2 | (r2[l] >> 4) << 4 | (r3[l] >> 4) << 6

Encoder (:func:`quantize_q6_k`), per sub-block of 16 weights: a search over candidate scales
that put the largest-magnitude weight at code ``-32 + c/10`` ... (``SCALE_CANDIDATES``), each with
the least-squares scale of its rounded codes, keeping the one of least squared error; then the
super-block's 16 scales are rounded to int8 with ``d = max-magnitude scale / -128`` (fp16), each
int8 scale is chosen among its nearest values by the squared error of the codes it gives
(``SCALE_NUDGES``), and the codes are rounded with the final scale ``d * scale``.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K, Q6_K_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K]  # 256 weights, 210 bytes
Q6_K_SUB = 16  # weights per sub-block (one int8 scale each)
Q6_K_SUBS = QK_K // Q6_K_SUB  # 16 sub-blocks
Q6_K_QL, Q6_K_QH, Q6_K_SCALES = QK_K // 2, QK_K // 4, QK_K // 16  # field sizes in bytes
Q6_K_OFFSETS = {"ql": 0, "qh": Q6_K_QL, "scales": Q6_K_QL + Q6_K_QH, "d": Q6_K_QL + Q6_K_QH + Q6_K_SCALES}
Q6_K_BIAS = 32  # stored code = signed code + 32
Q6_K_MIN, Q6_K_MAX = -32, 31  # signed code range
SCALE_INT_MIN, SCALE_INT_MAX = -128, 127
#: the largest-magnitude weight of a sub-block is tried at signed codes -(32 + c) for these c: the
#: least-squares scale of each candidate's rounded codes is kept when it has the least error
SCALE_CANDIDATES = tuple(np.round(np.arange(-12, 7) * 0.1, 1).tolist()) + (-1.5, -2.0, -3.0, -4.0)
#: int8 scales tried around the nearest one (the codes re-rounded with each)
SCALE_NUDGES = (-1, 0, 1)
#: rows encoded at a time (bounds the float32 temporaries to a few x 16 MB)
ROW_BLOCK_VALUES = 1 << 22


def q6_k_constraint(name: str, cols: int) -> str | None:
    """Why a table of ``cols`` columns cannot be Q6_K (None when it can)."""
    if cols % QK_K:
        return (f"{name}: Q6_K blocks are {QK_K} consecutive values of a row, but its rows have {cols} "
                f"(not a multiple of {QK_K}); use --embeddings q8_0 (blocks of 32), as llama.cpp's "
                f"quantizer falls back to for such tables")
    return None


def q6_k_bytes(rows: int, cols: int) -> int:
    return rows * cols // QK_K * Q6_K_BLOCK_BYTES


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """A float table ``[rows, cols]`` (``cols % 256 == 0``) as Q6_K blocks uint8 ``[rows, cols / 256 * 210]``.

    Raises:
        ValueError: ``cols`` is not a multiple of 256, or ``x`` holds NaN or inf.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"Q6_K needs a 2-D table with a multiple of {QK_K} columns, got shape {x.shape}")
    rows, cols = x.shape
    out = np.empty((rows, cols // QK_K * Q6_K_BLOCK_BYTES), dtype=np.uint8)
    step = max(1, ROW_BLOCK_VALUES // max(cols, 1))
    for r0 in range(0, rows, step):
        block = np.asarray(x[r0:r0 + step], dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError("Q6_K cannot encode NaN or inf")
        out[r0:r0 + step] = _encode(block.reshape(-1, QK_K)).reshape(len(block), -1)
    return out


def _encode(x: np.ndarray) -> np.ndarray:
    """``[nb, 256]`` float32 -> ``[nb, 210]`` uint8."""
    nb = x.shape[0]
    sub = x.reshape(nb, Q6_K_SUBS, Q6_K_SUB)
    scales = _sub_block_scales(sub)  # [nb, 16] float32, signed
    d, sc = _super_block(sub, scales)  # fp16 [nb], int8 [nb, 16]
    eff = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # [nb, 16]
    codes = _round_codes(sub, eff)  # int8 [nb, 16, 16] in -32..31
    return pack_q6_k((codes + Q6_K_BIAS).astype(np.uint8).reshape(nb, QK_K), sc, d)


def _round_codes(sub: np.ndarray, eff: np.ndarray) -> np.ndarray:
    """Signed codes ``clip(rint(x / eff), -32, 31)`` (0 where ``eff == 0``)."""
    inv = np.zeros_like(eff)
    np.divide(1.0, eff, out=inv, where=eff != 0)
    return np.clip(np.rint(sub * inv[..., None]), Q6_K_MIN, Q6_K_MAX).astype(np.int8)


def _sub_block_scales(sub: np.ndarray) -> np.ndarray:
    """Per sub-block ``[nb, 16, 16]``, the scale (float32 ``[nb, 16]``) of least squared error
    among :data:`SCALE_CANDIDATES`, each the least-squares scale of its rounded codes."""
    idx = np.abs(sub).argmax(axis=-1)
    vmax = np.take_along_axis(sub, idx[..., None], axis=-1)[..., 0]  # signed, [nb, 16]
    nonzero = vmax != 0
    inv_vmax = np.zeros_like(vmax)
    np.divide(1.0, vmax, out=inv_vmax, where=nonzero)
    best_score = np.full(vmax.shape, -1.0, dtype=np.float32)
    best_scale = np.zeros_like(vmax)
    q = np.empty_like(sub)  # reused across candidates (in-place ufuncs)
    iscale = np.empty_like(vmax)
    for c in SCALE_CANDIDATES:
        np.multiply(inv_vmax, np.float32(-(-Q6_K_MIN + c)), out=iscale)
        np.multiply(sub, iscale[..., None], out=q)
        np.rint(q, out=q)
        np.clip(q, Q6_K_MIN, Q6_K_MAX, out=q)
        sumlx = np.einsum("...i,...i->...", q, sub)  # faster than multiply + sum over 16
        suml2 = np.einsum("...i,...i->...", q, q)
        np.maximum(suml2, np.float32(1e-30), out=suml2)  # all-zero codes: score 0
        score = sumlx * sumlx / suml2  # = |x|^2 - squared error with the least-squares scale
        better = score > best_score
        np.copyto(best_score, score, where=better)
        np.copyto(best_scale, sumlx / suml2, where=better)
    return np.where(nonzero, best_scale, 0.0).astype(np.float32)


def _super_block(sub: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d fp16 [nb], int8 scales [nb, 16])``: ``d`` maps the largest-magnitude scale to -128; each
    int8 scale is the one among its nearest (:data:`SCALE_NUDGES`) whose rounded codes err least."""
    idx = np.abs(scales).argmax(axis=-1)
    smax = np.take_along_axis(scales, idx[:, None], axis=-1)[:, 0]
    d = (smax / SCALE_INT_MIN).astype(np.float16)
    d32 = d.astype(np.float32)
    inv_d = np.zeros_like(d32)
    np.divide(1.0, d32, out=inv_d, where=d32 != 0)
    nearest = np.rint(scales * inv_d[:, None])
    best_err = np.full(scales.shape, np.inf, dtype=np.float32)
    best = np.zeros(scales.shape, dtype=np.int8)
    for nudge in SCALE_NUDGES:
        cand = np.clip(nearest + nudge, SCALE_INT_MIN, SCALE_INT_MAX)
        eff = d32[:, None] * cand
        r = _round_codes(sub, eff).astype(np.float32)
        np.multiply(r, eff[..., None], out=r)
        np.subtract(sub, r, out=r)
        err = np.einsum("...i,...i->...", r, r)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, cand.astype(np.int8), best)
    return d, best


def pack_q6_k(codes: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K blocks from stored codes uint8 ``[nb, 256]`` (0..63), int8 scales ``[nb, 16]`` and fp16
    ``d`` ``[nb]``: uint8 ``[nb, 210]`` (layout in the module docstring)."""
    nb = codes.shape[0]
    if codes.shape != (nb, QK_K) or scales.shape != (nb, Q6_K_SUBS) or d.shape != (nb,):
        raise ValueError(f"codes {codes.shape}, scales {scales.shape}, d {d.shape}: expected "
                         f"[nb, {QK_K}], [nb, {Q6_K_SUBS}], [nb]")
    q = np.asarray(codes, dtype=np.uint8).reshape(nb, 2, 4, 32)  # [block, half, row k, l]
    low, high = q & np.uint8(0x0F), q >> np.uint8(4)
    blocks = np.empty((nb, Q6_K_BLOCK_BYTES), dtype=np.uint8)
    ql = blocks[:, :Q6_K_QL].reshape(nb, 2, 2, 32)  # [block, half, j, l]: rows j (low) and j + 2 (high)
    ql[...] = low[:, :, 0:2] | (low[:, :, 2:4] << np.uint8(4))
    qh = blocks[:, Q6_K_OFFSETS["qh"]:Q6_K_OFFSETS["scales"]].reshape(nb, 2, 32)
    qh[...] = (high[:, :, 0] | (high[:, :, 1] << np.uint8(2)) | (high[:, :, 2] << np.uint8(4))
               | (high[:, :, 3] << np.uint8(6)))
    blocks[:, Q6_K_OFFSETS["scales"]:Q6_K_OFFSETS["d"]] = np.asarray(scales, dtype=np.int8).view(np.uint8)
    blocks[:, Q6_K_OFFSETS["d"]:] = np.asarray(d, dtype="<f2").reshape(nb, 1).view(np.uint8)
    return blocks


def unpack_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_q6_k`: uint8 ``[nb, 210]`` -> (codes ``[nb, 256]``, int8 scales, fp16 d)."""
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, Q6_K_BLOCK_BYTES)
    nb = b.shape[0]
    ql = b[:, :Q6_K_QL].reshape(nb, 2, 2, 32)
    qh = b[:, Q6_K_OFFSETS["qh"]:Q6_K_OFFSETS["scales"]].reshape(nb, 2, 1, 32)
    low = np.concatenate([ql & np.uint8(0x0F), ql >> np.uint8(4)], axis=2)  # rows 0, 1, 2, 3
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    codes = (low | (high << np.uint8(4))).reshape(nb, QK_K)
    scales = b[:, Q6_K_OFFSETS["scales"]:Q6_K_OFFSETS["d"]].copy().view(np.int8)
    d = b[:, Q6_K_OFFSETS["d"]:].copy().view("<f2").reshape(nb)
    return codes, scales, d


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K rows uint8 ``[rows, nb * 210]`` -> float64 ``[rows, nb * 256]``."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    rows = blocks.shape[0]
    codes, scales, d = unpack_q6_k(blocks)
    eff = d.astype(np.float64)[:, None] * scales.astype(np.float64)  # [nb, 16]
    q = codes.astype(np.float64).reshape(-1, Q6_K_SUBS, Q6_K_SUB) - Q6_K_BIAS
    return (q * eff[..., None]).reshape(rows, -1)
