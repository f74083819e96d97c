"""A folded :class:`QuantizedLinear` as MatMulNBits inputs: the packed codes ``B`` (act-order columns
sorted by group), scales, and zero-points as floats, packed uint8 or split (uint8 integer part plus a
per-group residual); what storing them lost is measured, never assumed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from qalora_export.core.record import QuantizedLinear
from qalora_export.errors import ConfigError, FormatLimitError
from qalora_export.formats.onnx import spec as spec

if TYPE_CHECKING:
    from qalora_export.formats.onnx.graph import NBitsLinear


# ------------------------------------------------------------------------------------ encoding

def column_permutation(layer: QuantizedLinear) -> Optional[np.ndarray]:
    """``perm`` int64 ``[in]`` that makes the groups of an act-order layer contiguous, or None.

    Raises :class:`FormatLimitError` when a group does not hold exactly ``group_size`` columns
    (then no permutation gives whole blocks).
    """
    if not layer.is_act_order:
        return None
    g_idx = layer.g_idx.to(torch.int64)
    counts = torch.bincount(g_idx, minlength=layer.num_groups)
    if len(counts) != layer.num_groups or bool((counts != layer.group_size).any()):
        raise FormatLimitError(
            f"{layer.name}: act-order g_idx puts {int(counts.min())}..{int(counts.max())} columns in a group, "
            f"not {layer.group_size} each, so its columns cannot be permuted into whole MatMulNBits blocks; "
            f"re-quantize the base without act-order (desc_act=false)"
        )
    return torch.argsort(g_idx, stable=True).numpy()


def relayable(layer: QuantizedLinear) -> bool:
    """Whether ``B`` of ``layer`` is its GPTQ ``qweight`` re-laid (``spec.b_from_qweight``):
    codes whose width is their container's and that divide a byte, in contiguous groups."""
    return (layer.bits in spec.RELAYABLE_BITS and spec.container_bits(layer.bits) == layer.bits
            and not layer.is_act_order)


