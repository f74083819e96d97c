"""A stored reference (the unmerged model's top-k logits and greedy tokens) and a runtime's outputs
compared against it: what ``verify ARTIFACT`` does without the base and the adapter (docs/design.md §11).

The reference keeps, per prompt position, the ``k`` largest logits (values and vocabulary indices),
the log-sum-exp of the whole row and the largest ``|logit|``; per prompt, ``n_new`` greedy tokens and
the reference's top-1 minus top-2 margin at each step. Pure numpy: this path imports no model code.

Measured against a runtime's full logits ``[T, V]``:

- ``max_abs_logit_diff`` over the reference's top-k entries (a lower bound of the full-row maximum);
  ``max_abs_logit_diff_rel`` divides it by the largest ``|logit|`` of the reference;
- ``mean_kl``: ``KL(reference || runtime)`` with the vocabulary grouped into the top-k tokens and one
  tail bucket. Grouping never increases KL (log-sum inequality), so this is a lower bound of the full
  KL, tight when the tail holds little probability;
- ``top1_agreement``; ``top1_not_near_tie``: positions whose argmax differs although the reference's
  top-2 margin exceeds the near-tie limit (``near_tie_factor`` x max |dlogit|);
- ``greedy_not_near_tie``: prompts whose greedy continuation diverges from the reference's at a step
  that is not a near-tie (a runtime that stops early at an end-of-sequence token is compared on what
  it generated).

Each check is ``{"name", "value", "limit", "op", "passed"}``: limits are ``{"max": x}`` or ``{"min": x}``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

TOP_K = 64


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """``log(sum(exp(x)))`` over the last axis, float64, ``[T, V] -> [T]``."""
    x = x.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def top_k_rows(logits: np.ndarray, k: int = TOP_K) -> dict[str, np.ndarray]:
    """The reference entries of one prompt's logits ``[T, V]``: ``values`` float32 ``[T, k]`` and
    ``indices`` int64 ``[T, k]`` (descending), ``lse`` float64 ``[T]``, ``max_abs`` float64 ``[T]``."""
    logits = np.asarray(logits, dtype=np.float32)
    k = min(k, logits.shape[-1])
    part = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=-1), axis=-1, kind="stable")
    indices = np.take_along_axis(part, order, axis=-1).astype(np.int64)
    return {"values": np.take_along_axis(logits, indices, axis=-1), "indices": indices,
            "lse": _logsumexp(logits), "max_abs": np.abs(logits).max(axis=-1).astype(np.float64)}


def _grouped_kl(values: np.ndarray, indices: np.ndarray, lse: np.ndarray, test: np.ndarray) -> np.ndarray:
    """KL(reference || test) per position ``[T]`` with the vocabulary grouped as top-k + one tail bucket."""
    log_p = values.astype(np.float64) - lse[:, None]  # [T, k]
    log_q_all = test.astype(np.float64) - _logsumexp(test)[:, None]  # [T, V]
    log_q = np.take_along_axis(log_q_all, indices, axis=-1)
    p, q = np.exp(log_p), np.exp(log_q)
    kl = (p * (log_p - log_q)).sum(axis=-1)
    p_tail = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - q.sum(axis=-1), 1e-300, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 0, p_tail * (np.log(np.maximum(p_tail, 1e-300)) - np.log(q_tail)), 0.0)
    return np.maximum(kl + tail, 0.0)


def _greedy_ok(ref: list[int], margins: list[float], got: list[int], tie_limit: float) -> dict:
    """One continuation against the reference's: identical on what was generated, or diverging at a near-tie."""
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    if first is None:
        return {"match": True, "near_tie": False, "generated": len(got)}
    margin = margins[first] if first < len(margins) else math.inf
    return {"match": False, "diverges_at": first, "reference_margin": margin, "near_tie": bool(margin <= tie_limit)}


def measure(reference: list[dict], greedy_reference: list[list[int]], greedy_margins: list[list[float]],
            logits: list[np.ndarray], greedy: list[list[int]], near_tie_factor: float) -> dict:
    """The figures of a runtime's outputs against the stored reference (see the module docstring).

    Args:
        reference: per prompt, :func:`top_k_rows` of the reference logits.
        greedy_reference, greedy_margins: per prompt, the reference's greedy tokens and top-2 margins.
        logits: per prompt, the runtime's logits ``[T, V]``.
        greedy: per prompt, the runtime's greedy continuation.

    Raises:
        ValueError: prompt counts or shapes differ (the reference belongs to another model or prompts).
    """
    if len(reference) != len(logits) or len(greedy) != len(greedy_reference):
        raise ValueError(f"{len(reference)} reference prompts, runtime returned {len(logits)} logits and "
                         f"{len(greedy)} continuations")
    max_abs, max_ref, kls, agree, positions, tops = 0.0, 0.0, [], 0, 0, []
    for ref, test in zip(reference, logits):
        test = np.asarray(test, dtype=np.float64)
        if test.ndim != 2 or test.shape[0] != ref["values"].shape[0] or test.shape[1] <= int(ref["indices"].max()):
            raise ValueError(f"runtime logits of shape {test.shape} do not fit a reference of "
                             f"{ref['values'].shape[0]} positions over token ids up to {int(ref['indices'].max())}")
        picked = np.take_along_axis(test, ref["indices"], axis=-1)
        max_abs = max(max_abs, float(np.abs(picked - ref["values"]).max()))
        max_ref = max(max_ref, float(ref["max_abs"].max()))
        kls.extend(_grouped_kl(ref["values"], ref["indices"], ref["lse"], test).tolist())
        argmax = test.argmax(axis=-1)
        agree += int((argmax == ref["indices"][:, 0]).sum())
        positions += test.shape[0]
        tops.append((argmax, ref))
    tie_limit = near_tie_factor * max_abs
    top1_bad = 0
    for argmax, ref in tops:
        margin = ref["values"][:, 0].astype(np.float64) - ref["values"][:, 1]
        top1_bad += int(((argmax != ref["indices"][:, 0]) & (margin > tie_limit)).sum())
    continuations = [_greedy_ok(r, m, g, tie_limit) for r, m, g in zip(greedy_reference, greedy_margins, greedy)]
    return {
        "max_abs_logit_diff": max_abs,
        "max_abs_logit_diff_rel": max_abs / (max_ref or 1.0),
        "mean_kl": float(np.mean(kls)) if kls else 0.0,
        "max_kl": float(np.max(kls)) if kls else 0.0,
        "top1_agreement": agree / max(positions, 1),
        "top1_not_near_tie": top1_bad,
        "greedy_exact": sum(c["match"] for c in continuations),
        "greedy_not_near_tie": sum(not (c["match"] or c["near_tie"]) for c in continuations),
        "greedy": continuations,
        "positions": positions,
        "near_tie_limit": tie_limit,
    }


def judge(figures: dict, limits: dict[str, dict]) -> list[dict]:
    """One check per limit: ``limits[name]`` is ``{"max": x}`` or ``{"min": x}`` on ``figures[name]``;
    a limit of None (not measurable without what the export recorded) fails, saying so."""
    checks = []
    for name, limit in limits.items():
        value: Optional[float] = figures.get(name)
        op = "max" if "max" in limit else "min"
        bound = limit.get(op)
        if bound is None or value is None:
            checks.append({"name": name, "value": value, "limit": bound, "op": op, "passed": False,
                           "reason": limit.get("reason", "no limit recorded in the bundle")})
            continue
        ok = value <= bound if op == "max" else value >= bound
        checks.append({"name": name, "value": float(value), "limit": float(bound), "op": op, "passed": bool(ok)})
    return checks
