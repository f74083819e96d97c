"""``reference.safetensors``: the unmerged model (base + adapter, PyTorch) on the fixed verification
prompts, small enough to ship with an artifact (a few hundred KB for a 49k vocabulary).

Tensors, per prompt ``p``: ``p{p}.ids`` int64 ``[T]`` (the prompt), ``p{p}.values`` float32 ``[T, k]``
and ``p{p}.indices`` int64 ``[T, k]`` (the k largest logits, descending), ``p{p}.lse`` float64 ``[T]``
(log-sum-exp of the whole row), ``p{p}.max_abs`` float64 ``[T]``, ``p{p}.greedy`` int64 ``[n_new]``
and ``p{p}.margins`` float64 ``[n_new]`` (top-1 minus top-2 logit at each greedy step). The metadata
key ``qalora_export.reference`` holds JSON: format, tokenizer fingerprint, k, n_new, the gate
(the runtime level's limits, with floors measured at export) and the near-tie factor.

Reading needs numpy and safetensors only: verify without a base imports no model code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qalora_export.errors import ConfigError
from qalora_export.runtimes.reference import TOP_K, top_k_rows

if TYPE_CHECKING:
    from qalora_export.checkpoint.merged_view import MergedView

META_KEY = "qalora_export.reference"
N_NEW = 8  # greedy tokens per prompt (the runtime levels decode 8 to 12)


def compute_reference(model: "MergedView", prompts: list[list[int]], n_new: int = N_NEW, k: int = TOP_K) -> dict:
    """The unmerged model's top-k rows and greedy continuations (float32, CPU, full recomputation)."""
    import torch

    from qalora_export.modeling.model import build_model
    from qalora_export.training.evaluate import cached_base_weights

    net = build_model(model.base, model.adapter)
    net.eval()
    rows, greedy, margins = [], [], []
    with torch.no_grad(), cached_base_weights(net):
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long)
            rows.append(top_k_rows(net(input_ids=ids).logits[0].float().numpy(), k))
            tokens, gaps = [], []
            for _ in range(n_new):
                last = net(input_ids=ids).logits[0, -1].to(torch.float64)
                top = torch.topk(last, 2).values
                tokens.append(int(last.argmax()))
                gaps.append(float(top[0] - top[1]))
                ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
            greedy.append(tokens)
            margins.append(gaps)
    return {"prompts": [list(map(int, p)) for p in prompts], "rows": rows, "greedy": greedy, "margins": margins,
            "k": k, "n_new": n_new}


def save_reference(reference: dict, meta: dict, path: Path) -> None:
    """Write ``reference`` (:func:`compute_reference`) with ``meta`` (JSON-able) at ``path``."""
    from safetensors.numpy import save_file

    tensors = {}
    for p, (ids, rows, tokens, gaps) in enumerate(zip(reference["prompts"], reference["rows"], reference["greedy"],
                                                      reference["margins"])):
        tensors[f"p{p}.ids"] = np.asarray(ids, dtype=np.int64)
        tensors[f"p{p}.values"] = np.ascontiguousarray(rows["values"], dtype=np.float32)
        tensors[f"p{p}.indices"] = np.ascontiguousarray(rows["indices"], dtype=np.int64)
        tensors[f"p{p}.lse"] = np.asarray(rows["lse"], dtype=np.float64)
        tensors[f"p{p}.max_abs"] = np.asarray(rows["max_abs"], dtype=np.float64)
        tensors[f"p{p}.greedy"] = np.asarray(tokens, dtype=np.int64)
        tensors[f"p{p}.margins"] = np.asarray(gaps, dtype=np.float64)
    info = {**meta, "k": reference["k"], "n_new": reference["n_new"], "prompts": len(reference["prompts"])}
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(info)})


def load_reference(path: Path) -> dict:
    """The reference at ``path``: ``{"meta", "prompts", "rows", "greedy", "margins"}``.

    Raises:
        ConfigError: not a reference file of this tool (unreadable, no metadata, missing tensors).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors, JSON and key errors all mean "not a reference"
        raise ConfigError(f"{path} is not a reference file of qalora-export ({type(exc).__name__}: {exc}); "
                          f"re-export the artifact to rewrite its bundle") from exc
    out: dict = {"meta": meta, "prompts": [], "rows": [], "greedy": [], "margins": []}
    try:
        for p in range(int(meta["prompts"])):
            out["prompts"].append(tensors[f"p{p}.ids"].tolist())
            out["rows"].append({key: tensors[f"p{p}.{key}"] for key in ("values", "indices", "lse", "max_abs")})
            out["greedy"].append(tensors[f"p{p}.greedy"].tolist())
            out["margins"].append(tensors[f"p{p}.margins"].tolist())
    except KeyError as exc:
        raise ConfigError(f"{path} lacks tensor {exc.args[0]}; re-export the artifact to rewrite its bundle") from exc
    return out
