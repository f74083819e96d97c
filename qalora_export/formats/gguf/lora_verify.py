"""The runtime check of a GGUF LoRA (docs/lora.md): llama.cpp loading the base GGUF with ``lora_path=``
against the unmerged PyTorch model, judged against llama.cpp's own noise floor (spec.py's rule, as
``verify.verify_runtime`` applies it), and against the same adapter folded by ``gguf BASE ADAPTER``.

Four llama.cpp runs, each in a child process (``runtimes.isolation``):

- ``lora``: base GGUF + LoRA vs the unmerged model (base + QA-LoRA adapter);
- ``floor``: the base GGUF alone vs the PyTorch base (adapter zeroed): what llama.cpp itself adds;
- ``merged``: the adapter folded into a GGUF of the same types, vs the unmerged model, and
  ``lora_vs_merged``: the LoRA run against the merged run (they should agree).

``passed``: the base GGUF holds the GPTQ base's weights (weight level, spec tolerances), and both
``lora`` and ``lora_vs_merged`` mean KL are within ``KL_FLOOR_FACTOR * floor + KL_EPSILON``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import ConfigError
from qalora_export.formats.gguf import spec as spec
from qalora_export.formats.gguf.read import read_file_types, read_weights
from qalora_export.formats.gguf.runtime import RUNTIME, run_logits_and_greedy
from qalora_export.formats.gguf.verify import _compare, _torch_references
from qalora_export.formats.gguf.write import export
from qalora_export.runtimes.isolation import call_isolated
from qalora_export.runtimes.prompts import check_prompt_ids


def base_weight_check(model: MergedView, base_gguf: Path) -> dict:
    """Every quantized layer of ``base_gguf`` (our reader) against the GPTQ base's ``W_hat`` (no adapter):
    the GGUF must be ``qalora-export gguf BASE`` of this base."""
    worst, seen, passed = 0.0, 0, True
    for name, weight in read_weights(base_gguf):
        if name not in model.quantized_modules:
            continue
        reference = model.base.read_layer(name).dequantize(torch.float64)
        if tuple(weight.shape) != tuple(reference.shape):
            return {"passed": False, "error": f"{name}: shape {tuple(weight.shape)} != {tuple(reference.shape)}"}
        error = float((weight - reference).abs().max())
        allowed = spec.WEIGHT_TOLERANCE * float(reference.abs().max()) + spec.WEIGHT_ATOL
        worst, seen, passed = max(worst, error / allowed), seen + 1, passed and error <= allowed
    passed = passed and seen == len(model.quantized_modules)
    return {"passed": passed, "layers": seen, "max_error_over_allowed": worst}


def _lora_logits_and_greedy_here(gguf_path: str, lora_path: str, prompts: list[list[int]], n_new: int,
                                 n_threads: int = 2) -> tuple[list[np.ndarray], list[list[int]]]:
    """In the child: llama.cpp with ``lora_path`` (scale 1: llama.cpp applies ``alpha / r`` itself)."""
    from llama_cpp import Llama

    for path in (gguf_path, lora_path):  # llama-cpp-python segfaults on a missing LoRA file instead of raising
        if not Path(path).is_file():
            raise ConfigError(f"llama.cpp cannot load {gguf_path} with the LoRA {lora_path}: {path} does not exist")
    n_ctx = max(len(p) for p in prompts) + n_new
    try:
        llm = Llama(gguf_path, lora_path=lora_path, n_ctx=max(n_ctx, 8), n_threads=n_threads,
                    n_threads_batch=n_threads, logits_all=True, verbose=False)
    except ValueError as exc:
        raise ConfigError(f"llama.cpp cannot load {gguf_path} with the LoRA {lora_path}: {exc}") from exc
    try:
        logits, continuations = [], []
        for k, prompt in enumerate(prompts):
            ids = check_prompt_ids(prompt, llm.n_vocab(), f"prompt {k}")
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True))
            generated: list[int] = []
            for _ in range(n_new):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                generated.append(token)
                llm.eval([token])
            continuations.append(generated)
        return logits, continuations
    finally:
        llm.close()


def lora_logits_and_greedy(gguf_path: Path, lora_path: Path, prompts: list[list[int]], n_new: int,
                           n_threads: int = 2) -> tuple[list[np.ndarray], list[list[int]]]:
    """llama.cpp's logits ``[T, V]`` per prompt and greedy continuations with the LoRA applied (child process)."""
    return call_isolated(f"{__name__}:_lora_logits_and_greedy_here",
                         {"gguf_path": str(gguf_path), "lora_path": str(lora_path),
                          "prompts": [[int(t) for t in p] for p in prompts], "n_new": n_new, "n_threads": n_threads},
                         RUNTIME)


def verify_lora(model: MergedView, lora_path: Path, base_gguf: Path, prompts: list[list[int]], workdir: Path, *,
                n_new: int = 8, n_threads: int = 2) -> dict:
    """Judge the GGUF LoRA ``lora_path`` on ``base_gguf`` (module docstring); ``result["passed"]``."""
    from qalora_export.runtimes.compare import within_floor

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"runtime": RUNTIME.name, "base_weights": base_weight_check(model, base_gguf)}
    (ref_logits, ref_greedy), (base_logits, base_greedy) = _torch_references(model, prompts, n_new)
    lora_logits, lora_greedy = lora_logits_and_greedy(base_gguf, lora_path, prompts, n_new, n_threads)
    result["lora"] = _compare(ref_logits, ref_greedy, lora_logits, lora_greedy)
    floor_logits, floor_greedy = run_logits_and_greedy(base_gguf, prompts, n_new, n_threads=n_threads)
    result["floor"] = _compare(base_logits, base_greedy, floor_logits, floor_greedy)
    result["adapter_effect"] = _compare(ref_logits, ref_greedy, base_logits, base_greedy)

    weights_dtype, embeddings = read_file_types(base_gguf)
    merged_path = workdir / "merged.gguf"
    export(model, merged_path, embeddings=embeddings, weights_dtype=weights_dtype, overwrite=True)
    merged_logits, merged_greedy = run_logits_and_greedy(merged_path, prompts, n_new, n_threads=n_threads)
    merged_path.unlink()
    result["merged"] = _compare(ref_logits, ref_greedy, merged_logits, merged_greedy)
    result["lora_vs_merged"] = _compare(merged_logits, merged_greedy, lora_logits, lora_greedy)

    floor_kl = result["floor"]["mean_kl"]
    allowed = spec.KL_FLOOR_FACTOR * floor_kl + spec.KL_EPSILON
    result["rule"] = (f"lora and lora_vs_merged mean KL <= {spec.KL_FLOOR_FACTOR:g} x floor mean KL + "
                      f"{spec.KL_EPSILON:g} (floor: the base GGUF alone in llama.cpp vs the PyTorch base)")
    result["allowed_mean_kl"] = allowed
    result["passed"] = bool(result["base_weights"]["passed"]
                            and within_floor(result["lora"]["mean_kl"], floor_kl, spec.KL_FLOOR_FACTOR, spec.KL_EPSILON)
                            and within_floor(result["lora_vs_merged"]["mean_kl"], floor_kl, spec.KL_FLOOR_FACTOR,
                                             spec.KL_EPSILON))
    result["weights"], result["embeddings"], result["prompts"], result["n_new"] = (
        weights_dtype, embeddings, len(prompts), n_new)
    return result
