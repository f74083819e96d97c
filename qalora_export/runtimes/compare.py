"""Comparing a runtime's logits with a reference model's (verify's runtime level, docs/design.md §4).

Logits are ``[T, vocab]`` per prompt. KL is ``KL(reference || test)`` per position, in nats,
averaged over positions; top-1 agreement is the share of positions whose argmax agrees.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class LogitComparison:
    max_abs_logit_diff: float
    mean_kl: float
    max_kl: float
    top1_agreement: float
    positions: int

    def to_json(self) -> dict:
        return asdict(self)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(reference: list[np.ndarray], test: list[np.ndarray]) -> LogitComparison:
    """Compare per-prompt logits ``[T, V]`` of a test runtime against a reference."""
    if len(reference) != len(test):
        raise ValueError(f"{len(reference)} reference prompts vs {len(test)} test prompts")
    max_abs, kls, agree, n = 0.0, [], 0, 0
    for ref, tst in zip(reference, test):
        ref = np.asarray(ref, dtype=np.float64)
        tst = np.asarray(tst, dtype=np.float64)
        if ref.shape != tst.shape:
            raise ValueError(f"logit shapes differ: reference {ref.shape}, test {tst.shape}")
        max_abs = max(max_abs, float(np.abs(ref - tst).max()))
        lp, lq = _log_softmax(ref), _log_softmax(tst)
        kls.extend((np.exp(lp) * (lp - lq)).sum(axis=-1).tolist())
        agree += int((ref.argmax(-1) == tst.argmax(-1)).sum())
        n += ref.shape[0]
    kl = np.maximum(np.asarray(kls), 0.0)
    return LogitComparison(max_abs, float(kl.mean()), float(kl.max()), agree / max(n, 1), n)


def greedy_match(reference: list[list[int]], test: list[list[int]]) -> float:
    """Mean share of each reference continuation reproduced before the first divergence."""
    scores = []
    for ref, tst in zip(reference, test):
        same = 0
        for a, b in zip(ref, tst):
            if a != b:
                break
            same += 1
        scores.append(same / max(len(ref), 1))
    return float(np.mean(scores)) if scores else 1.0


def within_floor(value: float, floor: float, factor: float, epsilon: float) -> bool:
    """The gate rule of docs/design.md §4: ``value <= factor * floor + epsilon``."""
    return value <= factor * floor + epsilon
