"""The tensors of a GPTQ checkpoint of a supported family computed from ``config.json`` alone (no
weights read): the quantized projections, their biases (Qwen2 q/k/v; LLaMA / Qwen3 when the config
asks), the norms (Qwen3's q/k head norms too), embeddings and the head unless tied
(:mod:`qalora_export.core.families`).

Used to plan a merge (``qalora_export.plan``) and by each format's ``output_bytes``.
"""

from __future__ import annotations

import torch

from qalora_export.core.families import FAMILIES
from qalora_export.core.families import LLAMA_PROJECTIONS as PROJECTIONS
from qalora_export.core.families import head_dim as head_width
from qalora_export.core.packing import packed_length
from qalora_export.storage.safetensors_stream import TensorSpec


def linear_shapes(config: dict) -> list[tuple[str, int, int]]:
    """(module, out, in) of every quantized projection, in layer order."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    head_dim = head_width(config)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    return [(f"model.layers.{i}.{p}", *shapes[p]) for i in range(int(config["num_hidden_layers"])) for p in PROJECTIONS]


def checkpoint_tensors(config: dict, bits: int, group_size: int) -> list[TensorSpec]:
    """Every tensor of a GPTQ checkpoint of this shape (qweight/qzeros/scales/g_idx and the bias, if
    any, per projection; fp16 embeddings, norms and lm_head), in the order the GPTQ export writes them."""
    family = FAMILIES.get(config.get("model_type", "llama"), FAMILIES["llama"])
    biased = family.biased_projections(config)
    specs = []
    for name, out_f, in_f in linear_shapes(config):
        groups = in_f // group_size
        specs += [TensorSpec(f"{name}.qweight", torch.int32, (packed_length(in_f, bits), out_f)),
                  TensorSpec(f"{name}.qzeros", torch.int32, (groups, packed_length(out_f, bits))),
                  TensorSpec(f"{name}.scales", torch.float16, (groups, out_f)),
                  TensorSpec(f"{name}.g_idx", torch.int32, (in_f,))]
        if name.split(".", 3)[3] in biased:
            specs.append(TensorSpec(f"{name}.bias", torch.float16, (out_f,)))
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    floats = [TensorSpec("model.embed_tokens.weight", torch.float16, (vocab, hidden)),
              TensorSpec("model.norm.weight", torch.float16, (hidden,))]
    if not config.get("tie_word_embeddings", False):
        floats.append(TensorSpec("lm_head.weight", torch.float16, (vocab, hidden)))
    for i in range(int(config["num_hidden_layers"])):
        floats += [TensorSpec(f"model.layers.{i}.{norm}.weight", torch.float16, (width,))
                   for norm, width in family.layer_norms(config)]
    return specs + sorted(floats, key=lambda s: s.name)


def quantized_weight_count(config: dict) -> int:
    """Weights of every quantized projection together (``sum(out * in)``)."""
    return sum(out_f * in_f for _, out_f, in_f in linear_shapes(config))


def float_tensor_bytes(config: dict, bits: int, group_size: int) -> int:
    """Bytes of the tensors a GPTQ checkpoint keeps in fp16 (embeddings, norms, ``lm_head``)."""
    quantized = ("qweight", "qzeros", "scales", "g_idx")
    return sum(s.nbytes for s in checkpoint_tensors(config, bits, group_size) if not s.name.endswith(quantized))
