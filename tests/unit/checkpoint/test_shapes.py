"""The checkpoint plan from ``config.json`` alone (``checkpoint/shapes.py``) against the modules
transformers builds for every supported family: projections, their biases, the norms (Qwen3's q/k
head norms), embeddings and head; and the family facts it rests on (``core/families.py``)."""

from __future__ import annotations

import pytest
import torch

from qalora_export.checkpoint.shapes import checkpoint_tensors, linear_shapes
from qalora_export.core.families import FAMILIES, SUPPORTED_MODEL_TYPES, TARGET_MODULES, head_dim

SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100}
CASES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("llama", {"head_dim": 32}),
    ("mistral", {"sliding_window": 16}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {"head_dim": 48, "tie_word_embeddings": True}),
    ("qwen3", {"attention_bias": True}),
]


def config_dict(model_type: str, extra: dict) -> dict:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **SIZES, **extra).to_dict()


@pytest.mark.parametrize("model_type, extra", CASES, ids=[f"{m}-{'-'.join(e) or 'plain'}" for m, e in CASES])
def test_plan_lists_every_tensor_transformers_builds(model_type, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config_dict(model_type, extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SIZES, **extra))
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight")  # stored once, as the embedding
    planned = {s.name: tuple(s.shape) for s in checkpoint_tensors(config, 4, 16)}
    for name, out_f, in_f in linear_shapes(config):
        assert state.pop(f"{name}.weight") == (out_f, in_f)
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            planned.pop(f"{name}.{suffix}")
    assert planned == state  # biases, norms, embeddings, head: names and shapes


def test_family_facts():
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2", "qwen3")
    assert TARGET_MODULES == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    qwen2, qwen3, llama = FAMILIES["qwen2"], FAMILIES["qwen3"], FAMILIES["llama"]
    assert qwen2.biased_projections({}) == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert qwen3.biased_projections({}) == () and FAMILIES["mistral"].biased_projections({"attention_bias": True}) == ()
    assert llama.biased_projections({"mlp_bias": True}) == ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    config = {"hidden_size": 128, "num_attention_heads": 4, "head_dim": 64}
    assert head_dim(config) == 64 and head_dim({"hidden_size": 128, "num_attention_heads": 4}) == 32
    assert qwen3.layer_norms(config) == [("input_layernorm", 128), ("post_attention_layernorm", 128),
                                         ("self_attn.q_norm", 64), ("self_attn.k_norm", 64)]
    assert len(llama.layer_norms(config)) == 2
