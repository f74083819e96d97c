"""The runtime level for ONNX: onnxruntime (full recomputation and KV-cache decoding) and
onnxruntime-genai against the unmerged PyTorch model, near-ties allowed as ``spec`` states.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qalora_export.errors import ConfigError
from qalora_export.formats.onnx import spec as spec
from qalora_export.formats.onnx.head import requantized_head
from qalora_export.formats.onnx.read import merge_metadata

# ------------------------------------------------------------------------------------ verify

def _greedy_check(ref_tokens: list[int], margins: list[float], got: list[int], tie_limit: float) -> dict:
    """Compare a greedy continuation with the reference's: identical, or diverging at a near-tie."""
    first = next((i for i, (a, b) in enumerate(zip(ref_tokens, got)) if a != b), None)
    if first is None and len(ref_tokens) != len(got):
        first = min(len(ref_tokens), len(got))
    if first is None:
        return {"match": True, "near_tie": False, "tokens": got}
    near_tie = first < len(margins) and margins[first] <= tie_limit
    return {"match": False, "near_tie": bool(near_tie), "diverges_at": first,
            "reference_margin": margins[first] if first < len(margins) else None, "tokens": got}


def _strip_eos(tokens: list[int], eos: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def _retie(check: dict, tie_limit: float) -> dict:
    """Re-judge a greedy check once the near-tie limit is known (margins kept in the check)."""
    margins = check.pop("reference_margins", None)
    if check.get("match") is False and margins is not None:
        at = check["diverges_at"]
        check["near_tie"] = bool(at < len(margins) and margins[at] <= tie_limit)
    return check


def verify_runtime(model, artifact: Path, prompts: list[list[int]], workdir: Path,
                   max_new_tokens: int = 8, device: str = "cpu") -> dict:
    """Run the artifact in onnxruntime (accuracy level 0) and onnxruntime-genai against the
    unmerged PyTorch model ``build_model(model.base, model.adapter)``.

    Measures, over ``prompts``: max |Δlogit| (absolute and relative to max |logit|), mean and max
    KL(torch || onnx), top-1 agreement, KV-cache decoding vs full recomputation, and greedy
    continuations (onnxruntime loop with KV cache, and onnxruntime-genai) vs the PyTorch greedy
    continuation. An artifact exported at another accuracy level runs through a level-0 view
    in ``workdir`` (same weights), and is also run as stored, judged against onnxruntime's own floor at
    that level (:func:`_judge_as_stored`). ``passed`` applies the tolerances of ``spec``: a top-1 or
    greedy disagreement passes only at a near-tie (reference top-2 margin within
    ``NEAR_TIE_FACTOR`` times the measured max |Δlogit|). ``device`` is part of the protocol;
    onnxruntime runs here on its CPU provider, whatever it says.
    """
    from qalora_export.formats.onnx import runtime as onnxrt
    from qalora_export.modeling.model import build_model
    from qalora_export.training.evaluate import cached_base_weights

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("verify needs at least one non-empty prompt")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    view = onnxrt.at_accuracy_level(Path(artifact), 0, workdir / "onnx_level0")
    ref = build_model(model.base, model.adapter)
    # a requantized lm head (--lm-head, head.py): the reference computes with the head the artifact
    # declares, recomputed from the base, and the head's own cost is judged against a floor below
    head = requantized_head(merge_metadata(Path(artifact)))
    float_head = _use_declared_head(ref, model, head) if head else None
    eos = onnxrt.eos_ids(view)
    pad = onnxrt.pad_id(view)
    decoder = onnxrt.OrtDecoder(view)
    ref_all, ort_all, kv_all, greedy = [], [], [], []
    # The reference's frozen base is dequantized once for the whole run, not once per greedy step.
    with cached_base_weights(ref):
        _run_prompts(prompts, ref, decoder, view, eos, pad, max_new_tokens, ref_all, ort_all, kv_all, greedy)
        float_all = _float_head_logits(ref, float_head, prompts) if head else None
    result = _judge(prompts, ref_all, ort_all, kv_all, greedy)
    if head:
        _judge_head(result, head, float_all, ref_all, ort_all)
    stored_levels = onnxrt.accuracy_levels(Path(artifact)) - {0}
    if stored_levels:
        _judge_as_stored(result, model, Path(artifact), max(stored_levels), head, prompts, ref_all, workdir)
    return result


def _judge_as_stored(result: dict, model, artifact: Path, level: int, head: dict | None,
                     prompts: list[list[int]], ref_all: list[np.ndarray], workdir: Path) -> None:
    """Run an artifact exported at ``accuracy_level`` ``level`` (int8 activations) as stored, and judge it
    against onnxruntime's own floor at that level (spec ``STORED_LEVEL_*``, docs/design.md §4): the base
    exported the same way (zero-points, dtype, head, level) with no adapter, vs the PyTorch base.

    ``ref_all``: the unmerged model's logits ``[T, V]`` per prompt (with the declared head, if any).
    Adds ``result["as_stored"]`` and the check ``as_stored_floor``; level 0 is judged as before.
    """
    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats.onnx import runtime as onnxrt
    from qalora_export.formats.onnx.write import export
    from qalora_export.modeling.model import build_model
    from qalora_export.runtimes.compare import compare_logits
    from qalora_export.training.evaluate import cached_base_weights

    record = merge_metadata(artifact) or {}
    floor_dir = workdir / f"floor-base-level{level}"
    export(MergedView(model.base, None), floor_dir, accuracy_level=level, dtype=record.get("dtype", "fp32"),
           zero_points="auto", lm_head=(head or {}).get("kind", "float"), overwrite=True)
    stored, floor = onnxrt.full_logits(artifact, prompts), onnxrt.full_logits(floor_dir, prompts)
    base_ref = build_model(model.base, None)
    if head:
        _use_declared_head(base_ref, model, head)
    with cached_base_weights(base_ref), torch.no_grad():
        base_all = [base_ref(torch.tensor([p])).logits[0].to(torch.float64).numpy() for p in prompts]
    artifact_cmp = compare_logits(ref_all, stored).to_json()
    floor_cmp = compare_logits(base_all, floor).to_json()
    factor, epsilon = spec.STORED_LEVEL_KL_FLOOR_FACTOR, spec.STORED_LEVEL_KL_EPSILON
    _gate_on_floor(result, "as_stored", "as_stored_floor", artifact_cmp["mean_kl"], floor_cmp["mean_kl"], factor,
                   epsilon, {
                       "accuracy_level": level, "artifact": artifact_cmp, "floor": floor_cmp,
                       "rule": (f"at accuracy level {level} (int8 activations, as stored): artifact mean KL vs the "
                                f"unmerged model <= {factor:g} x floor mean KL + {epsilon:g} (floor: the base exported "
                                f"the same way with no adapter, in onnxruntime vs the PyTorch base); every other "
                                f"check runs at level 0"),
                   })


def _gate_on_floor(result: dict, key: str, check: str, measured_kl: float, floor_kl: float, factor: float,
                   epsilon: float, entry: dict) -> None:
    """Store ``entry`` (with the allowed mean KL) as ``result[key]`` and add the check ``check``:
    ``measured_kl <= factor * floor_kl + epsilon`` (a cost judged against onnxruntime's or PyTorch's
    own floor measured in the same run, docs/design.md §4)."""
    from qalora_export.runtimes.compare import within_floor

    result[key] = {**entry, "allowed_mean_kl": factor * floor_kl + epsilon}
    result["checks"][check] = bool(within_floor(measured_kl, floor_kl, factor, epsilon))
    result["passed"] = all(result["checks"].values())


def _use_declared_head(ref, model, head: dict):
    """Give the reference ``ref`` the head the artifact declares; returns its float head weight."""
    from qalora_export.formats.onnx.head import declared_head

    float_weight = ref.lm_head.weight.detach()
    declared = torch.from_numpy(declared_head(model, head)).to(float_weight.dtype)
    if declared.shape != float_weight.shape:
        raise ConfigError(f"the artifact's requantized lm head is {tuple(declared.shape)}, the base's "
                          f"{tuple(float_weight.shape)}: the artifact belongs to another base")
    ref.lm_head.weight = torch.nn.Parameter(declared, requires_grad=False)  # a tied embedding keeps its table
    return float_weight


def _float_head_logits(ref, float_weight: torch.Tensor, prompts: list[list[int]]) -> list[np.ndarray]:
    """The reference's logits with the base's float head (what a requantized head is measured against)."""
    declared = ref.lm_head.weight
    ref.lm_head.weight = torch.nn.Parameter(float_weight, requires_grad=False)
    try:
        with torch.no_grad():
            return [ref(torch.tensor([p])).logits[0].to(torch.float64).numpy() for p in prompts]
    finally:
        ref.lm_head.weight = declared


def _judge_head(result: dict, head: dict, float_all, declared_all, ort_all) -> None:
    """Add the requantized head's cost to ``result``: the artifact (onnxruntime) and the floor (PyTorch
    with the declared head) against PyTorch with the float head; gated by ``head.py``'s floor rule."""
    from qalora_export.formats.onnx.head import HEAD_KL_EPSILON, HEAD_KL_FLOOR_FACTOR
    from qalora_export.runtimes.compare import compare_logits

    artifact = compare_logits(float_all, ort_all).to_json()
    floor = compare_logits(float_all, declared_all).to_json()
    _gate_on_floor(result, "lm_head", "lm_head_floor", artifact["mean_kl"], floor["mean_kl"], HEAD_KL_FLOOR_FACTOR,
                   HEAD_KL_EPSILON, {
                       **head, "exact": False, "vs_float_head": artifact, "floor": floor,
                       "rule": (f"vs the float head: artifact mean KL <= {HEAD_KL_FLOOR_FACTOR:g} x floor mean KL + "
                                f"{HEAD_KL_EPSILON:g} (floor: the unmerged model in PyTorch with the declared head); "
                                f"every other check compares with the declared head"),
                   })


def _run_prompts(prompts, ref, decoder, view, eos, pad, max_new_tokens, ref_all, ort_all, kv_all, greedy) -> None:
    """Collect reference and onnxruntime logits, KV-cache logits and greedy continuations per prompt."""
    from qalora_export.formats.onnx import runtime as onnxrt

    try:
        for prompt in prompts:
            with torch.no_grad():
                ref_all.append(ref(torch.tensor([prompt])).logits[0].to(torch.float64).numpy())
            ort_all.append(decoder.logits(prompt).astype(np.float64))
            kv_all.append(decoder.incremental_logits(prompt, prefill=max(1, len(prompt) // 2)).astype(np.float64))
            ref_tokens, margins = onnxrt.torch_greedy(ref, prompt, max_new_tokens, eos)
            ort_tokens = decoder.greedy(prompt, max_new_tokens, eos)
            # onnxruntime-genai masks every prompt token equal to pad_token_id out of the attention
            # (often pad == eos, e.g. <|im_end|> inside a chat prompt), which computes something
            # else; it is checked, against PyTorch, on the prompt without its pad tokens instead.
            genai_prompt = [t for t in prompt if t != pad] if pad in prompt else prompt
            if not genai_prompt:
                genai = {"skipped": f"prompt is all pad_token_id {pad}"}
            else:
                g_ref, g_margins = ((ref_tokens, margins) if genai_prompt is prompt else
                                    onnxrt.torch_greedy(ref, genai_prompt, max_new_tokens, eos))
                # genai ends a sequence at eos without returning the eos token: compare without it
                g_out = _strip_eos(onnxrt.genai_greedy(view, genai_prompt, max_new_tokens), eos)
                genai = _greedy_check(_strip_eos(g_ref, eos), g_margins, g_out, 0.0)
                genai["prompt_tokens"] = len(genai_prompt)
                genai["reference_margins"] = g_margins
            greedy.append((ref_tokens, margins, ort_tokens, genai))
    finally:
        decoder.close()


def _judge(prompts, ref_all, ort_all, kv_all, greedy) -> dict:
    """Apply ``spec``'s tolerances to what :func:`_run_prompts` collected."""
    from qalora_export.formats.onnx import runtime as onnxrt
    from qalora_export.runtimes.compare import compare_logits

    logits = compare_logits(ref_all, ort_all)
    kv = compare_logits(ort_all, kv_all)
    logit_scale = max(float(np.abs(r).max()) for r in ref_all) or 1.0
    tie_limit = spec.NEAR_TIE_FACTOR * logits.max_abs_logit_diff
    # top-1 disagreements only at positions whose reference top-2 margin is a near-tie
    top1_bad = 0
    for r, o in zip(ref_all, ort_all):
        top2 = np.sort(r, axis=-1)[:, -2:]
        bad = (r.argmax(-1) != o.argmax(-1)) & ((top2[:, 1] - top2[:, 0]) > tie_limit)
        top1_bad += int(bad.sum())
    ort_greedy = [_greedy_check(t, m, o, tie_limit) for t, m, o, _ in greedy]
    genai_greedy = [_retie(g, tie_limit) for _, _, _, g in greedy]
    checks = {
        "max_dlogit_rel": logits.max_abs_logit_diff / logit_scale <= spec.RUNTIME_MAX_DLOGIT_REL,
        "mean_kl": logits.mean_kl <= spec.RUNTIME_MAX_KL,
        "top1": top1_bad == 0,
        "kv_cache": kv.max_abs_logit_diff / logit_scale <= spec.RUNTIME_KV_MAX_DLOGIT_REL,
        "greedy_onnxruntime": all(g["match"] or g["near_tie"] for g in ort_greedy),
        "greedy_genai": all(g.get("match") or g.get("near_tie") for g in genai_greedy if "skipped" not in g),
    }
    return {
        "runtime": "onnxruntime " + _version("onnxruntime") + ", onnxruntime-genai " + _version("onnxruntime_genai"),
        "providers": list(onnxrt.default_providers()),
        "accuracy_level": 0,
        "prompts": len(prompts),
        "logits": {**logits.to_json(), "max_abs_logit_diff_rel": logits.max_abs_logit_diff / logit_scale},
        "kv_cache_vs_full": {"max_abs_logit_diff": kv.max_abs_logit_diff,
                             "max_abs_logit_diff_rel": kv.max_abs_logit_diff / logit_scale},
        "top1_disagreements_not_near_tie": top1_bad,
        "greedy": {
            "reference": [t for t, _, _, _ in greedy],
            "onnxruntime": ort_greedy,
            "onnxruntime_genai": genai_greedy,
            "exact_match_onnxruntime": sum(g["match"] for g in ort_greedy),
            "exact_match_genai": sum(bool(g.get("match")) for g in genai_greedy),
            "genai_skipped": sum("skipped" in g for g in genai_greedy),
        },
        "tolerances": {"max_dlogit_rel": spec.RUNTIME_MAX_DLOGIT_REL, "mean_kl": spec.RUNTIME_MAX_KL,
                       "kv_max_dlogit_rel": spec.RUNTIME_KV_MAX_DLOGIT_REL, "near_tie_factor": spec.NEAR_TIE_FACTOR},
        "checks": checks,
        "passed": all(checks.values()),
    }


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a version string is informational only
        return "?"
