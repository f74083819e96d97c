"""A plain LoRA on disk in PEFT's layout, as PEFT 0.21 saves a ``LoraConfig`` adapter (docs/lora.md):

- ``adapter_config.json``: a standard LoraConfig (``use_qalora`` false, no QA-LoRA fields), so that
  ``peft.PeftModel.from_pretrained``, vLLM and llama.cpp's ``convert_lora_to_gguf.py`` take it;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
  ``...lora_B.weight`` ``[out, r]`` (float32 or float16);
- ``qalora_export_lora.json`` (ours, ignored by runtimes): where the factors came from (the QA-LoRA
  adapter, its pooling convention and pooling groups as resolved, the storage rounding) and the
  weight-level check.

:func:`write_plain_lora` writes into a directory the caller made (its atomic temporary output, so
that other files of the same export land in the same atomic step).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qalora_export.checkpoint.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from qalora_export.core.plain_lora import PlainLoRA

PLAIN_LORA_METADATA = "qalora_export_lora.json"
PLAIN_LORA_METADATA_VERSION = 1
# the PEFT release whose save_pretrained this layout follows (read back by PeftModel.from_pretrained)
PEFT_LAYOUT_VERSION = "0.21.2"


def peft_config(lora: PlainLoRA, base_model_path: str = "") -> dict:
    """``adapter_config.json`` of ``lora``: the keys PEFT 0.21's LoraConfig saves, for a plain LoRA."""
    return {
        "task_type": "CAUSAL_LM",
        "peft_type": "LORA",
        "auto_mapping": None,
        "peft_version": PEFT_LAYOUT_VERSION,
        "base_model_name_or_path": base_model_path or None,
        "revision": None,
        "inference_mode": True,
        "r": lora.rank,
        "target_modules": sorted(lora.target_modules),
        "exclude_modules": None,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "use_qalora": False,
        "layer_replication": None,
        "lora_bias": False,
    }


def peft_tensors(lora: PlainLoRA) -> dict[str, torch.Tensor]:
    """The safetensors entries of ``lora`` under PEFT's key names."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora.layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.contiguous()
    return tensors


def write_plain_lora(lora: PlainLoRA, directory: Path, base_model_path: str = "", checks: dict | None = None) -> list[str]:
    """Write ``lora`` in PEFT's layout into the existing ``directory``; returns the file names written.

    Args:
        base_model_path: recorded as ``base_model_name_or_path`` (the GPTQ base, when known).
        checks: the weight-level check's summary, recorded in the metadata file.
    """
    directory = Path(directory)
    save_file(peft_tensors(lora), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lora, base_model_path), indent=2) + "\n")
    metadata = {"format_version": PLAIN_LORA_METADATA_VERSION, "kind": "plain LoRA from a QA-LoRA adapter",
                "rank": lora.rank, "alpha": lora.alpha, "dtype": lora.dtype, **lora.provenance}
    if checks is not None:
        metadata["weight_check"] = checks
    (directory / PLAIN_LORA_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS, PLAIN_LORA_METADATA]
