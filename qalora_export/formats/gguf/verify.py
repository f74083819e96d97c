"""The runtime level for GGUF: llama.cpp (in a child process) against the unmerged PyTorch model, judged
against llama.cpp's own noise floor (rule and constants in ``spec.py``, docs/design.md §4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import ConfigError
from qalora_export.formats.gguf import spec as spec
from qalora_export.formats.gguf.read import read_file_types
from qalora_export.formats.gguf.write import export

# ------------------------------------------------------------------------------ runtime verify


# Hold the dequantized weights of the reference model between forwards (greedy decoding runs one
# forward per new token, and QALoRALinear dequantizes every weight at every forward) when they fit.
DEQUANT_CACHE_BYTES = 4 << 30


def _hold_dequantized_weights(net: torch.nn.Module) -> None:
    """Compute each QALoRALinear's ``W_hat`` once (same bits as every forward would) and reuse it."""
    from qalora_export.modeling.qalora_linear import QALoRALinear

    layers = [m for m in net.modules() if isinstance(m, QALoRALinear)]
    if sum(m.in_features * m.out_features * 4 for m in layers) > DEQUANT_CACHE_BYTES:
        return
    for module in layers:
        w = module.dequantized_weight(module.compute_dtype)
        module.dequantized_weight = lambda dtype=None, _w=w, _m=module: _w if dtype in (None, _m.compute_dtype) else _w.to(dtype)


def _run_torch(net: torch.nn.Module, prompts: list[list[int]], n_new: int,
               margins: Optional[list] = None) -> tuple[list[np.ndarray], list[list[int]]]:
    """Logits and greedy continuations; ``margins`` (a list) receives, per prompt, the top-1 minus
    top-2 logit at each greedy step."""
    logits, continuations = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long)
            logits.append(net(input_ids=ids).logits[0].float().numpy())
            generated: list[int] = []
            steps: list[float] = []
            for _ in range(n_new):
                last = net(input_ids=ids).logits[0, -1]
                top = torch.topk(last.float(), 2).values
                steps.append(float(top[0] - top[1]))
                token = int(last.argmax())
                generated.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            continuations.append(generated)
            if margins is not None:
                margins.append(steps)
    return logits, continuations


def _torch_references(model: MergedView, prompts: list[list[int]], n_new: int, base_too: bool = True,
                      margins: Optional[dict] = None):
    """Logits ``[T, V]`` and greedy continuations of the unmerged PyTorch model (float32, CPU), with the
    adapter and (``base_too``) without it: one model, whose ``lora_B`` is zeroed for the second run, so
    the adapter path adds exactly 0 and the output is the base's. ``margins`` (a dict) receives the
    greedy steps' top-1/top-2 margins of each run under ``"with_adapter"`` and ``"base"``."""
    from qalora_export.modeling.model import build_model, qalora_modules

    net = build_model(model.base, model.adapter)
    _hold_dequantized_weights(net)
    margins = {} if margins is None else margins
    with_adapter = _run_torch(net, prompts, n_new, margins.setdefault("with_adapter", []))
    base = with_adapter
    margins["base"] = margins["with_adapter"]
    if base_too and model.adapter is not None:
        with torch.no_grad():
            for module in qalora_modules(net).values():
                module.lora_B.zero_()
        margins["base"] = []
        base = _run_torch(net, prompts, n_new, margins["base"])
    del net
    return with_adapter, base


def _llamacpp_logits_and_greedy(path: Path, prompts: list[list[int]], n_new: int,
                                n_threads: int) -> tuple[list[np.ndarray], list[list[int]]]:
    from qalora_export.formats.gguf.runtime import run_logits_and_greedy

    return run_logits_and_greedy(path, prompts, n_new, n_threads=n_threads)


def _compare(ref_logits, ref_greedy, test_logits, test_greedy, ref_margins: Optional[list] = None) -> dict:
    """The comparison of a run with its reference; with ``ref_margins`` (the reference's top-1/top-2
    margin at each greedy step), each prompt also reports where the greedy continuations first part
    and the reference's margin there (``greedy_divergence_margin``: a near-tie when it is within twice
    the runtime's logit error)."""
    from qalora_export.runtimes.compare import compare_logits, greedy_match

    overall = compare_logits(ref_logits, test_logits).to_json()
    overall["greedy_match"] = greedy_match(ref_greedy, test_greedy)
    overall["greedy_identical"] = sum(a == b for a, b in zip(ref_greedy, test_greedy)) / max(len(ref_greedy), 1)
    per_prompt = []
    for k in range(len(ref_logits)):
        row = compare_logits([ref_logits[k]], [test_logits[k]]).to_json()
        row["greedy_match"] = greedy_match([ref_greedy[k]], [test_greedy[k]])
        row["greedy_reference"], row["greedy_test"] = ref_greedy[k], test_greedy[k]
        if ref_margins is not None:
            step = next((i for i, (a, b) in enumerate(zip(ref_greedy[k], test_greedy[k])) if a != b), None)
            row["greedy_first_divergence"] = step
            row["greedy_divergence_margin"] = None if step is None else ref_margins[k][step]
        per_prompt.append(row)
    overall["per_prompt"] = per_prompt
    return overall


