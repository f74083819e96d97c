"""GGUF export of tiny QA-LoRA models: weights, metadata, tokenizer, llama.cpp runtime, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import gguf_helpers
import numpy as np
import pytest
import tiny_models
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import (
    ConfigError,
    FormatLimitError,
    OutputExistsError,
    UnsupportedModelError,
)
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import container, spec
from qalora_export.formats.gguf import read as gguf_read
from qalora_export.formats.gguf import runtime as llamacpp
from qalora_export.formats.gguf import spec as gguf_spec_mod
from qalora_export.formats.gguf import verify as gguf_verify

PROMPTS = [[1, 40, 77, 100, 200, 30, 31, 250], [10, 20, 30, 40, 50, 60, 70, 80, 90, 300, 5]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return gguf_helpers.make_bpe_base(tmp_path_factory.mktemp("gguf") / "base")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return tiny_models.make_random_adapter(base, tmp_path_factory.mktemp("gguf-ad") / "adapter")


@pytest.fixture(scope="module")
def merged(base, adapter) -> MergedView:
    return MergedView.open(base, adapter)


@pytest.fixture(scope="module")
def artifact(merged, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gguf-out") / "model.gguf"
    return out, G.export(merged, out)


def _reader(path):
    from gguf import GGUFReader
    return GGUFReader(str(path))


# ------------------------------------------------------------------------------------ weights


def test_summary(artifact):
    path, summary = artifact
    assert summary["format"] == "gguf" and summary["path"] == str(path)
    assert summary["bytes"] == path.stat().st_size
    assert summary["quantized_tensors"] == 2 * 7
    assert 0 < summary["max_m_rounding"] < 1e-3
    assert summary["max_d_rounding"] == 0.0  # checkpoint scales are fp16: d is exact
    assert summary["max_fold_shift"] > 0
    json.dumps(summary)  # JSON-able
    assert not list(path.parent.glob("*.partial"))


def test_weights_equal_effective_weights_within_fp16_rounding_of_m(artifact, merged):
    """Every projection decodes to W_hat + dW; the error is bounded by the fp16 rounding of m."""
    path, _ = artifact
    seen = set()
    for name, w in G.read_weights(path):
        seen.add(name)
        ref = merged.reference_weight(name)
        assert w.dtype == torch.float64 and w.shape == ref.shape
        assert float((w - ref).abs().max()) <= G.weight_tolerance * float(ref.abs().max()) + gguf_spec_mod.WEIGHT_ATOL
        # elementwise: |error| <= half an fp16 ulp of m = -scale * zero' of the element's group
        layer, _ = merged.read_layer(name)
        m = (-(layer.scales.double() * layer.zeros.double()))[layer.g_idx].T  # [out, in]
        half_ulp = np.spacing(np.abs(m.numpy()).astype(np.float16)).astype(np.float64) / 2
        err = (w - layer.dequantize(torch.float64)).abs().numpy()
        assert (err <= half_ulp * (1 + 1e-9) + 1e-12).all(), name
    assert seen == set(merged.quantized_modules)


def test_llama_cpp_c_dequantizer_agrees_with_our_reader(artifact):
    """ggml's own dequantize_row_q4_1 (libggml-base, the code llama.cpp runs) decodes our blocks as we do."""
    from gguf import GGMLQuantizationType

    path, _ = artifact
    n = 0
    for t in _reader(path).tensors:
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            continue
        blocks = np.asarray(t.data)
        ours = spec.dequantize_q4_1(blocks)
        theirs = llamacpp.ggml_dequantize_q4_1(blocks)
        np.testing.assert_array_equal(theirs, ours.astype(np.float32))  # d*q+m: exact in both
        n += 1
    assert n == 14


