"""What the handoff bundle (docs/design.md §11) says about an ONNX directory, and its outputs in
onnxruntime for ``verify`` without a base: full-sequence logits and greedy decoding with the KV cache,
on the CPU provider at accuracy level 0, judged with the runtime level's fixed tolerances (``spec``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from qalora_export.formats.bundle_facts import directory_tokenizer_fingerprint, versions
from qalora_export.formats.onnx import spec as spec
from qalora_export.formats.protocol import Handoff
from qalora_export.runtimes.isolation import call_isolated

# a call that runs past this is a hang (the fixture's outputs take seconds)
TIMEOUT_S = 1800.0


def runtime_outputs(artifact: Path, prompts: list[list[int]], n_new: int,
                    workdir: Path) -> tuple[list[np.ndarray], list[list[int]]]:
    """onnxruntime's logits ``[T, V]`` and greedy continuations (stopping after an eos), in a child process."""
    from qalora_export.formats.onnx.runtime import RUNTIME

    logits, greedy = call_isolated(f"{__name__}:_outputs_here",
                                   {"artifact": str(artifact), "prompts": prompts, "n_new": n_new,
                                    "workdir": str(workdir)}, RUNTIME, timeout=TIMEOUT_S)
    return logits, greedy


def _outputs_here(artifact: str, prompts: list[list[int]], n_new: int, workdir: str) -> tuple[list, list]:
    from qalora_export.formats.onnx import runtime as onnxrt

    view = onnxrt.at_accuracy_level(Path(artifact), 0, Path(workdir) / "onnx_level0")
    eos = onnxrt.eos_ids(view)
    decoder = onnxrt.OrtDecoder(view)
    try:
        logits = [decoder.logits(p).astype(np.float32) for p in prompts]
        greedy = [decoder.greedy(p, n_new, eos) for p in prompts]
    finally:
        decoder.close()
    return logits, greedy


def handoff(artifact: Path, runtime_report: Optional[dict]) -> Handoff:
    name = Path(artifact).name
    snippet = (
        "onnxruntime-genai (`pip install 'qalora-export[onnx]'`):\n\n"
        "```python\n"
        "import onnxruntime_genai as og\n\n"
        f"model = og.Model(\"{name}\")\n"
        "tokenizer = og.Tokenizer(model)\n"
        "params = og.GeneratorParams(model)\n"
        "params.set_search_options(do_sample=False, max_length=128)\n"
        "generator = og.Generator(model, params)\n"
        "generator.append_tokens(tokenizer.encode(\"What is the capital of France?\"))\n"
        "while not generator.is_done():\n"
        "    generator.generate_next_token()\n"
        "print(tokenizer.decode(generator.get_sequence(0)))\n"
        "```\n")
    gate = {"max_abs_logit_diff_rel": {"max": spec.RUNTIME_MAX_DLOGIT_REL},
            "mean_kl": {"max": spec.RUNTIME_MAX_KL},
            "top1_not_near_tie": {"max": 0},
            "greedy_not_near_tie": {"max": 0}}
    near_tie_factor, head_limits = spec.NEAR_TIE_FACTOR, ()
    head = _requantized_head(artifact, runtime_report)
    if head is not None:
        # the stored reference is the unmerged model with its float head: a requantized head is judged,
        # as at export, by mean KL against the floor the runtime level measured (head.py)
        from qalora_export.formats.bundle_facts import floor_limit
        from qalora_export.formats.onnx.head import HEAD_KL_EPSILON, HEAD_KL_FLOOR_FACTOR

        floor = ((runtime_report or {}).get("lm_head") or {}).get("floor")
        gate = {"mean_kl": floor_limit(floor, "mean_kl", HEAD_KL_FLOOR_FACTOR, HEAD_KL_EPSILON)}
        near_tie_factor = 0.0
        head_limits = ((f"the lm head is requantized to {head.get('kind')} (RTN, blocks of {head.get('block_size')}) "
                        f"from the base's float {head.get('source')} (--lm-head): not exact; the folded projections "
                        f"are. The gate is mean KL against the float-head reference within a floor measured at "
                        f"export; top-1 and greedy continuations are reported, not gated"),)
    stored = (runtime_report or {}).get("as_stored")
    if isinstance(stored, dict):  # exported at accuracy level 4: what runs is int8 activations
        head_limits += ((f"exported at MatMulNBits accuracy_level {stored.get('accuracy_level')} (int8 activations, "
                         f"faster, not exact in compute; the stored weights are): verify without a base checks the "
                         f"weights at level 0; the level-{stored.get('accuracy_level')} run was judged at export "
                         f"against onnxruntime's own floor at that level (verify.json, runtime.as_stored: mean KL "
                         f"{stored.get('artifact', {}).get('mean_kl', float('nan')):.2e}, floor "
                         f"{stored.get('floor', {}).get('mean_kl', float('nan')):.2e})"),)
    return Handoff(
        runtime="onnxruntime (" + versions("onnxruntime", "onnxruntime-genai") + ")",
        install="pip install 'qalora-export[onnx]'",
        snippet=snippet,
        limits=(*head_limits,
                "com.microsoft.MatMulNBits: 2/4/8-bit codes (onnxruntime refuses 3), block sizes powers of two >= 16; "
                "float zero-points (2 and 4 bits) hold the fold exactly",
                "on CPU, float zero-points skip onnxruntime's prepacking (slower than uint8 zero-points); "
                "the CPU provider is the one checked",
                "verify without a base runs onnxruntime at accuracy level 0 (full recomputation for logits, "
                "the KV cache for greedy decoding); onnxruntime-genai is checked by the export's runtime level"),
        gate=gate,
        near_tie_factor=near_tie_factor,
        tokenizer_fingerprint=directory_tokenizer_fingerprint(Path(artifact)),
        not_rechecked=_not_rechecked(Path(artifact)),
    )


def _not_rechecked(artifact: Path) -> tuple[str, ...]:
    """What the bundle's check cannot cover here: it runs onnxruntime at accuracy level 0, so an artifact
    exported at another level is not re-run as stored (its int8-activation run was judged at export)."""
    from qalora_export.formats.onnx.runtime import accuracy_levels

    levels = sorted(accuracy_levels(artifact) - {0})
    if not levels:
        return ()
    return ((f"accuracy level {levels[-1]} as stored (int8 activations): this check runs onnxruntime at level 0 "
             f"on the same weights; the level-{levels[-1]} run was judged at export against onnxruntime's own "
             f"floor (verify.json, runtime.as_stored); re-run it with verify ARTIFACT --base BASE --adapter ADAPTER"),)


def _requantized_head(artifact: Path, runtime_report: Optional[dict]) -> Optional[dict]:
    """The artifact's requantized-head record (``head.py``), or None for the base's float head."""
    from qalora_export.formats.onnx.head import requantized_head

    if runtime_report and isinstance(runtime_report.get("lm_head"), dict):
        return runtime_report["lm_head"]
    try:
        from qalora_export.formats.onnx.read import merge_metadata

        return requantized_head(merge_metadata(Path(artifact)))
    except Exception:  # noqa: BLE001 - a damaged model file fails the bundle's other checks
        return None
