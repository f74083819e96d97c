"""The ONNX decoder graph for each family's own architecture details, on tiny random models (tiny
vocabulary, seconds to build; the families' real tokenizers are in tests/e2e/test_families_onnx.py):

- Llama 3's scaled rotary frequencies (``rope_type: llama3``) in the cos/sin caches, against
  transformers and against the published formula;
- Qwen3's per-head ``q_norm`` / ``k_norm`` before the rotary embedding, with ``head_dim`` (32)
  unlike ``hidden / heads`` (16), in the packed and the separate q/k/v graph;
- Qwen2's q/k/v biases kept as floats, in the packed q/k/v node and out of it;
- sliding windows: Mistral's on every layer and Qwen2 / Qwen3's ``sliding_attention`` layers, as
  GroupQueryAttention's ``local_window_size``, equal to transformers' mask on prompts longer than
  the window (and different from full attention there, so the check can fail);
- what the graph cannot hold, refused by name; genai's end tokens and pad per family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import UnsupportedModelError
from qalora_export.formats import get_format
from qalora_export.formats.onnx import spec
from qalora_export.formats.onnx.decoder import decoder_config, rotary_caches
from qalora_export.formats.onnx.genai import (END_TOKEN_GROUPS, family_eos, genai_config, prompt_safe_pad,
                                              sentencepiece_specials, special_tokens, tokenizer_adds_bos)

VOCAB = tiny_models.TINY_VOCAB


def make_tiny_family(out: Path, model_type: str, seed: int = 0, **config) -> tuple[Path, Path]:
    """A tiny random ``model_type`` model (hidden 64, 2 layers, 4 heads / 2 kv heads), its 4-bit
    group-32 RTN base and a random rank-4 adapter that moves the logits well above the tolerances.
    Norms and biases are perturbed away from their defaults, so that a dropped one shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qalora_export.quantization.quantize import quantize_model

    float_dir, base, adapter = Path(f"{out}-float"), Path(f"{out}-base"), Path(f"{out}-adapter")
    hf = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                              hidden_act="silu", **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.25 if ("embed" in name or "lm_head" in name) else 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(float_dir))
    tiny_models.make_tokenizer(float_dir, VOCAB)
    quantize_model(float_dir, base, 4, 32, "gptq_v2")
    tiny_models.make_random_adapter(base, adapter, rank=4, alpha=8.0, seed=seed, magnitude=0.15)
    return base, adapter


PROMPT = [int(t) for t in np.random.default_rng(5).integers(4, VOCAB, 21)]


def reference_logits(base: Path, adapter: Path, prompt=PROMPT, **config_overrides) -> np.ndarray:
    """Logits ``[T, V]`` (float64) of the unmerged PyTorch model, with config attributes overridden."""
    from qalora_export.modeling.model import build_model

    model = MergedView.open(base, adapter)
    ref = build_model(model.base, model.adapter)
    for key, value in config_overrides.items():
        setattr(ref.config, key, value)
    with torch.no_grad():
        return ref(torch.tensor([prompt])).logits[0].to(torch.float64).numpy()


