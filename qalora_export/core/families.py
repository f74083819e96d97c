"""The model families the tool supports, defined once: what every verb and format looks up.

A family is a transformers ``model_type`` whose decoder layers hold the same quantized projections
(``model.layers.N.<projection>``). Formats map families to their own architectures (GGUF's
``ArchSpec`` table, the ONNX decoder graph) and refuse the ones they cannot hold; a new family
starts here.

Besides the projections, a family states the float tensors its decoder layers carry, as transformers
builds them from ``config.json``: which projections have a bias (Qwen2's q/k/v always; LLaMA's and
Qwen3's when ``attention_bias`` / ``mlp_bias`` say so; Mistral's never) and whether attention has
per-head RMS norms (Qwen3's ``q_norm`` / ``k_norm`` over ``head_dim``). Biases and norms stay float
in every format and pass through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The quantized projections of one decoder layer of the LLaMA family, in the order checkpoints
#: store them (module paths under ``model.layers.N``).
LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION_PROJECTIONS = LLAMA_PROJECTIONS[:4]
MLP_PROJECTIONS = LLAMA_PROJECTIONS[4:]
#: Per-head RMS norms of attention (Qwen3), module paths under ``model.layers.N``.
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")


@dataclass(frozen=True)
class Family:
    """One supported ``model_type``: the projections its decoder layers quantize and their float extras.

    Attributes:
        fixed_biases: projections that always have a bias (Qwen2: q/k/v).
        attention_bias_key: the config key that gives q/k/v/o a bias when true (None: never).
        mlp_bias_key: the config key that gives gate/up/down a bias when true (None: never).
        head_norms: whether attention normalises each head's q and k (``q_norm``/``k_norm``).
    """

    model_type: str
    projections: tuple[str, ...] = LLAMA_PROJECTIONS
    fixed_biases: tuple[str, ...] = ()
    attention_bias_key: str | None = None
    mlp_bias_key: str | None = None
    head_norms: bool = False

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The projections' leaf names (``q_proj``, ...), as PEFT's ``target_modules`` lists them."""
        return tuple(p.rsplit(".", 1)[-1] for p in self.projections)

    def biased_projections(self, config: dict) -> tuple[str, ...]:
        """The projections that carry a float bias in a model of this ``config.json``."""
        biased = set(self.fixed_biases)
        if self.attention_bias_key and config.get(self.attention_bias_key):
            biased.update(ATTENTION_PROJECTIONS)
        if self.mlp_bias_key and config.get(self.mlp_bias_key):
            biased.update(MLP_PROJECTIONS)
        return tuple(p for p in self.projections if p in biased)

    def layer_norms(self, config: dict) -> list[tuple[str, int]]:
        """``(module path under model.layers.N, width)`` of every RMS norm of one decoder layer."""
        hidden = int(config["hidden_size"])
        norms = [("input_layernorm", hidden), ("post_attention_layernorm", hidden)]
        if self.head_norms:
            norms += [(name, head_dim(config)) for name in HEAD_NORMS]
        return norms


def head_dim(config: dict) -> int:
    """Attention head width: ``head_dim`` when the config states it (Qwen3, some LLaMA), else
    ``hidden_size / num_attention_heads``."""
    return int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", attention_bias_key="attention_bias", mlp_bias_key="mlp_bias"),
    Family("mistral"),
    Family("qwen2", fixed_biases=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Family("qwen3", attention_bias_key="attention_bias", head_norms=True),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
#: Leaf names of every family's projections (the adapter's possible ``target_modules``).
TARGET_MODULES = tuple(dict.fromkeys(m for f in FAMILIES.values() for m in f.target_modules))