def encode_linear(layer: QuantizedLinear, zero_points: str = "float", dtype: str = "fp32",
                  allow_rounding: bool = False, qweight: Optional[np.ndarray] = None,
                  base_zeros: Optional[torch.Tensor] = None) -> tuple["NBitsLinear", dict]:
    """One folded layer as MatMulNBits inputs, and what storing it lost.

    Args:
        qweight: the layer's packed GPTQ ``qweight`` (int32 ``[in * bits / 32, out]``) for a
            :func:`relayable` layer: ``B`` is then re-laid from its words and ``layer.codes`` is not
            read, so a record from ``read_layer(with_codes=False)`` does. Same bytes as packing
            the unpacked codes (the fold never changes codes).
        base_zeros: with "auto", the base's integer zero-points ``[G, out]`` before the fold: a
            fractional fold is then stored as those plus the residual ``U @ V`` of rank <= the
            adapter's (``lowrank.py``) when that holds it within a tenth of the tolerance; else, and
            without them, as "split".

    Returns:
        the :class:`~qalora_export.formats.onnx.graph.NBitsLinear` and ``{"name", "max_abs_error", "rel_error",
        "rounded", "zeros_moved", "residual"}`` where the errors compare the stored weight with the
        record's float64 ``scale * (q - zero)`` and ``residual`` says whether a split residual was needed.
    """
    from qalora_export.formats.onnx.graph import NBitsLinear

    bits = spec.container_bits(layer.bits)
    block_size = spec.block_size_for(layer.group_size)
    reps = layer.group_size // block_size
    perm = column_permutation(layer)
    g_of_block = np.arange(layer.num_groups).repeat(reps)  # group of each block after sorting
    if qweight is not None:
        if not relayable(layer):
            raise ValueError(f"{layer.name}: {layer.bits}-bit{' act-order' if perm is not None else ''} codes "
                             f"cannot be re-laid from qweight; pass the record with its codes")
        b = spec.BFromQweight(qweight, bits, block_size)  # laid out a row block at a time as it is written
    else:
        codes = layer.codes.numpy()
        b = spec.pack_b(codes if perm is None else codes[:, perm], bits, block_size)
    scales64 = layer.scales.to(torch.float64).numpy().T[:, g_of_block]  # [N, k_blocks]
    zeros64 = layer.zeros.to(torch.float64).numpy().T[:, g_of_block]
    io = spec.DTYPES[dtype]
    scales = scales64.astype(io)
    if not np.array_equal(scales.astype(np.float64), scales64):
        raise FormatLimitError(f"{layer.name}: a scale is not representable in {dtype}; export with --dtype fp32")

    residual = residual_v = None
    if zero_points == "float":
        if bits not in spec.FLOAT_ZERO_POINT_BITS:
            raise FormatLimitError(
                f"{layer.name}: {layer.bits}-bit codes use MatMulNBits bits={bits}, whose onnxruntime CPU kernel "
                f"refuses float zero-points; export with --zero-points split (exact for any folded zero-points) "
                f"or --zero-points uint8 (exact when they are integral, e.g. no adapter)"
            )
        stored = zeros64.astype(io)
        stored64 = stored.astype(np.float64)
    elif zero_points in ("split", "auto"):  # auto: split, whose residual is omitted where zeros are integral
        # W = scale * (q - zi) - scale * (zero - zi): the second term is constant per (row, group),
        # so x @ W.T = MatMulNBits(x; zi) - pool_sum(x) @ R with R[g, n] = scale * (zero - zi).
        stored = np.clip(np.round(zeros64), 0, (1 << bits) - 1).astype(np.uint8)
        frac = (zeros64 - stored.astype(np.float64))[:, ::reps]  # [N, G]
        factors = None
        if zero_points == "auto" and base_zeros is not None and np.any(frac != 0):
            base64 = base_zeros.to(torch.float64).numpy().T[:, g_of_block]  # [N, k_blocks]
            factors, base = _low_rank_split(b, bits, scales64, zeros64, base64, reps, io)
        if factors is not None:  # zi = the base's zeros: R is the adapter's delta, U @ V
            stored, (residual, residual_v) = base, factors
            held = (residual.astype(np.float64) @ residual_v.astype(np.float64)).T.repeat(reps, axis=1) / scales64
        elif np.any(frac != 0):
            residual = np.ascontiguousarray((scales64[:, ::reps] * frac).T.astype(io))  # [G, N]
            held = residual.astype(np.float64).T.repeat(reps, axis=1) / scales64  # zero part R holds
        else:
            held = 0.0
        stored64 = stored.astype(np.float64) + held
    elif zero_points == "uint8":
        rounded = np.round(zeros64)
        lo, hi = float(zeros64.min()), float(zeros64.max())
        if rounded.min() < 0 or rounded.max() > (1 << bits) - 1:
            raise FormatLimitError(
                f"{layer.name}: folded zero-points span [{lo:.3f}, {hi:.3f}], outside the {bits}-bit packed "
                f"zero-point range [0, {(1 << bits) - 1}]; export with --zero-points split or float"
            )
        stored = rounded.astype(np.uint8)
        stored64 = rounded
    else:
        raise ConfigError(f"--zero-points {zero_points!r} is not one of {spec.ZERO_POINT_KINDS}")

    # Error of the stored weight: scale * |zero_stored - zero| (codes and scales are exact).
    max_err = float(np.abs(scales64 * (stored64 - zeros64)).max()) if zeros64.size else 0.0
    w_max = max_abs_weight(b, bits, scales64, zeros64) if max_err > 0 else 0.0  # only a ratio of 0 needs none
    rel = max_err / w_max if w_max > 0 else 0.0
    is_rounded = rel > spec.WEIGHT_TOLERANCE
    if is_rounded and not allow_rounding:
        frac = float(np.abs(zeros64 - np.round(zeros64)).max())
        how = ("the folded zero-points are fractional (up to {:.4f} code units from an integer)".format(frac)
               if zero_points == "uint8" else f"{dtype} cannot hold the folded zero-points")
        fix = ("--zero-points split (or float)" if zero_points == "uint8" else "--dtype fp32")
        raise FormatLimitError(
            f"{layer.name}: {how}; storing them as {zero_points} zero-points would change the weight by up to "
            f"{max_err:.3g} ({rel:.2e} of its range, tolerance {spec.WEIGHT_TOLERANCE:g}). Export with {fix} "
            f"to stay exact, or pass --allow-rounding to round them and have the error reported"
        )

    if zero_points in ("uint8", "split", "auto"):
        zp = spec.pack_zero_points(stored, bits)
    else:
        zp = np.ascontiguousarray(stored)
    lin = NBitsLinear(
        k=layer.in_features, n=layer.out_features, bits=bits, block_size=block_size,
        b=b, scales=np.ascontiguousarray(scales), zero_points=zp,
        perm=perm, bias=None if layer.bias is None else layer.bias.numpy().astype(io),
        zero_residual=residual, residual_group=layer.group_size, residual_v=residual_v,
    )
    moved = int((stored64 != zeros64).sum()) if is_rounded else 0
    return lin, {"name": layer.name, "max_abs_error": max_err, "rel_error": rel, "rounded": bool(is_rounded),
                 "zeros_moved": moved, "residual": residual is not None, "low_rank": residual_v is not None}