def assert_runs_like_pytorch(out: Path, ref: np.ndarray, prompt=PROMPT) -> float:
    """onnxruntime's logits (one pass, and with the KV cache from half the prompt) within the
    runtime tolerances of the reference; returns the max |Δlogit| relative to max |logit|."""
    from qalora_export.formats.onnx.runtime import OrtDecoder

    decoder = OrtDecoder(out, providers=["CPUExecutionProvider"])
    full = decoder.logits(prompt).astype(np.float64)
    kv = decoder.incremental_logits(prompt, prefill=len(prompt) // 2).astype(np.float64)
    scale = float(np.abs(ref).max())
    rel = float(np.abs(full - ref).max()) / scale
    assert rel <= spec.RUNTIME_MAX_DLOGIT_REL, rel
    assert float(np.abs(kv - full).max()) / scale <= spec.RUNTIME_KV_MAX_DLOGIT_REL
    assert (full.argmax(-1) == ref.argmax(-1)).all()
    return rel


def export(base: Path, adapter: Path, out: Path, **options) -> dict:
    return get_format("onnx").export(MergedView.open(base, adapter), out, overwrite=True, **options)


def graph(out: Path):
    import onnx

    return onnx.load(str(out / spec.MODEL_FILE), load_external_data=False)


def initializer(out: Path, name: str) -> np.ndarray:
    from qalora_export.formats.onnx.read import _initializer_array

    proto = graph(out)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    return _initializer_array(tensor, out)


def attribute(node, name: str):
    from onnx import helper

    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


# ----------------------------------------------------------------------------------- Llama 3 rotary

LLAMA3 = {"model_type": "llama", "hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 256, "num_hidden_layers": 2, "vocab_size": 128256, "max_position_embeddings": 131072,
          "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}}


def llama3_inv_freq(head_dim: int, theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """Llama 3's scaled inverse frequencies (Meta's formula), in float64: wavelengths shorter than
    ``original / high`` keep their frequency, longer than ``original / low`` are divided by
    ``factor``, and those between are interpolated linearly in ``original / wavelength``."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelength = 2 * math.pi / inv
    smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv / factor + smooth * inv


def test_llama3_rotary_caches_hold_the_scaled_frequencies():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from qalora_export.modeling.model import hf_config_from

    length = LLAMA3["max_position_embeddings"]
    cos, sin = rotary_caches(LLAMA3, length)
    assert cos.shape == sin.shape == (length, 16) and cos.dtype == np.float32
    rot = LlamaRotaryEmbedding(config=hf_config_from(LLAMA3))  # transformers, bit for bit
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), rot.inv_freq.to(torch.float32))
    np.testing.assert_array_equal(cos, freqs.cos().numpy())
    np.testing.assert_array_equal(sin, freqs.sin().numpy())
    # the published formula, from the caches' angles at position 1
    r = LLAMA3["rope_parameters"]
    expected = llama3_inv_freq(32, r["rope_theta"], r["factor"], r["low_freq_factor"], r["high_freq_factor"],
                               r["original_max_position_embeddings"])
    got = np.arctan2(sin[1].astype(np.float64), cos[1].astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    plain = 1.0 / 500000.0 ** (np.arange(0, 32, 2) / 32)
    assert np.isclose(got[-1], plain[-1] / 8, rtol=1e-6) and np.isclose(got[0], plain[0], rtol=1e-6)
    # and they are not the unscaled frequencies: a graph built without the scaling differs
    unscaled, _ = rotary_caches({**LLAMA3, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, 4096)
    assert np.abs(unscaled - cos[:4096]).max() > 0.5


def test_llama3_export_runs_like_transformers(tmp_path):
    base, adapter = make_tiny_family(tmp_path / "llama3", "llama", rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})  # scaling inside a short prompt
    out = tmp_path / "onnx"
    export(base, adapter, out)
    assert_runs_like_pytorch(out, reference_logits(base, adapter))
    cos = initializer(out, "cos_cache")
    np.testing.assert_array_equal(cos, rotary_caches(json.loads((base / "config.json").read_text()), 256)[0])


# ----------------------------------------------------------------------------------- Qwen3 q/k norms


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3 with head_dim 32 (hidden 64 / 4 heads = 16) and q/k/v/o biases (attention_bias)."""
    return make_tiny_family(tmp_path_factory.mktemp("qwen3") / "m", "qwen3", head_dim=32, attention_bias=True)


@pytest.mark.parametrize("zero_points", ["auto", "split"])
def test_qwen3_norms_q_and_k_per_head_before_rotary(qwen3, tmp_path, zero_points):
    from safetensors import safe_open

    base, adapter = qwen3
    out = tmp_path / zero_points
    export(base, adapter, out, zero_points=zero_points)
    nodes = {n.name: n for n in graph(out).graph.node}
    with safe_open(str(base / "model.safetensors"), "np") as f:
        for i in range(2):
            for which in ("q", "k"):
                norm = nodes[f"/model.layers.{i}/self_attn/{which}_norm/SimplifiedLayerNormalization"]
                weight_name = f"model.layers.{i}.self_attn.{which}_norm.weight"
                assert list(norm.input)[1] == weight_name
                assert initializer(out, weight_name).shape == (32,)  # one weight per head dimension
                np.testing.assert_array_equal(initializer(out, weight_name),
                                              f.get_tensor(weight_name).astype(np.float32))
                assert attribute(norm, "epsilon") == pytest.approx(1e-6)
            gqa = nodes[f"/model.layers.{i}/self_attn/GroupQueryAttention"]
            # q and k reach the attention normed (rotary is inside the op), v as projected
            assert list(gqa.input)[0].startswith(f"/model.layers.{i}/self_attn/q_norm/")
            assert list(gqa.input)[1].startswith(f"/model.layers.{i}/self_attn/k_norm/")
    packed = f"model.layers.0.self_attn.qkv_proj" in nodes
    assert packed == (zero_points == "auto")
    assert_runs_like_pytorch(out, reference_logits(base, adapter))


def test_qwen3_head_dim_is_the_configs(qwen3, tmp_path):
    base, _ = qwen3
    cfg = decoder_config(json.loads((base / "config.json").read_text()))
    assert (cfg.head_dim, cfg.heads, cfg.hidden, cfg.qk_norm) == (32, 4, 64, True)
    config = genai_config(cfg, json.loads((base / "config.json").read_text()))
    assert config["model"]["type"] == "qwen3" and config["model"]["decoder"]["head_size"] == 32


# ----------------------------------------------------------------------------------- Qwen2 biases


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("qwen2") / "m", "qwen2", tie_word_embeddings=True)


def test_qwen2_qkv_biases_stay_float_in_the_packed_node(qwen2, tmp_path):
    from safetensors import safe_open

    base, adapter = qwen2
    out = tmp_path / "auto"
    summary = export(base, adapter, out)
    assert summary["zero_point_form"] == "split"  # the fold is fractional: zero-points only
    nodes = {n.name: n for n in graph(out).graph.node}
    assert "model.layers.0.self_attn.q_proj" not in nodes
    add = nodes["/model.layers.0.self_attn.qkv_proj/BiasAdd"]
    stored = initializer(out, list(add.input)[1])
    with safe_open(str(base / "model.safetensors"), "np") as f:
        expected = np.concatenate([f.get_tensor(f"model.layers.0.self_attn.{m}_proj.bias") for m in "qkv"])
        assert "model.layers.0.self_attn.o_proj.bias" not in f.keys()
    assert stored.dtype == np.float32 and stored.shape == (64 + 32 + 32,)
    np.testing.assert_array_equal(stored, expected.astype(np.float32))  # the base's biases, bit for bit
    assert "/model.layers.0.self_attn.o_proj/BiasAdd" not in nodes
    assert "lm_head" not in nodes and "/lm_head/TransposeTiedEmbedding" in nodes  # tied: the table once
    assert_runs_like_pytorch(out, reference_logits(base, adapter))
    split = tmp_path / "split"
    export(base, adapter, split, zero_points="split")  # separate q/k/v nodes, a bias each
    assert "/model.layers.0.self_attn.k_proj/BiasAdd" in {n.name for n in graph(split).graph.node}
    assert_runs_like_pytorch(split, reference_logits(base, adapter))


def test_packed_node_biases_with_unequal_members():
    """q 256 rows (4 heads of 64), k and v 128 each, biases on q/k/v only or on some: the packed
    bias is the members' side by side, zeros where a member has none."""
    from qalora_export.core.record import QuantizedLinear
    from qalora_export.formats.onnx.encode import encode_linear
    from qalora_export.formats.onnx.pack import pack_linears, packable

    rng = np.random.default_rng(0)

    def record(n, bias):
        return QuantizedLinear(
            name="m", bits=4, group_size=32, codes=torch.from_numpy(rng.integers(0, 16, (n, 128)).astype(np.uint8)),
            scales=torch.from_numpy(rng.uniform(0.01, 0.05, (4, n)).astype(np.float16).astype(np.float32)),
            zeros=torch.from_numpy(rng.integers(0, 16, (4, n)) + rng.normal(0, 0.3, (4, n))),
            g_idx=torch.arange(128) // 32, bias=torch.from_numpy(rng.normal(0, 0.1, n).astype(np.float32)) if bias else None)

    lins = [encode_linear(record(n, b), "auto")[0] for n, b in ((256, True), (128, False), (128, True))]
    assert packable(lins)
    packed = pack_linears(lins)
    assert packed.n == 512 and packed.bias.shape == (512,)
    np.testing.assert_array_equal(packed.bias[:256], lins[0].bias)
    np.testing.assert_array_equal(packed.bias[256:384], np.zeros(128, np.float32))
    np.testing.assert_array_equal(packed.bias[384:], lins[2].bias)


# ----------------------------------------------------------------------------------- sliding windows


def test_mistral_sliding_window_equals_transformers_past_the_window(tmp_path):
    base, adapter = make_tiny_family(tmp_path / "mistral", "mistral", sliding_window=4)
    out = tmp_path / "onnx"
    export(base, adapter, out)
    windows = [attribute(n, "local_window_size") for n in graph(out).graph.node if n.op_type == "GroupQueryAttention"]
    assert windows == [4, 4]
    ref = reference_logits(base, adapter)
    assert_runs_like_pytorch(out, ref)  # a 21-token prompt: 17 positions see a window, not the whole prefix
    full = reference_logits(base, adapter, sliding_window=None)  # the check can fail: the window matters
    assert np.abs(full - ref).max() > 100 * spec.RUNTIME_MAX_DLOGIT_REL * np.abs(ref).max()
    assert np.allclose(full[:4], ref[:4], atol=1e-5)  # and only past it
    pytest.importorskip("onnxruntime_genai")  # genai runs the same window, through its own KV cache
    from qalora_export.formats.onnx.runtime import genai_greedy, torch_greedy
    from qalora_export.modeling.model import build_model

    model = MergedView.open(base, adapter)
    expected, _ = torch_greedy(build_model(model.base, model.adapter), PROMPT, 6, eos=[2])
    assert genai_greedy(out, PROMPT, 6) == [t for t in expected if t != 2]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_sliding_attention_layers_get_their_window(tmp_path, model_type):
    base, adapter = make_tiny_family(tmp_path / model_type, model_type, use_sliding_window=True, sliding_window=5,
                                     max_window_layers=1)  # layer 0 full, layer 1 windowed
    out = tmp_path / "onnx"
    export(base, adapter, out)
    windows = [attribute(n, "local_window_size") for n in graph(out).graph.node if n.op_type == "GroupQueryAttention"]
    assert windows == [-1, 5]
    assert_runs_like_pytorch(out, reference_logits(base, adapter))


@pytest.mark.parametrize(("config", "expected"), [
    ({"model_type": "mistral", "sliding_window": 4096}, (4096, 4096)),
    ({"model_type": "mistral", "sliding_window": None}, (-1, -1)),
    ({"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096}, (-1, -1)),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}, (-1, 64)),
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 64,
      "layer_types": ["sliding_attention", "full_attention"]}, (64, -1)),
    ({"model_type": "llama"}, (-1, -1)),
])
def test_layer_windows_follow_transformers_config(config, expected):
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "num_hidden_layers": 2, "vocab_size": 128}
    assert decoder_config({**base, **config}).layer_windows == expected


# ----------------------------------------------------------------------------------- refusals

BASE_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 128}


@pytest.mark.parametrize(("edit", "named"), [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                          "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}}, "longrope"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
      "layer_types": ["chunked_attention", "full_attention"]}, "layer_types"),
    ({"model_type": "gemma"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_what_the_graph_cannot_hold_is_refused_by_name(edit, named):
    with pytest.raises(UnsupportedModelError, match=named):
        decoder_config({**BASE_CONFIG, **edit})


# ----------------------------------------------------------------------------------- genai tokens


LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                   128008: "<|eom_id|>", 128009: "<|eot_id|>"}
QWEN_SPECIALS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}


@pytest.mark.parametrize(("model_type", "specials", "eos", "expected"), [
    ("llama", LLAMA3_SPECIALS, 128009, [128009, 128001, 128008]),  # Llama 3 config: <|eot_id|> alone
    ("llama", LLAMA3_SPECIALS, [128001, 128009], [128001, 128009, 128008]),
    ("llama", {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}, 2, 2),  # SmolLM2: unchanged
    ("qwen2", QWEN_SPECIALS, 151645, [151645, 151643]),
    ("qwen3", QWEN_SPECIALS, [151645, 151643], [151645, 151643]),
    ("mistral", {0: "<unk>", 1: "<s>", 2: "</s>"}, 2, 2),
    ("qwen2", {}, 151645, 151645),  # no tokenizer to say what the other end token is
])
def test_family_eos_adds_the_familys_other_end_tokens(model_type, specials, eos, expected):
    assert family_eos(model_type, eos, specials) == expected


def test_every_graph_family_has_a_genai_type_and_others_are_refused():
    from qalora_export.formats.onnx.decoder import GRAPH_MODEL_TYPES
    from qalora_export.formats.onnx.genai import GENAI_MODEL_TYPES

    assert set(GENAI_MODEL_TYPES) == set(GRAPH_MODEL_TYPES) >= set(END_TOKEN_GROUPS)
    assert GENAI_MODEL_TYPES == {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
    with pytest.raises(UnsupportedModelError, match="model_type 'phi3'.*llama, mistral, qwen2, qwen3"):
        decoder_config({**BASE_CONFIG, "model_type": "phi3"})


def _sentencepiece_model(path: Path) -> Path:
    """A SentencePiece ``tokenizer.model`` with Llama 2's special pieces and a few normal ones."""
    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    proto = pb.ModelProto()
    for text, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3), ("▁the", 1), ("<0x0A>", 6), ("▁a", 1)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, -1.0, kind
    proto.trainer_spec.vocab_size = 6
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(proto.SerializeToString())
    return path


MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                    "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def test_sentencepiece_only_tokenizer_gives_its_specials_and_an_unk_pad(tmp_path):
    d = _sentencepiece_model(tmp_path / "spm")
    assert sentencepiece_specials(d / "tokenizer.model") == {0: "<unk>", 1: "<s>", 2: "</s>"}
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": MISTRAL_TEMPLATE}))
    assert special_tokens(d) == {0: "<unk>", 1: "<s>", 2: "</s>"}
    # pad = eos </s>: every rendered conversation with an answer holds it ({{ eos_token }}): <unk>
    assert prompt_safe_pad(d, bos=1, eos=2, pad=2, vocab_size=6) == 0
    assert sentencepiece_specials(tmp_path / "missing.model") == {}
    (tmp_path / "bad.model").write_bytes(b"\xff\xff\xff")
    assert sentencepiece_specials(tmp_path / "bad.model") == {}


def test_bos_is_unsafe_only_where_the_tokenizer_adds_it(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps({"post_processor": {"type": "ByteLevel"}}))
    assert not tokenizer_adds_bos(d, {}, 151643)  # Qwen: tokenizer.json says no bos is added
    (d / "tokenizer.json").write_text(json.dumps({"post_processor": {
        "type": "TemplateProcessing", "special_tokens": {"<|begin_of_text|>": {"ids": [128000]}}}}))
    assert tokenizer_adds_bos(d, {}, 128000)
    (d / "tokenizer.json").unlink()
    assert tokenizer_adds_bos(d, {}, 1)  # nothing says: assume it is added
    assert tokenizer_adds_bos(d, {"add_bos_token": True}, 1)
    assert not tokenizer_adds_bos(d, {"add_bos_token": False}, 1)
    assert not tokenizer_adds_bos(d, {}, None)


def test_qwen_pad_endoftext_is_kept_although_it_is_the_configs_bos(tmp_path):
    d = tmp_path / "qwen"
    d.mkdir()
    added = [{"id": i, "content": c, "special": True} for i, c in QWEN_SPECIALS.items()]
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "post_processor": {"type": "ByteLevel"}}))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "chat_template": template}))
    assert prompt_safe_pad(d, bos=151643, eos=[151645, 151643], pad=151643, vocab_size=151936) == 151643