def verify_runtime(model: MergedView, artifact: Path, prompts: list[list[int]], workdir: Path, *,
                   n_new: int = 8, n_threads: int = 2, device: str = "cpu") -> dict:
    """Run the artifact in llama.cpp and judge it against llama.cpp's own noise floor (docs/design.md §4).

    Three llama.cpp runs, each compared with the PyTorch model it should equal:

    - ``artifact``: the GGUF under test vs the unmerged model (base + adapter);
    - ``floor``: the base exported the same way (same weight and embedding types) with no adapter, so
      the fold is the identity, vs the PyTorch base: the distance llama.cpp itself adds;
    - ``f32_reference``: an F32 GGUF of the unmerged effective weights vs the unmerged model: what is
      left without weight and activation quantization (graph and float32 differences only).

    With an adapter, ``adapter_effect`` compares the PyTorch model with and without it (no llama.cpp):
    how far the adapter moves the output, which a passing gate must be far below to mean anything.

    ``passed`` is ``artifact.mean_kl <= KL_FLOOR_FACTOR * floor.mean_kl + KL_EPSILON`` (spec.py).
    Greedy continuations (``n_new`` tokens) are reported, not gated: near-ties flip under activation
    quantization (docs/design.md §8). ``device`` is part of the protocol; llama.cpp runs here on the
    CPU, whatever it says.
    """
    from qalora_export.runtimes.compare import within_floor

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    artifact = Path(artifact)
    weights_dtype, embeddings = read_file_types(artifact)
    if weights_dtype not in spec.WEIGHTS_DTYPES or embeddings not in spec.EMBEDDING_DTYPES:
        raise ConfigError(f"{artifact}: projections stored as {weights_dtype}, embeddings as {embeddings}; "
                          f"verify knows {spec.WEIGHTS_DTYPES} / {spec.EMBEDDING_DTYPES}")

    margins: dict = {}
    (ref_logits, ref_greedy), (base_logits, base_greedy) = _torch_references(model, prompts, n_new, margins=margins)
    art_logits, art_greedy = _llamacpp_logits_and_greedy(artifact, prompts, n_new, n_threads)
    result = {"artifact": _compare(ref_logits, ref_greedy, art_logits, art_greedy, margins["with_adapter"])}

    f32_path = workdir / "reference-f32.gguf"
    export(model, f32_path, embeddings="f32", weights_dtype="f32", overwrite=True)
    f32_logits, f32_greedy = _llamacpp_logits_and_greedy(f32_path, prompts, n_new, n_threads)
    result["f32_reference"] = _compare(ref_logits, ref_greedy, f32_logits, f32_greedy, margins["with_adapter"])
    f32_path.unlink()

    floor_path = workdir / f"floor-base-{weights_dtype}.gguf"
    export(MergedView(model.base, None), floor_path, embeddings=embeddings, weights_dtype=weights_dtype,
           overwrite=True)
    floor_logits, floor_greedy = _llamacpp_logits_and_greedy(floor_path, prompts, n_new, n_threads)
    result["floor"] = _compare(base_logits, base_greedy, floor_logits, floor_greedy, margins["base"])
    floor_path.unlink()
    if model.adapter is not None:
        # how far the adapter moves the PyTorch reference: a gate far below it can tell a dropped fold
        result["adapter_effect"] = _compare(ref_logits, ref_greedy, base_logits, base_greedy)  # as lora_verify

    art_kl, floor_kl = result["artifact"]["mean_kl"], result["floor"]["mean_kl"]
    result["rule"] = (f"artifact mean KL <= {spec.KL_FLOOR_FACTOR:g} x floor mean KL + {spec.KL_EPSILON:g} "
                      f"(floor: base with no adapter, same GGUF types, in llama.cpp vs PyTorch)")
    result["allowed_mean_kl"] = spec.KL_FLOOR_FACTOR * floor_kl + spec.KL_EPSILON
    result["kl_over_floor"] = art_kl / floor_kl if floor_kl > 0 else None
    result["passed"] = bool(within_floor(art_kl, floor_kl, spec.KL_FLOOR_FACTOR, spec.KL_EPSILON))
    result["weights"], result["embeddings"], result["prompts"], result["n_new"] = weights_dtype, embeddings, len(prompts), n_new
    return result
