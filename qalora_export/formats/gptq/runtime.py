"""Running an AutoGPTQ checkpoint in its real runtime: transformers + GPTQModel.

On CPU the exact path is GPTQModel's ``gptq_torch`` backend with float32 activations (it
dequantizes in fp16); its default CPU kernel computes in bf16. On CUDA the default kernel is used.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qalora_export.runtimes.isolation import RuntimeInfo

RUNTIME = RuntimeInfo(
    name="transformers + GPTQModel",
    crash_hint=("run with -v (or read the log file) for GPTQModel's own messages; on a CPU machine set "
                "GPTQMODEL_CPU_WORKERS to at most the number of cores; reinstall 'qalora-export[gptq]' "
                "(gptqmodel 7.6.0 with torch 2.13)"))


def load_gptq_model(path: Path, device: str = "cpu"):
    """The checkpoint at ``path`` loaded unmodified by transformers with GPTQModel's kernels."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    from transformers import AutoModelForCausalLM, GPTQConfig

    from qalora_export.checkpoint.gptq import GPTQCheckpoint

    bits = GPTQCheckpoint(path).config.bits
    if device == "cpu":
        # GPTQModel torch.compiles each layer's dequantize on load; on CPU that is a recompilation
        # storm (210 bound methods, recompile_limit 128) that only costs time: verify of the SmolLM2
        # fixture's GPTQ base took 73.7 s with it and 55.4 s without, identical logits (docs/results.md).
        import torch._dynamo

        torch._dynamo.config.disable = True
        qcfg = GPTQConfig(bits=bits, backend="gptq_torch")
        model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=qcfg, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float16, device_map=device)
    model.eval()
    return model


@torch.no_grad()
def model_logits(model, prompts: list[list[int]]) -> list:
    """Full-sequence logits ``[T, vocab]`` (float32 numpy) of a transformers model, one prompt at a time."""
    device = next(model.parameters()).device
    out = []
    for ids in prompts:
        logits = model(torch.tensor([ids], device=device)).logits[0]
        out.append(logits.float().cpu().numpy())
    return out


@torch.no_grad()
def model_greedy(model, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy continuations of ``n_new`` tokens (no early stop), one list per prompt."""
    device = next(model.parameters()).device
    out = []
    for ids in prompts:
        seq = model.generate(torch.tensor([ids], device=device), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, num_beams=1, pad_token_id=0)
        out.append(seq[0, len(ids):].tolist())
    return out
