"""``runtimes.reference``: a runtime's logits against stored top-k rows, on random logits of odd shapes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_export.runtimes.compare import compare_logits
from qalora_export.runtimes.reference import judge, measure, top_k_rows


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 7), v=st.integers(2, 300), k=st.integers(2, 80), seed=st.integers(0, 2**31 - 1),
       noise=st.floats(0.0, 0.5))
def test_measure_against_the_full_comparison(t, v, k, seed, noise):
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 3, (t, v)).astype(np.float32)
    test = (ref + rng.normal(0, noise, (t, v))).astype(np.float32)
    rows = top_k_rows(ref, k)
    assert rows["values"].shape == (t, min(k, v)) and np.all(np.diff(rows["values"], axis=-1) <= 0)
    same = measure([rows], [[1, 2]], [[1.0, 1.0]], [ref], [[1, 2]], 2.0)
    assert same["max_abs_logit_diff"] == 0 and same["mean_kl"] < 1e-9 and same["top1_agreement"] == 1.0
    figures = measure([rows], [[1, 2]], [[1.0, 1.0]], [test], [[1, 3]], 2.0)
    full = compare_logits([ref], [test])
    # grouping the tail never increases KL; the top-k max |dlogit| never exceeds the full row's
    assert figures["mean_kl"] <= full.mean_kl + 1e-9 and figures["max_abs_logit_diff"] <= full.max_abs_logit_diff + 1e-6
    if k >= v:
        assert abs(figures["mean_kl"] - full.mean_kl) < 1e-6


def test_judge_fails_a_missing_limit_and_a_value_past_it():
    checks = judge({"mean_kl": 0.5, "top1_agreement": 0.9},
                   {"mean_kl": {"max": 0.1}, "top1_agreement": {"min": 0.8}, "max_abs_logit_diff": {"max": None}})
    assert [c["passed"] for c in checks] == [False, True, False]
    assert checks[0]["value"] == 0.5 and checks[0]["limit"] == 0.1
