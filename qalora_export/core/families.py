"""The model families the tool supports, defined once: what every verb and format looks up.

A family is a transformers ``model_type`` whose decoder layers hold the same quantized projections
(``model.layers.N.<projection>``). Formats map families to their own architectures (GGUF's
``ArchSpec`` table, the ONNX decoder graph) and refuse the ones they cannot hold; a new family
starts here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The quantized projections of one decoder layer of the LLaMA family, in the order checkpoints
#: store them (module paths under ``model.layers.N``).
LLAMA_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    """One supported ``model_type`` and the projections its decoder layers quantize."""

    model_type: str
    projections: tuple[str, ...] = LLAMA_PROJECTIONS

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The projections' leaf names (``q_proj``, ...), as PEFT's ``target_modules`` lists them."""
        return tuple(p.rsplit(".", 1)[-1] for p in self.projections)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (Family("llama"), Family("mistral"), Family("qwen2"),
                                                          Family("qwen3"))}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
#: Leaf names of every family's projections (the adapter's possible ``target_modules``).
TARGET_MODULES = tuple(dict.fromkeys(m for f in FAMILIES.values() for m in f.target_modules))
