"""What the handoff bundle (docs/design.md §11) says about a GPTQ checkpoint, and its outputs in
transformers + GPTQModel for ``verify`` without a base. The gate is the runtime level's, against the
floor measured at export (the base in GPTQModel vs the base in PyTorch): max |dlogit| and KL within
FLOOR_FACTOR x floor + eps, top-1 agreement at least MIN_TOP1 x the floor's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from qalora_export.formats.bundle_facts import directory_tokenizer_fingerprint, floor_limit, versions
from qalora_export.formats.gptq import spec as spec
from qalora_export.formats.protocol import Handoff
from qalora_export.runtimes.isolation import call_isolated

# a call that runs past this is a hang (loading the fixture in GPTQModel takes about a minute)
TIMEOUT_S = 3600.0


def runtime_outputs(artifact: Path, prompts: list[list[int]], n_new: int,
                    workdir: Path) -> tuple[list[np.ndarray], list[list[int]]]:
    """GPTQModel's logits ``[T, V]`` (gptq_torch, float32 on CPU) and ``n_new`` greedy tokens, in a child process."""
    from qalora_export.formats.gptq.runtime import RUNTIME

    logits, greedy = call_isolated(f"{__name__}:_outputs_here",
                                   {"artifact": str(artifact), "prompts": prompts, "n_new": n_new},
                                   RUNTIME, timeout=TIMEOUT_S)
    return logits, greedy


def _outputs_here(artifact: str, prompts: list[list[int]], n_new: int) -> tuple[list, list]:
    from qalora_export.formats.gptq.runtime import load_gptq_model, model_greedy, model_logits

    model = load_gptq_model(Path(artifact), "cpu")
    return model_logits(model, prompts), model_greedy(model, prompts, n_new)


def handoff(artifact: Path, runtime_report: Optional[dict]) -> Handoff:
    from qalora_export.checkpoint.gptq import GPTQCheckpoint

    name = Path(artifact).name
    bits = GPTQCheckpoint(artifact).config.bits
    floor = (runtime_report or {}).get("floor")
    snippet = (
        "transformers + GPTQModel (`pip install 'qalora-export[gptq]'`; vLLM and ExLlama read it too):\n\n"
        "```python\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig\n\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"{name}\", dtype=torch.float32,\n"
        f"    quantization_config=GPTQConfig(bits={bits}, backend=\"gptq_torch\"))  # CPU; on CUDA: device_map=\"cuda\"\n"
        "ids = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"What is the capital of France?\"}],\n"
        "                                    add_generation_prompt=True, return_tensors=\"pt\")\n"
        "out = model.generate(ids, max_new_tokens=32, do_sample=False)\n"
        "print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))\n"
        "```\n")
    return Handoff(
        runtime="transformers + GPTQModel (" + versions("transformers", "gptqmodel") + ")",
        install="pip install 'qalora-export[gptq]'",
        snippet=snippet,
        limits=("integer zero-points only: a fractional fold is rounded (see the fold above); adapters trained "
                "with --integer-zeros fold exactly",
                "on CPU load with GPTQConfig(backend=\"gptq_torch\") and float32 for exact results (the default "
                "CPU kernel computes in bf16)",
                "greedy continuations are reported, not gated"),
        gate={"max_abs_logit_diff": floor_limit(floor, "max_abs_logit_diff", spec.FLOOR_FACTOR, spec.FLOOR_EPS_LOGIT),
              "mean_kl": floor_limit(floor, "mean_kl", spec.FLOOR_FACTOR, spec.FLOOR_EPS_KL),
              "top1_agreement": floor_limit(floor, "top1_agreement", spec.MIN_TOP1, 0.0, op="min")},
        near_tie_factor=0.0,
        tokenizer_fingerprint=directory_tokenizer_fingerprint(Path(artifact)),
    )
