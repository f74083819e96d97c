"""The runtime level for GPTQ: the artifact in transformers + GPTQModel (in a child process) against
the unmerged PyTorch model, gated by a floor measured in the same run (docs/design.md §4).
"""

from __future__ import annotations

from pathlib import Path

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.formats.gptq.read import merge_metadata
from qalora_export.formats.gptq.spec import FLOOR_EPS_KL, FLOOR_EPS_LOGIT, FLOOR_FACTOR, GREEDY_TOKENS, MIN_TOP1


def verify_runtime(model: MergedView, artifact: Path, prompts: list[list[int]], workdir: Path,
                   device: str = "cpu") -> dict:
    """Load ``artifact`` in transformers + GPTQModel and compare it with the unmerged model.

    Three comparisons, all on the same prompts:

    - ``floor``: the base checkpoint in GPTQModel vs the base in our PyTorch model;
    - ``artifact_vs_declared``: the artifact in GPTQModel vs our PyTorch model of the weights the
      merge declared (the exact fold, or its announced rounding) — gated against the floor;
    - ``artifact_vs_unmerged``: vs the unmerged model (base + adapter) — gated against the floor
      too, whether the merge was exact or rounded: a rounded artifact passes only if rounding did
      not move it measurably away from the trained model.
    """
    from qalora_export.formats.gptq.runtime import load_gptq_model, model_greedy, model_logits
    from qalora_export.modeling.model import build_model
    from qalora_export.runtimes.compare import compare_logits, greedy_match, within_floor
    from qalora_export.training.evaluate import cached_base_weights

    meta = merge_metadata(artifact)
    exact = bool(meta.get("exact", True))

    unmerged = build_model(model.base, model.adapter)
    with cached_base_weights(unmerged):  # dequantize once, not once per generated token
        ref_logits = model_logits(unmerged, prompts)
        ref_greedy = model_greedy(unmerged, prompts, GREEDY_TOKENS)
    del unmerged
    if model.adapter is not None:
        plain = build_model(model.base, None)
        with cached_base_weights(plain):
            base_logits = model_logits(plain, prompts)
        del plain
    else:
        base_logits = ref_logits

    runtime_base = load_gptq_model(model.base.directory, device)
    floor = compare_logits(base_logits, model_logits(runtime_base, prompts))
    del runtime_base

    runtime = load_gptq_model(artifact, device)
    art_logits = model_logits(runtime, prompts)
    art_greedy = model_greedy(runtime, prompts, GREEDY_TOKENS)
    del runtime

    if exact:
        declared_logits = ref_logits
    else:
        declared = build_model(artifact, None)
        with cached_base_weights(declared):
            declared_logits = model_logits(declared, prompts)
        del declared
    vs_declared = compare_logits(declared_logits, art_logits)
    vs_unmerged = compare_logits(ref_logits, art_logits)

    def gate(cmp) -> bool:
        return (within_floor(cmp.max_abs_logit_diff, floor.max_abs_logit_diff, FLOOR_FACTOR, FLOOR_EPS_LOGIT)
                and within_floor(cmp.mean_kl, floor.mean_kl, FLOOR_FACTOR, FLOOR_EPS_KL)
                and cmp.top1_agreement >= MIN_TOP1 * floor.top1_agreement)

    declared_ok = gate(vs_declared)
    # The artifact must be the trained model: a rounded merge is judged against the unmerged model
    # like an exact one (its rounding is declared and reported, but a tolerance failure is a failure).
    unmerged_ok = gate(vs_unmerged)
    return {
        "runtime": f"transformers + GPTQModel ({'gptq_torch, float32' if device == 'cpu' else device})",
        "exact_merge": exact,
        "floor": floor.to_json(),
        "artifact_vs_declared": {**vs_declared.to_json(), "passed": declared_ok},
        "artifact_vs_unmerged": {**vs_unmerged.to_json(), "passed": unmerged_ok,
                                 "greedy_match": greedy_match(ref_greedy, art_greedy)},
        "rule": f"max|dlogit| <= {FLOOR_FACTOR} x floor + {FLOOR_EPS_LOGIT}, KL <= {FLOOR_FACTOR} x floor + "
                f"{FLOOR_EPS_KL}, top-1 >= {MIN_TOP1} x floor's",
        "passed": bool(declared_ok and unmerged_ok),
        **({} if exact or unmerged_ok else {"note": (
            f"the merge rounded {meta.get('zeros_moved')} zero-points to integers and the artifact no longer "
            f"computes the trained model; train with --integer-zeros for an exact GPTQ fold, or export "
            f"onnx/gguf, which hold fractional zeros")}),
    }
