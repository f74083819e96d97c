"""The ONNX graph's rotary caches equal what transformers' own ``LlamaRotaryEmbedding`` computes
(``onnx_graph.rotary_caches`` no longer imports the modeling code), bit for bit, for every rope
type the exports meet: default (LLaMA, Mistral, Qwen2 head sizes), linear, llama3, dynamic, yarn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qalora_export.formats.onnx.decoder import rotary_caches
from qalora_export.modeling.model import hf_config_from

BASE = {"model_type": "llama", "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2,
        "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 64, "max_position_embeddings": 256}

ROPES = [
    None,  # the config's own default
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64},
]


def _transformers_caches(config: dict, length: int) -> tuple[np.ndarray, np.ndarray]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rot = LlamaRotaryEmbedding(config=hf_config_from(config))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), rot.inv_freq.to(torch.float32))
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: "none" if r is None else r["rope_type"])
@pytest.mark.parametrize("head_dim", [None, 32])
def test_rotary_caches_equal_transformers(rope, head_dim):
    config = dict(BASE)
    if rope is not None:
        config["rope_parameters"] = rope
    if head_dim is not None:
        config["head_dim"] = head_dim
    cos, sin = rotary_caches(config, 200)
    ref_cos, ref_sin = _transformers_caches(config, 200)
    assert cos.dtype == np.float32 and cos.shape == ref_cos.shape
    np.testing.assert_array_equal(cos, ref_cos)
    np.testing.assert_array_equal(sin, ref_sin)
