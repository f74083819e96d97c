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

#: The families (``model_type``) this graph builds; a family the core supports but that is not
#: here is refused, never built as a LLaMA.
GRAPH_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ACTIVATIONS = ("silu",)
#: rope types whose frequencies depend on the sequence length inside the context (transformers
#: switches ``longrope`` between two sets at ``original_max_position_embeddings``); the graph's
#: cos/sin caches hold one set. ``dynamic`` grows only past ``max_position_embeddings``, where the
#: caches end anyway, so it is exact inside the context.
LENGTH_DEPENDENT_ROPE = ("longrope",)
#: Families whose attention normalizes q and k per head (RMSNorm over ``head_dim``, ``q_norm`` /
#: ``k_norm``) before the rotary embedding.
QK_NORM_MODEL_TYPES = ("qwen3",)


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
    layer_windows: tuple  # per layer: GroupQueryAttention's local_window_size (-1: full attention)
    attention_bias: bool
    qk_norm: bool = False  # q_norm / k_norm per head before the rotary embedding (Qwen3)

    @property
    def local_window(self) -> int:
        """The sliding window of every windowed layer (-1: none); see :attr:`layer_windows`."""
        return max(self.layer_windows, default=-1)


def _layer_windows(model_config: dict, num_layers: int) -> tuple:
    """Each layer's attention window as transformers applies it (-1: full causal attention).

    A query at position ``i`` then sees keys ``i - w + 1 .. i`` (transformers' sliding-window
    mask ``kv > q - w``), which is what GroupQueryAttention's ``local_window_size = w`` computes
    (measured equal: tests/unit/formats/onnx/test_onnx_families.py). Mistral windows every layer
    (``sliding_window``); Qwen2 / Qwen3 window the layers ``layer_types`` marks
    ``sliding_attention`` (by default those from ``max_window_layers`` on) when
    ``use_sliding_window`` is set. Read through transformers' own config class, so that its
    defaults and derivations apply.
    """
    mt = model_config.get("model_type")
    if mt == "llama":
        return (-1,) * num_layers
    from qalora_export.modeling.model import hf_config_from

    hf = hf_config_from(model_config)
    window = getattr(hf, "sliding_window", None)
    if not window:
        return (-1,) * num_layers
    if int(window) < 1:
        raise UnsupportedModelError(f"sliding_window {window!r} is not a positive number of tokens")
    if mt == "mistral":  # transformers' Mistral windows every layer, whatever layer_types says
        return (int(window),) * num_layers
    types = list(getattr(hf, "layer_types", None) or ["full_attention"] * num_layers)
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if len(types) != num_layers or unknown:
        raise UnsupportedModelError(
            f"layer_types {types!r}: the ONNX graph holds full_attention and sliding_attention layers, "
            f"one per layer ({num_layers})")
    return tuple(int(window) if t == "sliding_attention" else -1 for t in types)


def decoder_config(model_config: dict) -> DecoderConfig:
    """Check ``config.json`` against what this graph builds; name what is unsupported."""
    mt = model_config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES or mt not in GRAPH_MODEL_TYPES:
        supported = [t for t in GRAPH_MODEL_TYPES if t in SUPPORTED_MODEL_TYPES]
        raise UnsupportedModelError(
            f"model_type {mt!r} has no ONNX decoder graph here; supported: {', '.join(supported)}")
    act = model_config.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported by the ONNX graph (supported: silu)")
    rope = model_config.get("rope_parameters") or model_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if rope_type in LENGTH_DEPENDENT_ROPE:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r}: its frequencies change with the sequence length inside the context "
            f"(transformers switches them at original_max_position_embeddings), but the ONNX graph's rotary "
            f"cos/sin caches hold one set of frequencies; export a model with a static rope type")
    partial = float(rope.get("partial_rotary_factor", model_config.get("partial_rotary_factor", 1.0)) or 1.0) \
        if isinstance(rope, dict) else 1.0
    if partial != 1.0:
        raise UnsupportedModelError(
            f"partial_rotary_factor {partial}: GroupQueryAttention rotates the whole head_dim; a partial "
            f"rotary embedding is not supported by the ONNX graph")
    hidden = int(model_config["hidden_size"])
    heads = int(model_config["num_attention_heads"])
    layers = int(model_config["num_hidden_layers"])
    return DecoderConfig(
        model_type=mt,
        num_layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=int(model_config.get("num_key_value_heads") or heads),
        head_dim=int(model_config.get("head_dim") or hidden // heads),
        intermediate=int(model_config["intermediate_size"]),
        vocab=int(model_config["vocab_size"]),
        rms_eps=float(model_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(model_config.get("tie_word_embeddings", False)),
        context_length=int(model_config.get("max_position_embeddings", 4096)),
        layer_windows=_layer_windows(model_config, layers),
        attention_bias=bool(model_config.get("attention_bias", mt == "qwen2")),
        qk_norm=mt in QK_NORM_MODEL_TYPES,
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
