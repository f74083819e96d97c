"""Tests of qalora_export.formats.mlx.spec and .config: MLX's packing against MLX itself, the config.json
mlx-lm reads (rope_theta nested by transformers 5, tie, head_dim), and the layer constraints.

The packing is checked independently with ``mx.quantize`` / ``mx.dequantize`` (MLX's own kernels):
our packing of MLX's codes equals MLX's packed words, MLX dequantizes our packing to ``scale * q + bias``
bit for bit, and our reader (``spec.dequantize``) equals ``mx.dequantize`` bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_export.errors import UnsupportedModelError
from qalora_export.formats.mlx import spec
from qalora_export.formats.mlx.config import mlx_config, rope_settings
from qalora_export.formats.mlx.encode import mlx_constraint

mx = pytest.importorskip("mlx.core")

shapes = st.tuples(st.integers(1, 5), st.integers(1, 4), st.sampled_from(spec.MLX_BITS), st.sampled_from(spec.GROUP_SIZES),
                   st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_our_packing_of_mx_quantize_codes_equals_its_words(case):
    rows, groups, bits, gs, seed = case
    rng = np.random.default_rng(seed)
    w = mx.array(rng.standard_normal((rows, groups * gs)).astype(np.float32))
    words, scales, biases = mx.quantize(w, group_size=gs, bits=bits, mode="affine")
    words = np.array(words)
    codes = spec.unpack_words(words, bits, groups * gs)
    assert codes.max() < 2**bits
    np.testing.assert_array_equal(spec.pack_words(codes, bits), words)
    # our reader decodes MLX's tensors exactly as MLX's kernel does
    ours = spec.dequantize(words, np.array(scales), np.array(biases), bits, gs)
    theirs = np.array(mx.dequantize(mx.array(words), scales, biases, group_size=gs, bits=bits, mode="affine"))
    np.testing.assert_array_equal(ours, theirs)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_mx_dequantize_of_our_packing_is_scale_q_plus_bias(case):
    rows, groups, bits, gs, seed = case
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=(rows, groups * gs), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, size=(rows, groups)).astype(np.float32)
    zeros = rng.uniform(-3, 2**bits + 3, size=(rows, groups))  # folded zeros: fractional, past the range
    biases = (-scales.astype(np.float64) * zeros).astype(np.float32)
    words = spec.pack_words(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (rows, spec.packed_words(groups * gs, bits))
    np.testing.assert_array_equal(spec.unpack_words(words, bits, groups * gs), codes)
    got = np.array(mx.dequantize(mx.array(words), mx.array(scales), mx.array(biases), group_size=gs, bits=bits,
                                 mode="affine"))
    s, b = np.repeat(scales, gs, axis=1), np.repeat(biases, gs, axis=1)
    np.testing.assert_array_equal(got, (s * codes.astype(np.float32)).astype(np.float32) + b)
    exact = np.repeat(scales.astype(np.float64), gs, axis=1) * (codes - np.repeat(zeros, gs, axis=1))
    assert np.abs(got - exact).max() <= spec.WEIGHT_TOLERANCE * max(np.abs(exact).max(), 1e-30) * 4


def test_pack_words_refuses_partial_words():
    with pytest.raises(ValueError, match="whole 32-bit words"):
        spec.pack_words(np.zeros((1, 10), np.uint8), 3)


# ---------------------------------------------------------------------------------------- config

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 128, "rms_norm_eps": 1e-5,
         "hidden_act": "silu", "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}


def test_rope_theta_nested_by_transformers_5_is_written_at_the_top_level():
    cfg, notes = mlx_config(LLAMA, 4, 32, "float32")
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert cfg["tie_word_embeddings"] is False  # transformers' default, not mlx-lm's (True)
    assert cfg["head_dim"] == 16 and cfg["num_key_value_heads"] == 2
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert "quantization_config" not in cfg and notes == []


def test_rope_scaling_and_legacy_top_level_theta():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    theta, scaling = rope_settings({"rope_parameters": llama3})
    assert theta == 500000.0 and scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    assert "rope_theta" not in scaling
    assert rope_settings({"rope_theta": 1234.0}) == (1234.0, None)
    assert rope_settings({}) == (10000.0, None)  # transformers' default, written explicitly


def test_unsupported_models_are_refused():
    with pytest.raises(UnsupportedModelError, match="rope scaling 'yarn'"):
        mlx_config({**LLAMA, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, 4, 32, "float32")
    with pytest.raises(UnsupportedModelError, match="model_type 'gpt2'"):
        mlx_config({**LLAMA, "model_type": "gpt2"}, 4, 32, "float32")
    with pytest.raises(UnsupportedModelError, match="mlx-lm's qwen2 always uses"):
        mlx_config({**LLAMA, "model_type": "qwen2", "head_dim": 32}, 4, 32, "float32")
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        mlx_config({**LLAMA, "hidden_act": "gelu"}, 4, 32, "float32")
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        mlx_config({**LLAMA, "partial_rotary_factor": 0.5}, 4, 32, "float32")


def test_mistral_sliding_window_is_noted_and_per_layer_group_sizes_listed():
    cfg, notes = mlx_config({**LLAMA, "model_type": "mistral", "sliding_window": 4096}, 4, 64, "float16",
                            {"model.layers.0.mlp.down_proj": 128})
    assert "sliding_window=4096" in notes[0]
    assert cfg["quantization"]["model.layers.0.mlp.down_proj"] == {"group_size": 128, "bits": 4, "mode": "affine"}


def test_qwen_families_config_and_refusals():
    qwen3 = {**LLAMA, "model_type": "qwen3", "head_dim": 64, "tie_word_embeddings": True,
             "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "use_sliding_window": False,
             "sliding_window": None, "attention_bias": False}
    cfg, notes = mlx_config(qwen3, 4, 32, "float32")
    assert cfg["head_dim"] == 64 and cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 1e6
    assert notes == []
    with pytest.raises(UnsupportedModelError, match="mlx-lm's qwen3 has no q/k/v/o biases"):
        mlx_config({**qwen3, "attention_bias": True}, 4, 32, "float32")
    # Qwen windows only with use_sliding_window (off by default); mlx-lm attends over everything
    cfg, notes = mlx_config({**qwen3, "model_type": "qwen2", "head_dim": 16, "sliding_window": 4096}, 4, 32,
                            "float32")
    assert notes == []
    cfg, notes = mlx_config({**qwen3, "model_type": "qwen2", "head_dim": 16, "sliding_window": 4096,
                             "use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]},
                            4, 32, "float32")
    assert "sliding_window=4096" in notes[0] and "layer_types" not in cfg


def test_layer_constraints():
    assert mlx_constraint("l", 4, 32, 64, False) is None
    assert "no MLX affine kernel" in mlx_constraint("l", 7, 32, 64, False)
    assert "group size 16" in mlx_constraint("l", 4, 16, 64, False)
    assert "per-row groups" in mlx_constraint("l", 4, 576, 576, False)
    assert "no g_idx" in mlx_constraint("l", 4, 32, 64, True)
