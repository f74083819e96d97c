"""The decoder's shape read from ``config.json`` (checked: what the graph cannot compute is refused),
and the rotary cos/sin caches GroupQueryAttention reads (the same frequencies transformers uses,
``rope_type`` included)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qalora_export.core.families import SUPPORTED_MODEL_TYPES
from qalora_export.errors import UnsupportedModelError
from qalora_export.formats.onnx import spec as spec

if TYPE_CHECKING:
    import torch

SUPPORTED_ACTIVATIONS = ("silu",)


@dataclass
class DecoderConfig:
    """The shape of a LLaMA-family decoder, read from ``config.json``."""

    model_type: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rms_eps: float
    tie_embeddings: bool
    context_length: int
    local_window: int  # -1: full attention
    attention_bias: bool


def decoder_config(model_config: dict) -> DecoderConfig:
    """Check ``config.json`` against what this graph builds; name what is unsupported."""
    mt = model_config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {mt!r} has no ONNX decoder graph here; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = model_config.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported by the ONNX graph (supported: silu)")
    if mt == "qwen2" and model_config.get("use_sliding_window"):
        raise UnsupportedModelError("qwen2 with use_sliding_window=true (per-layer windows) is not supported "
                                    "by the ONNX graph")
    hidden = int(model_config["hidden_size"])
    heads = int(model_config["num_attention_heads"])
    window = model_config.get("sliding_window") if mt == "mistral" else None
    return DecoderConfig(
        model_type=mt,
        num_layers=int(model_config["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(model_config.get("num_key_value_heads") or heads),
        head_dim=int(model_config.get("head_dim") or hidden // heads),
        intermediate=int(model_config["intermediate_size"]),
        vocab=int(model_config["vocab_size"]),
        rms_eps=float(model_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(model_config.get("tie_word_embeddings", False)),
        context_length=int(model_config.get("max_position_embeddings", 4096)),
        local_window=int(window) if window else -1,
        attention_bias=bool(model_config.get("attention_bias", mt == "qwen2")),
    )


def rotary_caches(model_config: dict, length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin caches float32 ``[length, head_dim / 2]``, computed as transformers does.

    The frequencies and ``attention_scaling`` are those of transformers' ``LlamaRotaryEmbedding``
    (any ``rope_type``: default, llama3, linear, ...; tests/unit/formats/onnx/test_onnx_rotary.py checks
    equality bit for bit); positions and products in float32.
    """
    import torch

    from qalora_export.modeling.model import hf_config_from

    inv_freq, scaling = _rope_parameters(hf_config_from(model_config))
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.to(torch.float32))
    scaling = float(scaling)
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()


def _rope_parameters(config) -> tuple["torch.Tensor", float]:
    """``(inv_freq, attention_scaling)`` as ``LlamaRotaryEmbedding(config)`` computes them, without
    importing transformers' modeling code (2 s of an export): the default rope is its
    ``compute_default_rope_parameters``, every other type transformers' ``ROPE_INIT_FUNCTIONS``."""
    import torch

    rope = config.rope_parameters
    if rope["rope_type"] == "default":
        base = rope["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
