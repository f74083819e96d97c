"""``config.json`` as mlx-lm 0.32 reads it, so that mlx-lm computes the model transformers computes.

mlx-lm builds its ``ModelArgs`` from the top-level keys its dataclass names and silently takes its
own defaults for the rest. transformers 5 writes some of them elsewhere or not at all:

- ``rope_theta`` lives under ``rope_parameters``; mlx-lm, finding no top-level key, runs LLaMA with
  10000 (SmolLM2 needs 100000: logits ~20% off with exact weights) and Qwen2 with 1e6;
- ``rope_scaling`` likewise (its ``rope_type`` decides the RoPE variant);
- ``tie_word_embeddings`` defaults to True in mlx-lm and to False in transformers;
- ``head_dim`` (LLaMA) defaults to ``hidden_size / num_attention_heads``;
- mlx-lm's tools cast float weights to ``torch_dtype`` / ``dtype``: both name the stored dtype.

So every one of them is written explicitly, at the top level. What mlx-lm's graphs cannot compute is
refused (:class:`UnsupportedModelError`), never exported wrong.
"""

from __future__ import annotations

from qalora_export.core.families import FAMILIES
from qalora_export.errors import UnsupportedModelError
from qalora_export.formats.mlx import spec

# transformers' defaults where a config.json leaves a key out (LlamaConfig, MistralConfig, Qwen2Config)
TRANSFORMERS_ROPE_THETA = 10000.0
TRANSFORMERS_TIE_EMBEDDINGS = False


def rope_settings(cfg: dict, source: str = "config.json") -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling or None)`` of a transformers config, whichever version wrote it."""
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in spec.ROPE_TYPES_SUPPORTED:
        raise UnsupportedModelError(
            f"{source}: rope scaling {rope_type!r} is not supported for MLX export (mlx-lm's variant is not "
            f"checked against transformers'); supported: {', '.join(spec.ROPE_TYPES_SUPPORTED)}")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", TRANSFORMERS_ROPE_THETA)))
    scaling = None
    if rope_type != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "type")}
        scaling["rope_type"] = rope_type
    return theta, scaling


def mlx_config(model_config: dict, bits: int, group_size: int, dtype: str,
               layer_group_sizes: dict[str, int] | None = None, meta: dict | None = None,
               source: str = "config.json") -> tuple[dict, list[str]]:
    """The artifact's ``config.json`` and notes on what mlx-lm computes differently.

    Args:
        model_config: the base's ``config.json`` without ``quantization_config``.
        bits, group_size: the ``quantization`` block (``mode: affine``).
        dtype: the stored float dtype (``spec.DTYPES``).
        layer_group_sizes: modules whose group size differs from ``group_size`` (per-layer entries).
        meta: the merge record, stored under ``spec.META_KEY``.
    """
    cfg = {k: v for k, v in model_config.items() if k not in ("quantization_config", "_name_or_path")}
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(f"{source}: model_type {model_type!r} is not supported; supported: "
                                    f"{', '.join(FAMILIES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act={cfg.get('hidden_act')!r}; mlx-lm's {model_type} uses silu")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor={cfg['partial_rotary_factor']} is not supported")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if model_type == "qwen2" and head_dim != hidden // heads:
        raise UnsupportedModelError(
            f"{source}: head_dim={head_dim} differs from hidden_size / num_attention_heads = {hidden // heads}; "
            f"mlx-lm's qwen2 always uses the latter")
    if model_type == "qwen3" and cfg.get("attention_bias"):
        raise UnsupportedModelError(
            f"{source}: attention_bias=true; mlx-lm's qwen3 has no q/k/v/o biases (its loader would refuse the "
            f"weights), so this model cannot be exported to MLX; export gptq, onnx or gguf")
    notes = []
    theta, scaling = rope_settings(cfg, source)
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = scaling
    cfg["head_dim"] = head_dim
    cfg["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", TRANSFORMERS_TIE_EMBEDDINGS))
    cfg["num_key_value_heads"] = int(cfg.get("num_key_value_heads") or heads)
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    window = cfg.get("sliding_window")
    # mlx-lm runs Mistral as llama and Qwen2/Qwen3 with full attention in every layer; transformers
    # windows every Mistral layer, and Qwen layers from max_window_layers on when use_sliding_window
    # is set: exact up to the window
    sliding = cfg.get("use_sliding_window", True) if model_type == "mistral" else cfg.get("use_sliding_window", False)
    if model_type in ("mistral", "qwen2", "qwen3") and window and sliding:
        cfg.pop("layer_types", None)
        notes.append(f"mlx-lm attends over the full context, transformers over sliding_window={window}: "
                     f"outputs agree for sequences up to {window} tokens")
    quantization: dict = {"group_size": group_size, "bits": bits, "mode": spec.MODE}
    for module, gs in sorted((layer_group_sizes or {}).items()):
        quantization[module] = {"group_size": gs, "bits": bits, "mode": spec.MODE}
    cfg["quantization"] = quantization
    # no ``quantization_config`` copy (mlx-lm's save_config writes one): mlx-lm reads ``quantization``
    # first, and a ``quantization_config`` would make the artifact look like a GPTQ checkpoint
    if meta is not None:
        cfg[spec.META_KEY] = meta
    return dict(sorted(cfg.items())), notes
