"""The ``config.json`` fields llama.cpp needs, checked: what llama.cpp's graph cannot compute is refused
(:class:`UnsupportedModelError`), never exported wrong; llama3 rope frequencies for ``rope_freqs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from qalora_export.errors import UnsupportedModelError
from qalora_export.formats.gguf import spec as spec

# ------------------------------------------------------------------------------ hyperparameters


@dataclass
class HyperParams:
    """The ``config.json`` fields llama.cpp needs, checked: what llama.cpp cannot run is refused."""

    arch: spec.ArchSpec
    n_layer: int
    hidden: int
    intermediate: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    tied: bool
    rope_scaling: Optional[dict] = None
    write_key_length: bool = False  # {arch}.attention.key_length / value_length (ArchSpec.key_length)
    notes: list[str] = field(default_factory=list)


def _int(cfg: dict, key: str, source: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UnsupportedModelError(f"{source}: config field {key}={value!r} must be a positive integer")
    return value


def read_hyperparams(cfg: dict, source: str = "config.json") -> HyperParams:
    """Check a transformers config against what the llama.cpp graph of its architecture computes
    (``spec.ARCHITECTURES``)."""
    model_type = cfg.get("model_type")
    arch = spec.ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} cannot be exported to GGUF by this tool; "
            f"supported: {', '.join(spec.ARCHITECTURES)}")
    graph = f"llama.cpp's {arch.gguf_arch} graph"
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act={cfg.get('hidden_act')!r}; {graph} uses silu")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias=true; this tool writes no MLP biases for {graph}")
    n_head = _int(cfg, "num_attention_heads", source)
    hidden = _int(cfg, "hidden_size", source)
    head_dim = cfg.get("head_dim") or hidden // n_head
    if not arch.free_head_dim and head_dim * n_head != hidden:
        raise UnsupportedModelError(
            f"{source}: head_dim={head_dim} x num_attention_heads={n_head} != hidden_size={hidden}; {graph} "
            f"sizes its attention output projection hidden x hidden, so it cannot run this model")
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in arch.rope_types:
        raise UnsupportedModelError(
            f"{source}: rope scaling {rope_type!r} is not computed by {graph}; "
            f"supported for {model_type}: {', '.join(arch.rope_types)}")
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise UnsupportedModelError(f"{source}: partial_rotary_factor={partial} is not supported ({graph} "
                                    f"rotates the whole head)")
    hp = HyperParams(
        arch=arch, n_layer=_int(cfg, "num_hidden_layers", source), hidden=hidden,
        intermediate=_int(cfg, "intermediate_size", source), n_head=n_head,
        n_head_kv=cfg.get("num_key_value_heads") or n_head, head_dim=int(head_dim),
        context_length=_int(cfg, "max_position_embeddings", source),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        vocab_size=_int(cfg, "vocab_size", source), tied=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
        write_key_length=(cfg.get("head_dim") is not None if arch.key_length == "configured"
                          else head_dim * n_head != hidden),
    )
    window = sliding_window(cfg)
    if window is not None and window < hp.context_length:
        # none of these llama.cpp graphs has sliding-window attention: exact only up to the window
        hp.notes.append(f"context_length limited to sliding_window={window} ({graph} has no sliding-window "
                        f"attention; beyond {window} tokens it would compute a different model)")
        hp.context_length = int(window)
    return hp


def sliding_window(cfg: dict) -> Optional[int]:
    """The sliding window transformers applies to some layer of this config, or None.

    Mistral sets ``sliding_window`` alone; Qwen2/Qwen3 also need ``use_sliding_window`` and apply it
    to the layers ``layer_types`` marks ``sliding_attention``.
    """
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if cfg.get("use_sliding_window") is False:
        return None
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and "sliding_attention" not in layer_types:
        return None
    return window


def llama3_rope_factors(hp: HyperParams) -> np.ndarray:
    """``rope_freqs.weight`` for ``rope_type: llama3`` (float32 ``[head_dim / 2]``), as llama.cpp's converter."""
    rs = hp.rope_scaling or {}
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)
