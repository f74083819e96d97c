"""The runtime level for MLX: mlx-lm (MLX's CPU device, in a child process) against the unmerged PyTorch
model, logits and greedy continuations, judged as ONNX is (formats/onnx/verify.py): a float32 artifact
computes what PyTorch computes up to float32 accumulation order, so fixed tolerances with near-ties
allowed (``spec``); a float16/bfloat16 artifact computes in that dtype, so it is judged against a floor
measured in the same run (the base exported the same way, no adapter), as GGUF is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import ConfigError
from qalora_export.formats.mlx import spec
from qalora_export.formats.mlx.read import read_config


def torch_logits_and_greedy(net: torch.nn.Module, prompts: list[list[int]],
                            n_new: int) -> tuple[list[np.ndarray], list[list[int]], list[list[float]]]:
    """The PyTorch model's logits float64 ``[T, V]`` per prompt, its greedy continuation (full
    recomputation, no stop) and the top-1 minus top-2 logit margin at each step (to recognise near-ties)."""
    logits, tokens, margins = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            logits.append(net(torch.tensor([prompt])).logits[0].to(torch.float64).numpy())
            ids, got, gaps = list(prompt), [], []
            for _ in range(n_new):
                last = net(torch.tensor([ids])).logits[0, -1].to(torch.float64)
                top = torch.topk(last, 2).values
                got.append(int(torch.argmax(last)))
                gaps.append(float(top[0] - top[1]))
                ids.append(got[-1])
            tokens.append(got)
            margins.append(gaps)
    return logits, tokens, margins


def _references(model: MergedView, prompts: list[list[int]], n_new: int, base_too: bool):
    """The unmerged model's references and (``base_too``) the base's: one model whose ``lora_B`` is
    zeroed for the second run, so the adapter path adds exactly 0."""
    from qalora_export.modeling.model import build_model, qalora_modules
    from qalora_export.training.evaluate import cached_base_weights

    net = build_model(model.base, model.adapter)
    with cached_base_weights(net):
        merged = torch_logits_and_greedy(net, prompts, n_new)
        base = merged
        if base_too and model.adapter is not None:
            with torch.no_grad():
                for module in qalora_modules(net).values():
                    module.lora_B.zero_()
            base = torch_logits_and_greedy(net, prompts, n_new)
    return merged, base


def greedy_check(reference: Sequence[int], margins: Sequence[float], got: Sequence[int], tie_limit: float) -> dict:
    """A greedy continuation against the reference's: identical, or diverging at a near-tie."""
    first = next((i for i, (a, b) in enumerate(zip(reference, got)) if a != b), None)
    if first is None:
        return {"match": True, "near_tie": False, "tokens": list(got)}
    near_tie = margins[first] <= tie_limit
    return {"match": False, "near_tie": bool(near_tie), "diverges_at": first,
            "reference_margin": margins[first], "tokens": list(got)}


def judge(ref_logits: list[np.ndarray], ref_tokens: list[list[int]], ref_margins: list[list[float]],
          test_logits: list[np.ndarray], test_tokens: list[list[int]]) -> dict:
    """Logit distance, KL, top-1 (near-ties excused) and greedy of a test run against a reference,
    with the fixed float32 tolerances of ``spec``; ``checks`` and ``passed``."""
    from qalora_export.runtimes.compare import compare_logits

    logits = compare_logits(ref_logits, test_logits)
    logit_scale = max(float(np.abs(r).max()) for r in ref_logits) or 1.0
    tie_limit = spec.NEAR_TIE_FACTOR * logits.max_abs_logit_diff
    top1_bad = 0
    for r, t in zip(ref_logits, test_logits):
        top2 = np.sort(r, axis=-1)[:, -2:]
        top1_bad += int(((r.argmax(-1) != t.argmax(-1)) & ((top2[:, 1] - top2[:, 0]) > tie_limit)).sum())
    greedy = [greedy_check(r, m, t, tie_limit) for r, m, t in zip(ref_tokens, ref_margins, test_tokens)]
    checks = {"max_dlogit_rel": logits.max_abs_logit_diff / logit_scale <= spec.RUNTIME_MAX_DLOGIT_REL,
              "mean_kl": logits.mean_kl <= spec.RUNTIME_MAX_KL,
              "top1": top1_bad == 0,
              "greedy": all(g["match"] or g["near_tie"] for g in greedy)}
    return {**logits.to_json(), "max_abs_logit_diff_rel": logits.max_abs_logit_diff / logit_scale,
            "top1_disagreements_not_near_tie": top1_bad, "greedy": greedy,
            "greedy_exact_match": sum(g["match"] for g in greedy), "checks": checks, "passed": all(checks.values())}


