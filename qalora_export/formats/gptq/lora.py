"""A plain LoRA on an AutoGPTQ base (docs/lora.md): the PEFT folder is the adapter format of this
format's runtimes (transformers + GPTQModel with PEFT, vLLM ``--enable-lora``), so ``export_lora``
writes no file of its own; it checks that the LoRA fits the base. ``verify_lora`` applies the folder
with ``peft.PeftModel.from_pretrained`` to the base as GPTQModel loads it (CPU: ``gptq_torch``,
float32 activations, fp16 dequantization) and compares it with the unmerged PyTorch model, gated like
the merged artifact (spec.py: ``FLOOR_FACTOR`` x the base's own floor, GPTQModel vs PyTorch).
"""

from __future__ import annotations

from pathlib import Path

from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.packing import WORD_BITS
from qalora_export.core.plain_lora import PlainLoRA
from qalora_export.errors import AdapterError
from qalora_export.formats.gptq.spec import FLOOR_EPS_KL, FLOOR_EPS_LOGIT, FLOOR_FACTOR, GREEDY_TOKENS, MIN_TOP1


def export_lora(lora: PlainLoRA, out_dir: Path, base_artifact: Path) -> dict:
    """Check that every adapted module of ``lora`` is a quantized layer of the base with the LoRA's
    ``[out, in]``; no file is added (the PEFT folder is what GPTQ runtimes load).

    Raises:
        AdapterError: a module the base does not quantize, or of another shape.
    """
    base = GPTQCheckpoint(base_artifact)
    for module, layer in lora.layers.items():
        if module not in base.quantized_modules:
            raise AdapterError(f"the LoRA adapts {module}, which {base_artifact} does not quantize; it is another model")
        _, shape = base.tensor_spec(f"{module}.qweight")
        in_features = shape[0] * WORD_BITS // base.config.bits
        want = (int(layer.lora_B.shape[0]), int(layer.lora_A.shape[1]))
        if (shape[1], in_features) != want:
            raise AdapterError(f"{base_artifact}: {module} is [out, in] = {[shape[1], in_features]} but the LoRA "
                               f"is {list(want)}; it is another model")
    return {"files": [], "base": str(base_artifact)}


def verify_lora(model: MergedView, lora_dir: Path, base_artifact: Path, prompts: list[list[int]],
                workdir: Path, device: str = "cpu") -> dict:
    """PEFT + GPTQModel running the plain LoRA against the unmerged PyTorch model; ``result["passed"]``."""
    from qalora_export.extras import Requirement, require

    require(Requirement("gptq", ("peft",)), "a plain LoRA in PEFT")
    from peft import PeftModel

    from qalora_export.formats.gptq.runtime import load_gptq_model, model_greedy, model_logits
    from qalora_export.modeling.model import build_model
    from qalora_export.runtimes.compare import compare_logits, greedy_match, within_floor
    from qalora_export.training.evaluate import cached_base_weights

    unmerged = build_model(model.base, model.adapter)
    with cached_base_weights(unmerged):
        ref_logits = model_logits(unmerged, prompts)
        ref_greedy = model_greedy(unmerged, prompts, GREEDY_TOKENS)
    del unmerged
    plain = build_model(model.base, None)
    with cached_base_weights(plain):
        base_logits = model_logits(plain, prompts)
    del plain

    runtime = load_gptq_model(Path(base_artifact), device)
    floor = compare_logits(base_logits, model_logits(runtime, prompts))
    runtime = PeftModel.from_pretrained(runtime, str(lora_dir))
    runtime.eval()
    lora_logits = model_logits(runtime, prompts)
    lora_greedy = model_greedy(runtime, prompts, GREEDY_TOKENS)
    del runtime
    vs_unmerged = compare_logits(ref_logits, lora_logits)
    effect = compare_logits(ref_logits, base_logits)
    passed = (within_floor(vs_unmerged.max_abs_logit_diff, floor.max_abs_logit_diff, FLOOR_FACTOR, FLOOR_EPS_LOGIT)
              and within_floor(vs_unmerged.mean_kl, floor.mean_kl, FLOOR_FACTOR, FLOOR_EPS_KL)
              and vs_unmerged.top1_agreement >= MIN_TOP1 * floor.top1_agreement)
    return {
        "runtime": f"PEFT on transformers + GPTQModel ({'gptq_torch, float32' if device == 'cpu' else device})",
        "floor": floor.to_json(),
        "lora_vs_unmerged": {**vs_unmerged.to_json(), "greedy_match": greedy_match(ref_greedy, lora_greedy)},
        "adapter_effect": effect.to_json(),
        "rule": f"max|dlogit| <= {FLOOR_FACTOR} x floor + {FLOOR_EPS_LOGIT}, KL <= {FLOOR_FACTOR} x floor + "
                f"{FLOOR_EPS_KL}, top-1 >= {MIN_TOP1} x floor's (floor: the base in GPTQModel vs PyTorch)",
        "passed": bool(passed),
    }
