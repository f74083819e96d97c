"""The split residual as two thin factors (``zero_points="auto"``): ``R = U @ V``.

Around the base's own integer zero-points, a QA-LoRA fold's residual is the adapter's delta itself:
``R[g, n] = scale[g, n] * (zero'[g, n] - zero[g, n]) = -s * k * (B @ A)[n, a(g)]``, of rank at most
``r`` (docs/design.md §2.3). Stored as ``U`` ``[G, k]`` and ``V`` ``[k, N]``, the correction
``pool_sum(x) @ U @ V`` reads ``k * (G + N)`` values per token instead of ``G * N`` (at 7B shapes,
group 32, rank 16: ~0.5 % instead of ~20 % of the layer's int4 bytes). The factors come from an
SVD of ``R`` in float64, and what storing them in the io dtype loses is measured against a bound
the caller gives; a residual that is not low rank, or loses too much, stays a full ``R``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

#: Singular values below this fraction of the largest are zero (float64 noise of an exact rank-r R).
RANK_CUTOFF = 1e-10


def low_rank_factors(r64: np.ndarray, io_dtype, max_abs_error: float) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(U [G, k], V [k, N])`` in ``io_dtype`` with ``max |U @ V - r64| <= max_abs_error``, or None.

    None when ``R`` is zero, when the factors would not be under half of ``R``'s size, or when the
    stored factors miss ``r64`` by more than ``max_abs_error`` (measured in float64).
    """
    g, n = r64.shape
    u, s, vt = np.linalg.svd(r64, full_matrices=False)
    if not s.size or s[0] == 0:
        return None
    k = int((s > s[0] * RANK_CUTOFF).sum())
    if 2 * k * (g + n) > g * n:
        return None
    root = np.sqrt(s[:k])  # balanced factors: neither holds all of the scale
    left = np.ascontiguousarray((u[:, :k] * root).astype(io_dtype))
    right = np.ascontiguousarray((root[:, None] * vt[:k]).astype(io_dtype))
    error = float(np.abs(left.astype(np.float64) @ right.astype(np.float64) - r64).max())
    return (left, right) if error <= max_abs_error else None