def verify_runtime(model: MergedView, artifact: Path, prompts: list[list[int]], workdir: Path, *,
                   n_new: int = spec.GREEDY_TOKENS, device: str = "cpu") -> dict:
    """Run the artifact in mlx-lm and compare it with the unmerged PyTorch model ``build_model(base, adapter)``.

    float32 artifacts: ``passed`` when max |dlogit| / max |logit| <= ``RUNTIME_MAX_DLOGIT_REL``, mean KL
    <= ``RUNTIME_MAX_KL``, and top-1 and greedy agree except at near-ties. float16/bfloat16: mean KL
    <= ``KL_FLOOR_FACTOR`` x the floor (the base exported in the same dtype, no adapter, in mlx-lm vs
    the PyTorch base) + ``KL_EPSILON``. ``device`` is part of the protocol; MLX runs on its CPU device here.
    """
    from qalora_export.formats.mlx.runtime import RUNTIME, run_logits_and_greedy
    from qalora_export.runtimes.compare import compare_logits, within_floor

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("verify needs at least one non-empty prompt")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dtype = read_config(artifact).get("dtype", spec.DEFAULT_DTYPE)
    floor_needed = dtype != "float32"
    (ref_logits, ref_tokens, ref_margins), base_refs = _references(model, prompts, n_new, base_too=floor_needed)
    art_logits, art_tokens = run_logits_and_greedy(artifact, prompts, n_new)
    result = {"runtime": f"{RUNTIME.name}: mlx {_version('mlx.core')}, mlx-lm {_version('mlx_lm')}",
              "dtype": dtype, "prompts": len(prompts), "n_new": n_new,
              "reference_greedy": ref_tokens,
              "artifact": judge(ref_logits, ref_tokens, ref_margins, art_logits, art_tokens)}
    if not floor_needed:
        result["tolerances"] = {"max_dlogit_rel": spec.RUNTIME_MAX_DLOGIT_REL, "mean_kl": spec.RUNTIME_MAX_KL,
                                "near_tie_factor": spec.NEAR_TIE_FACTOR}
        result["passed"] = result["artifact"]["passed"]
        return result
    from qalora_export.formats.mlx.write import export

    floor_dir = workdir / f"floor-base-{dtype}"
    export(MergedView(model.base, None), floor_dir, dtype=dtype, overwrite=True)
    floor_logits, _ = run_logits_and_greedy(floor_dir, prompts, n_new)
    floor = compare_logits(base_refs[0], floor_logits)
    art_kl = result["artifact"]["mean_kl"]
    result["floor"] = floor.to_json()
    result["rule"] = (f"artifact mean KL <= {spec.KL_FLOOR_FACTOR:g} x floor mean KL + {spec.KL_EPSILON:g} "
                      f"(floor: base with no adapter, {dtype}, in mlx-lm vs PyTorch)")
    result["allowed_mean_kl"] = spec.KL_FLOOR_FACTOR * floor.mean_kl + spec.KL_EPSILON
    result["passed"] = bool(within_floor(art_kl, floor.mean_kl, spec.KL_FLOOR_FACTOR, spec.KL_EPSILON))
    return result


def _version(module: str) -> str:
    try:
        import importlib.metadata as md

        return md.version({"mlx.core": "mlx", "mlx_lm": "mlx-lm"}.get(module, module))
    except Exception:  # noqa: BLE001 - a version string is informational only
        return "?"