def test_qk_rows_are_permuted_for_llama_cpp(artifact, merged):
    """The file's attn_q rows are the transformers rows in llama.cpp's interleaved rope order."""
    path, _ = artifact
    blocks = next(t for t in _reader(path).tensors if t.name == "blk.0.attn_q.weight")
    stored = spec.dequantize_q4_1(np.asarray(blocks.data))
    ref = merged.read_layer("model.layers.0.self_attn.q_proj")[0].dequantize(torch.float64).numpy()
    perm = spec.qk_row_permutation(ref.shape[0], 4)
    assert np.abs(stored - ref[perm]).max() < 1e-3
    assert np.abs(stored - ref).max() > 1e-2  # it really moved


def test_f32_reference_holds_the_unmerged_weights(merged, tmp_path):
    out = tmp_path / "ref.gguf"
    summary = G.export(merged, out, weights_dtype="f32", embeddings="f32")
    assert summary["quantized_tensors"] == 0
    for name, w in G.read_weights(out):
        ref = merged.reference_weight(name)
        torch.testing.assert_close(w, ref.to(torch.float32).to(torch.float64), rtol=0, atol=0)
    assert gguf_read.read_file_types(out) == ("f32", "f32")


# ----------------------------------------------------------------------------------- metadata


def test_metadata_and_tokenizer(artifact, base):
    path, _ = artifact
    r = _reader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    cfg = json.loads((base / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == 3
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["llama.context_length"] == cfg["max_position_embeddings"]
    assert f["llama.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert f["llama.vocab_size"] == cfg["vocab_size"]
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    assert len(f["tokenizer.ggml.tokens"]) == cfg["vocab_size"]
    assert f["tokenizer.ggml.tokens"][:3] == gguf_helpers.SPECIALS[:3]
    assert f["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3] and f["tokenizer.ggml.token_type"][10] == 1
    assert len(f["tokenizer.ggml.merges"]) > 10
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.chat_template"] == gguf_helpers.CHAT_TEMPLATE
    assert f["tokenizer.ggml.add_bos_token"] is False
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["token_embd.weight"] == "F16" and types["output.weight"] == "F16"  # untied base
    assert types["blk.1.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.1.ffn_down.weight"] == "Q4_1"
    assert len(types) == 2 * 9 + 3


TEXTS = ["the quick brown fox jumps over 12345 lazy dogs, it's 3.14!", "  two  spaces\n\nnew lines\tand tabs",
         "unknown wörds: naïve café 東京 🚀", "<|im_start|>user\nhello<|im_end|>"]


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_llama_cpp_tokenizes_like_transformers(tmp_path, pre):
    from transformers import AutoTokenizer

    base = gguf_helpers.make_bpe_base(tmp_path / "base", pre=pre)
    out = tmp_path / "m.gguf"
    assert G.export(MergedView.open(base), out)["tokenizer"]["pre"] == pre
    hf = AutoTokenizer.from_pretrained(str(base))
    for text in TEXTS:
        assert llamacpp.tokenize(out, text, parse_special=True) == hf(text, add_special_tokens=False)["input_ids"], text


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    base = gguf_helpers.make_bpe_base(tmp_path / "base", tie_embeddings=True)
    out = tmp_path / "tied.gguf"
    G.export(MergedView.open(base), out)
    names = {t.name for t in _reader(out).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    [logits] = llamacpp.run_logits(out, PROMPTS[:1])
    assert logits.shape == (len(PROMPTS[0]), gguf_helpers.BPE_VOCAB)


@pytest.mark.parametrize("embeddings,ggml", [("f32", "F32"), ("q8_0", "Q8_0")])
def test_embedding_types(merged, tmp_path, embeddings, ggml):
    out = tmp_path / "e.gguf"
    G.export(merged, out, embeddings=embeddings)
    types = {t.name: t.tensor_type.name for t in _reader(out).tensors}
    assert types["token_embd.weight"] == ggml and types["output.weight"] == ggml
    assert gguf_read.read_file_types(out) == ("q4_1", embeddings)
    assert np.isfinite(llamacpp.run_logits(out, PROMPTS[:1])[0]).all()


# ------------------------------------------------------------------------------------ runtime


def test_runtime_within_llama_cpp_noise_floor(merged, artifact, tmp_path):
    path, _ = artifact
    result = gguf_verify.verify_runtime(merged, path, PROMPTS, tmp_path, n_new=4)
    assert result["passed"], result
    art, floor, f32 = result["artifact"], result["floor"], result["f32_reference"]
    assert art["mean_kl"] <= spec.KL_FLOOR_FACTOR * floor["mean_kl"] + spec.KL_EPSILON
    assert f32["mean_kl"] < 1e-5 and f32["top1_agreement"] == 1.0  # no quantization: graph matches
    assert art["top1_agreement"] >= 0.8 and art["positions"] == sum(map(len, PROMPTS))
    assert len(art["per_prompt"]) == 2 and len(art["per_prompt"][0]["greedy_test"]) == 4
    assert not list(tmp_path.glob("*.gguf"))  # references are removed
    json.dumps(result)


def test_runtime_detects_a_wrong_fold(merged, base, tmp_path):
    """A GGUF of the base *without* the adapter must fail against base + adapter."""
    from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter

    strong = QALoRAAdapter(
        layers={n: AdapterLayer(l.lora_A * 6, l.lora_B * 6) for n, l in merged.adapter.layers.items()},
        rank=merged.adapter.rank, alpha=merged.adapter.alpha, pooling=merged.adapter.pooling,
        pool_group_size=merged.adapter.pool_group_size, pool_groups=merged.adapter.pool_groups)
    model = MergedView(merged.base, strong, check_fingerprint=False)
    wrong = tmp_path / "base-only.gguf"
    G.export(MergedView(merged.base, None), wrong)
    result = gguf_verify.verify_runtime(model, wrong, PROMPTS, tmp_path / "w", n_new=2)
    assert not result["passed"]
    assert result["artifact"]["mean_kl"] > result["allowed_mean_kl"]


def test_greedy_and_logits_agree(artifact):
    path, _ = artifact
    [logits] = llamacpp.run_logits(path, PROMPTS[:1])
    assert logits.dtype == np.float32
    assert llamacpp.greedy(path, PROMPTS[0], 3)[0] == int(logits[-1].argmax())


def _edit_config(base: Path, dst: Path, **changes) -> Path:
    import shutil
    shutil.copytree(base, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _f32_kl(model: MergedView, tmp_path: Path) -> float:
    from qalora_export.runtimes.compare import compare_logits

    out = tmp_path / "f32.gguf"
    G.export(model, out, weights_dtype="f32", embeddings="f32", overwrite=True)
    (ref, _), _ = gguf_verify._torch_references(model, PROMPTS, 0, base_too=False)
    return compare_logits(ref, llamacpp.run_logits(out, PROMPTS)).mean_kl


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
])
def test_rope_scaling_matches_transformers(base, tmp_path, rope):
    scaled = _edit_config(base, tmp_path / "scaled", rope_parameters=rope)
    assert _f32_kl(MergedView.open(scaled), tmp_path) < 1e-6


def test_mistral_runs_as_llama(base, tmp_path):
    mistral = _edit_config(base, tmp_path / "mistral", model_type="mistral", sliding_window=None,
                           architectures=["MistralForCausalLM"])
    assert _f32_kl(MergedView.open(mistral), tmp_path) < 1e-6


# ----------------------------------------------------------------------------------- refusals


def test_refuses_existing_output_without_overwrite(merged, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        G.export(merged, out)
    assert out.read_bytes() == b"keep me"
    G.export(merged, out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_no_partial_file_when_a_layer_fails(merged, tmp_path, monkeypatch):
    calls = []

    def failing(name, **kwargs):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return MergedView.read_layer(merged, name, **kwargs)

    monkeypatch.setattr(merged, "read_layer", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        G.export(merged, tmp_path / "y.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,match", [
    ({"act_order": True}, "act-order"),
    ({"group_size": 16}, "multiple of 32"),
    ({"bits": 8}, "Q8_0 is symmetric"),
])
def test_refuses_what_q4_1_cannot_hold(tmp_path, kwargs, match):
    base = gguf_helpers.make_bpe_base(tmp_path / "base", **kwargs)
    with pytest.raises(FormatLimitError, match=match):
        G.export(MergedView.open(base), tmp_path / "z.gguf")
    assert not (tmp_path / "z.gguf").exists() and not list(tmp_path.glob(".z.gguf*"))


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_codes_fit_q4_1(tmp_path, bits):
    base = gguf_helpers.make_bpe_base(tmp_path / "base", bits=bits)
    model = MergedView.open(base, tiny_models.make_random_adapter(base, tmp_path / "ad"))
    G.export(model, tmp_path / "low.gguf")
    for name, w in G.read_weights(tmp_path / "low.gguf"):
        ref = model.reference_weight(name)
        assert float((w - ref).abs().max()) <= G.weight_tolerance * float(ref.abs().max()) + gguf_spec_mod.WEIGHT_ATOL


def test_refuses_unsupported_architecture_and_rope(base, tmp_path):
    gemma = _edit_config(base, tmp_path / "gemma", model_type="gemma2")
    with pytest.raises(UnsupportedModelError, match="model_type 'gemma2'.*supported: llama, mistral, qwen2, qwen3"):
        G.export(MergedView.open(gemma), tmp_path / "g.gguf")
    yarn = _edit_config(base, tmp_path / "yarn", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                  "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="rope scaling 'yarn'"):
        G.export(MergedView.open(yarn), tmp_path / "y.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_refuses_tokenizer_gguf_cannot_express(tmp_path):
    base = tiny_models.make_tiny_base(tmp_path / "wordlevel")  # WordLevel tokenizer
    with pytest.raises(UnsupportedModelError, match="WordLevel"):
        G.export(MergedView.open(base), tmp_path / "w.gguf")
    assert not (tmp_path / "w.gguf").exists()


def test_refuses_bad_options(merged, tmp_path):
    with pytest.raises(ConfigError, match="--embeddings"):
        G.export(merged, tmp_path / "a.gguf", embeddings="q4_0")
    with pytest.raises(ConfigError, match="weights_dtype"):
        G.export(merged, tmp_path / "a.gguf", weights_dtype="q5_1")


def test_header_scan_matches_gguf_py(artifact, smollm2_gguf):
    """The header-only tensor-type scan used by verify agrees with gguf-py's full reader."""
    for path in (artifact[0], smollm2_gguf):
        assert container.scan_tensor_types(path) == {t.name: int(t.tensor_type) for t in _reader(path).tensors}
    with pytest.raises(ValueError, match="not a GGUF"):
        container.scan_tensor_types(Path(__file__))


def test_attention_biases_are_permuted_like_rows(tmp_path):
    """LLaMA with attention_bias: q/k biases take the rows' permutation; llama.cpp then matches transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qalora_export.quantization.quantize import quantize_model

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=gguf_helpers.BPE_VOCAB, max_position_embeddings=256,
                      attention_bias=True, rms_norm_eps=1e-5)
    net = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    net.save_pretrained(str(tmp_path / "float"))
    quantize_model(tmp_path / "float", tmp_path / "base", 4, 32, "gptq_v2")
    gguf_helpers.make_tiny_bpe_tokenizer(tmp_path / "base")
    model = MergedView.open(tmp_path / "base")
    assert "model.layers.0.self_attn.q_proj.bias" in model.base.tensor_files
    assert _f32_kl(model, tmp_path) < 1e-6
    out = tmp_path / "q.gguf"
    G.export(model, out)
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(container.scan_tensor_types(out))
