"""Packing the projections that read one input into one MatMulNBits node (``zero_points="auto"``).

q/k/v read the same normed hidden state, and so do gate/up. Packed, q/k/v are one ``qkv_proj`` node
whose output feeds GroupQueryAttention's packed-QKV input (``key``, ``value`` left empty), and
gate/up one ``gate_up_proj`` node followed by a ``Split``, as onnxruntime-genai's own builder lays
out its CPU models. One node instead of three (two) saves per-node overhead, which dominates a
small model's decoding on CPU, and one split-residual correction ``pool_sum(x) @ R`` serves them
all. Packing stacks rows (``N``): each output column of MatMulNBits is computed from its own row of
``B``, scales and zero-points, so the packed node computes what the separate nodes compute.

The rows of each module are recorded in ``metadata_props`` (:data:`PACKED_NODES_KEY`:
``{node name: [[module, rows], ...]}``, in row order); ``read.py`` reads every module back from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

#: ``metadata_props`` key of the packed nodes' members (JSON).
PACKED_NODES_KEY = "qalora_export.packed_nodes"
#: (members, packed node's last name part) under ``self_attn`` and ``mlp``.
QKV = (("q_proj", "k_proj", "v_proj"), "qkv_proj")
GATE_UP = (("gate_proj", "up_proj"), "gate_up_proj")


class StackedB:
    """MatMulNBits ``B`` uint8 ``[sum N_i, k_blocks, blob]`` of several nodes stacked along ``N``,
    handed to the writer a row block at a time (each part may itself be a lazy ``BFromQweight``).

    Attributes:
        shape: ``(N, k_blocks, blob)``; dtype: uint8; nbytes.
    """

    dtype = np.dtype(np.uint8)

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.shape = (sum(p.shape[0] for p in self.parts), *self.parts[0].shape[1:])
        self.nbytes = int(np.prod(self.shape))

    def row_blocks(self) -> Iterator[np.ndarray]:
        """``B``'s rows, each part's row blocks in turn; concatenated they are ``np.asarray(self)``."""
        for part in self.parts:
            if hasattr(part, "row_blocks"):
                yield from part.row_blocks()
            else:
                yield np.asarray(part)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        b = np.concatenate([np.asarray(p) for p in self.parts])
        return b if dtype is None else b.astype(dtype)


def packable(lins: Sequence) -> bool:
    """Whether ``lins`` (``NBitsLinear`` / ``FloatLinear`` of one input) can be one node: all
    MatMulNBits with the same ``K``, bits, block size, zero-point dtype, input permutation and
    residual pooling. A base that quantized them differently keeps separate nodes."""
    first = lins[0]
    if not all(hasattr(lin, "bits") for lin in lins):  # a float projection is never packed
        return False
    same = all((lin.k, lin.bits, lin.block_size, lin.zero_points.dtype, lin.scales.dtype)
               == (first.k, first.bits, first.block_size, first.zero_points.dtype, first.scales.dtype) for lin in lins)
    perms = [lin.perm for lin in lins]
    same_perm = all(p is None for p in perms) or (
        all(p is not None for p in perms) and all(np.array_equal(p, perms[0]) for p in perms))
    groups = {lin.residual_group for lin in lins if lin.zero_residual is not None}
    kinds = {lin.residual_v is None for lin in lins if lin.zero_residual is not None}  # full R or U @ V
    return same and same_perm and len(groups) <= 1 and len(kinds) <= 1


def pack_linears(lins: Sequence):
    """One ``NBitsLinear`` whose rows are those of ``lins`` in order (:func:`packable` ones).

    Rows of a member without a bias get a zero bias, and without a split residual a zero
    residual: adding or subtracting 0.0 changes no value, so every member stays exact.
    """
    sizes = [lin.n for lin in lins]
    bias = None
    if any(lin.bias is not None for lin in lins):
        dtype = next(lin.bias.dtype for lin in lins if lin.bias is not None)
        bias = np.concatenate([lin.bias if lin.bias is not None else np.zeros(lin.n, dtype) for lin in lins])
    residual, group, residual_v = None, 0, None
    with_residual = [lin for lin in lins if lin.zero_residual is not None]
    if with_residual and with_residual[0].residual_v is not None:
        residual, residual_v = _stack_factors(lins)
        group = with_residual[0].residual_group
    elif with_residual:
        rows, dtype = with_residual[0].zero_residual.shape[0], with_residual[0].zero_residual.dtype
        group = with_residual[0].residual_group
        residual = np.ascontiguousarray(np.concatenate(
            [lin.zero_residual if lin.zero_residual is not None else np.zeros((rows, lin.n), dtype) for lin in lins],
            axis=1))  # [G, sum N_i]
    return dataclasses.replace(
        lins[0], n=sum(sizes), b=StackedB([lin.b for lin in lins]),
        scales=np.concatenate([lin.scales for lin in lins]),
        zero_points=np.concatenate([lin.zero_points for lin in lins]),
        bias=bias, zero_residual=residual, residual_group=group, residual_v=residual_v)


def _stack_factors(lins: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Low-rank residuals of the members as one: ``U`` side by side ``[G, sum k_i]`` and ``V``
    block-diagonal ``[sum k_i, sum N_i]`` (zeros elsewhere, and no block for a member without one),
    so that ``U @ V`` is each member's ``U_i @ V_i`` in its own columns."""
    us = [lin.zero_residual for lin in lins if lin.zero_residual is not None]
    v = np.zeros((sum(u.shape[1] for u in us), sum(lin.n for lin in lins)), dtype=us[0].dtype)
    row = col = 0
    for lin in lins:
        if lin.residual_v is not None:
            k = lin.residual_v.shape[0]
            v[row:row + k, col:col + lin.n] = lin.residual_v
            row += k
        col += lin.n
    return np.ascontiguousarray(np.concatenate(us, axis=1)), v