def _low_rank_split(b, bits: int, scales64: np.ndarray, zeros64: np.ndarray, base64: np.ndarray, reps: int,
                    io) -> tuple[Optional[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """``((U, V) or None, the base's zeros as uint8 [N, k_blocks])``: the residual around the base's
    integer zeros ``R = scale * (zero - base)`` ``[G, N]`` factored (``lowrank.low_rank_factors``),
    within a tenth of the weight tolerance. None when the base zeros are not integers in range."""
    from qalora_export.formats.onnx.lowrank import low_rank_factors

    maxq = (1 << bits) - 1
    if np.any(base64 != np.round(base64)) or base64.min() < 0 or base64.max() > maxq:
        return None, base64
    r64 = np.ascontiguousarray((scales64 * (zeros64 - base64))[:, ::reps].T)  # [G, N]
    bound = 0.1 * spec.WEIGHT_TOLERANCE * max_abs_weight(b, bits, scales64, zeros64)
    return low_rank_factors(r64, io, bound), base64.astype(np.uint8)


#: Blocks whose codes :func:`max_abs_weight` reads before it can stop (the largest bounds first).
MAX_WEIGHT_CANDIDATES = 256


def max_abs_weight(b: np.ndarray, bits: int, scales64: np.ndarray, zeros64: np.ndarray) -> float:
    """``max |scale * (q - zero)|`` over the layer, reading the codes of only a few blocks of ``B``.

    Args:
        b: uint8 ``[N, k_blocks, blob]`` (or a :class:`~qalora_export.formats.onnx.spec.BFromQweight`);
            scales64, zeros64: float64 ``[N, k_blocks]``.

    Equals the maximum over blocks of ``max(|scale * (min_q - zero)|, |scale * (max_q - zero)|)``
    bit for bit. A block's value is at most ``|scale| * max(|0 - zero|, |2**bits - 1 - zero|)``
    (its codes lie in ``0 .. 2**bits - 1`` and rounding is monotonic), so the exact values of the
    :data:`MAX_WEIGHT_CANDIDATES` blocks with the largest bounds settle it whenever the best of
    them reaches the next bound; that is the usual case (RTN and GPTQ groups use code 0 or the
    top code), and otherwise every block is read. This replaces a min/max pass over every code.
    """
    if not zeros64.size:
        return 0.0
    n_rows, k_blocks, _ = b.shape
    bound = (np.abs(scales64) * np.maximum(np.abs(0.0 - zeros64), np.abs(float((1 << bits) - 1) - zeros64))).ravel()
    split = bound.size - min(MAX_WEIGHT_CANDIDATES, bound.size)  # blocks [split:] of the partition are read
    if split:
        order = np.argpartition(bound, split - 1)
        top, rest = order[split:], bound[order[split - 1]]  # rest: the largest bound not read
    else:
        top, rest = np.arange(bound.size), -np.inf
    rows, blocks = np.divmod(top, k_blocks)
    picked = b.take(rows, blocks) if isinstance(b, spec.BFromQweight) else b[rows, blocks]
    best = _blocks_max_abs(picked, bits, scales64[rows, blocks], zeros64[rows, blocks])
    if best >= rest:
        return best
    return _blocks_max_abs(np.asarray(b), bits, scales64, zeros64)


def _blocks_max_abs(b: np.ndarray, bits: int, scales64: np.ndarray, zeros64: np.ndarray) -> float:
    """``max |scale * (q - zero)|`` over blocks ``b`` ``[..., blob]`` with scales, zeros ``[...]``."""
    lo, hi = spec.block_code_range(b, bits)
    return float(np.maximum(np.abs(scales64 * (lo - zeros64)), np.abs(scales64 * (hi - zeros64))).max())
