"""Building the unmerged PyTorch model (quantized base + QA-LoRA layers) from a GPTQ checkpoint.

This model is both what ``train`` optimises and the reference ``verify`` compares every artifact
against. It is a plain transformers model whose quantized projections are replaced by
:class:`QALoRALinear`; everything else (embeddings, norms, lm head) is loaded from the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.core.adapter import QALoRAAdapter
from qalora_export.core.families import SUPPORTED_MODEL_TYPES, TARGET_MODULES  # noqa: F401  (TARGET_MODULES: training's default)
from qalora_export.errors import AdapterError, UnsupportedModelError
from qalora_export.modeling.qalora_linear import QALoRALinear


def check_supported(model_config: dict, source: Path | str) -> None:
    """Refuse architectures other than the supported families (:mod:`qalora_export.core.families`),
    naming what is supported."""
    model_type = model_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(LLaMA, Llama-2/3, SmolLM2, Mistral, Qwen2/2.5, Qwen3)"
        )


def hf_config_from(model_config: dict):
    """A transformers config object from a ``config.json`` dict (quantization fields dropped)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in model_config.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def build_model(base: GPTQCheckpoint | Path | str, adapter: Optional[QALoRAAdapter] = None,
                train_rank: int = 0, train_alpha: float = 0.0, pooling: str = "peft",
                compute_dtype: torch.dtype = torch.float32,
                target_modules: tuple[str, ...] = TARGET_MODULES,
                integer_zero_range: Optional[tuple[int, int]] = None) -> nn.Module:
    """The unmerged model: the base's float tensors plus a :class:`QALoRALinear` per quantized layer.

    Args:
        base: checkpoint reader or directory.
        adapter: trained adapter to load (for verify / evaluation), or None.
        train_rank / train_alpha: create fresh trainable adapters of this rank on ``target_modules``
            (for ``train``); ignored when ``adapter`` is given.
        compute_dtype: float32 on CPU; bfloat16 on GPU for training speed.
        integer_zero_range: train fresh adapters in integer-zero mode with this true-zero range
            (``train --integer-zeros``). A loaded ``adapter`` whose metadata records
            ``integer_zeros`` runs in that mode with its recorded range regardless, so that the
            reference is what was trained (``QALoRAAdapter.integer_zero_range``).

    Returns:
        a ``*ForCausalLM`` in eval mode whose only parameters that require grad are the adapters.
    """
    from transformers import AutoModelForCausalLM

    ckpt = base if isinstance(base, GPTQCheckpoint) else GPTQCheckpoint(base)
    if adapter is not None:
        integer_zero_range = adapter.integer_zero_range
    check_supported(ckpt.model_config, ckpt.directory)
    config = hf_config_from(ckpt.model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")

    modules = dict(model.named_modules())
    for name in ckpt.quantized_modules:
        parent_name, _, child = name.rpartition(".")
        if name not in modules:
            raise UnsupportedModelError(f"{ckpt.directory}: quantized tensor {name} matches no module of {config.model_type}")
        record = ckpt.read_layer(name)
        if adapter is not None:
            layer_adapter = adapter.layers.get(name)
            rank = adapter.rank if layer_adapter is not None else 0
            module = QALoRALinear(record, rank, adapter.alpha, adapter.pooling, compute_dtype,
                                  zero_range=integer_zero_range)
            if layer_adapter is not None:
                if adapter.pool_groups == "consecutive" and record.is_act_order:
                    raise AdapterError(
                        f"{name}: the adapter pools consecutive columns but the base is act-order; "
                        f"its pooled groups are not the quantization groups, so this tool cannot "
                        f"run or fold it (PEFT adapters on desc_act bases are not foldable)"
                    )
                adapter.layer_pool_group_size(name, record.in_features)
                if layer_adapter.pooled_features != record.num_groups:
                    raise AdapterError(
                        f"{name}: adapter has {layer_adapter.pooled_features} pooled features but the "
                        f"base has {record.num_groups} quantization groups; adapters whose pooling "
                        f"group is a multiple of the quantization group size are folded by `merge`, "
                        f"but this runtime supports pooling over the quantization groups only"
                    )
                if tuple(layer_adapter.lora_B.shape) != (record.out_features, adapter.rank):
                    raise AdapterError(f"{name}: lora_B is {tuple(layer_adapter.lora_B.shape)}, expected "
                                       f"({record.out_features}, {adapter.rank})")
                module.load_adapter(layer_adapter)
        else:
            rank = train_rank if child in target_modules else 0
            module = QALoRALinear(record, rank, train_alpha, pooling, compute_dtype,
                                  zero_range=integer_zero_range)
        setattr(modules[parent_name], child, module)

    state = {}
    for key in ckpt.other_tensor_names():
        state[key] = ckpt.read_tensor(key).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise UnsupportedModelError(f"{ckpt.directory}: tensors {unexpected[:3]} match no module of {config.model_type}")
    tied = getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False)
    # Adapter factors are not base tensors: they were initialised or loaded above.
    adapter_params = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, QALoRALinear) and m.rank
                      for p in ("lora_A", "lora_B")}
    real_missing = [k for k in missing if not (tied and k == "lm_head.weight") and "rotary_emb" not in k
                    and k not in adapter_params]
    if real_missing:
        from qalora_export.errors import CheckpointError
        raise CheckpointError(f"{ckpt.directory}: tensors missing from the checkpoint: {real_missing[:5]}")
    if tied:
        model.tie_weights()
    # Non-persistent buffers (rotary inv_freq) were allocated uninitialised by to_empty():
    # rebuild the rotary modules from the config, the way the model's constructor does.
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=child.config))
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, QALoRALinear) and module.rank:
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
    model.eval()
    return model


def qalora_modules(model: nn.Module) -> dict[str, QALoRALinear]:
    """Every QA-LoRA layer of ``model`` that carries an adapter, by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear) and m.rank}
