"""GGUF architectures beyond LLaMA and SentencePiece tokenizers, on tiny models (seconds each):

- qwen2 (no q/k permutation, q/k/v biases) and qwen3 (q/k norms, head_dim != hidden / heads) written
  with the keys and tensors llama.cpp's graph for them loads, run in llama.cpp against PyTorch;
- what those graphs cannot compute is refused, naming it (``UnsupportedModelError``);
- a SentencePiece ``tokenizer.model`` written as ``tokenizer.ggml.model = "llama"`` (pieces, scores,
  types, added tokens, the dummy prefix), tokenized by llama.cpp as SentencePiece tokenizes it; and
  SentencePiece models llama.cpp cannot reproduce refused.

The real families (full vocabularies, against llama.cpp's own converter) are in
tests/e2e/test_families_gguf.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf_helpers
import pytest
import tiny_models

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import MissingExtraError, UnsupportedModelError
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import verify as gguf_verify
from qalora_export.formats.gguf.hparams import read_hyperparams
from qalora_export.formats.gguf.tokenizer import read_tokenizer
from qalora_export.formats.gguf.tokenizer_spm import ADDED_TOKEN_SCORE, PAD_SCORE

pytest.importorskip("sentencepiece")

PROMPTS = [[1, 5, 77, 130, 200, 9, 31, 64], [1, 300, 12, 12, 250, 4]]


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def _edit_config(base: Path, dst: Path, **changes) -> Path:
    shutil.copytree(base, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory) -> Path:
    return gguf_helpers.make_arch_base(tmp_path_factory.mktemp("qwen2") / "base", "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def qwen3_base(tmp_path_factory) -> Path:
    return gguf_helpers.make_arch_base(tmp_path_factory.mktemp("qwen3") / "base", "qwen3", head_dim=32)


# ------------------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_architectures_run_in_llama_cpp_like_pytorch(family, qwen2_base, qwen3_base, tmp_path):
    base = {"qwen2": qwen2_base, "qwen3": qwen3_base}[family]
    model = MergedView.open(base, tiny_models.make_random_adapter(base, tmp_path / "adapter", magnitude=0.15))
    out = tmp_path / "m.gguf"
    summary = G.export(model, out)
    assert summary["architecture"] == family
    fields = _fields(out)
    assert fields["general.architecture"] == family
    # the keys llama.cpp's converter writes for these architectures, and no others
    assert f"{family}.vocab_size" not in fields and f"{family}.rope.dimension_count" not in fields
    if family == "qwen3":  # config.json names head_dim (32, not 64 / 4): key and value length say so
        assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == 32
    else:
        assert "qwen2.attention.key_length" not in fields
    for name, w in G.read_weights(out):  # no q/k permutation to undo: rows as in the checkpoint
        ref = model.reference_weight(name)
        assert float((w - ref).abs().max()) <= G.weight_tolerance * float(ref.abs().max()) + 2.0 ** -24, name
    result = gguf_verify.verify_runtime(model, out, PROMPTS, tmp_path / "verify", n_new=4)
    assert result["passed"], {k: result[k] for k in ("rule", "allowed_mean_kl", "kl_over_floor")}
    assert result["f32_reference"]["mean_kl"] < 1e-4  # biases, norms and head_dim as transformers computes them
    assert result["adapter_effect"]["mean_kl"] > 20 * result["allowed_mean_kl"]


def test_qwen3_norms_and_qwen2_biases_are_written_as_float32(qwen2_base, qwen3_base, tmp_path):
    from gguf import GGUFReader

    G.export(MergedView.open(qwen2_base), tmp_path / "q2.gguf")
    G.export(MergedView.open(qwen3_base), tmp_path / "q3.gguf")
    q2 = {t.name: t for t in GGUFReader(str(tmp_path / "q2.gguf")).tensors}
    q3 = {t.name: t for t in GGUFReader(str(tmp_path / "q3.gguf")).tensors}
    assert {f"blk.0.attn_{p}.bias" for p in "qkv"} <= set(q2) and "output.weight" not in q2  # tied
    assert all(q2[f"blk.1.attn_{p}.bias"].tensor_type.name == "F32" for p in "qkv")
    assert q3["blk.0.attn_q_norm.weight"].tensor_type.name == "F32"
    assert list(q3["blk.0.attn_k_norm.weight"].shape) == [32]
    assert not any(".bias" in n for n in q3)


def test_what_qwen_graphs_cannot_compute_is_refused(qwen2_base, qwen3_base, tmp_path):
    wide = _edit_config(qwen2_base, tmp_path / "wide", head_dim=32)  # 4 x 32 != 64
    with pytest.raises(UnsupportedModelError, match="head_dim=32 x num_attention_heads=4 != hidden_size=64; "
                                                    "llama.cpp's qwen2 graph"):
        G.export(MergedView.open(wide), tmp_path / "w.gguf")
    llama3_rope = _edit_config(qwen2_base, tmp_path / "rope", rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="rope scaling 'llama3' is not computed by llama.cpp's qwen2 graph"):
        G.export(MergedView.open(llama3_rope), tmp_path / "r.gguf")
    # q/k norms on an architecture without them: a tensor llama.cpp's llama graph has no place for
    as_llama = _edit_config(qwen3_base, tmp_path / "as-llama", model_type="llama")
    with pytest.raises(UnsupportedModelError,
                       match=r"self_attn\.[qk]_norm\.weight has no equivalent in llama.cpp's llama graph"):
        G.export(MergedView.open(as_llama), tmp_path / "l.gguf")
    # qwen3 without its norms (a qwen2 checkpoint relabelled)
    no_norms = _edit_config(qwen2_base, tmp_path / "no-norms", model_type="qwen3")
    with pytest.raises(UnsupportedModelError, match=r"qwen3 graph needs blk\.N\.attn_q_norm\.weight in every layer"):
        G.export(MergedView.open(no_norms), tmp_path / "n.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_qwen3_output_projection_bias_is_refused(tmp_path):
    base = gguf_helpers.make_arch_base(tmp_path / "base", "qwen3", attention_bias=True)
    with pytest.raises(UnsupportedModelError, match=r"o_proj\.bias: llama.cpp's qwen3 graph has no bias for this "
                                                    r"projection \(it adds biases to q_proj, k_proj, v_proj\)"):
        G.export(MergedView.open(base), tmp_path / "b.gguf")


def _cfg(model_type: str, **fields) -> dict:
    cfg = dict(model_type=model_type, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, intermediate_size=128, max_position_embeddings=1024, vocab_size=320)
    cfg.update(fields)
    return cfg


@pytest.mark.parametrize(("cfg", "context", "noted"), [
    (_cfg("mistral", sliding_window=256), 256, True),
    (_cfg("mistral", sliding_window=None), 1024, False),
    (_cfg("mistral", sliding_window=4096), 1024, False),  # wider than the context: nothing to limit
    (_cfg("qwen2", sliding_window=256, use_sliding_window=False), 1024, False),  # Qwen's flag is off
    (_cfg("qwen2", sliding_window=256, use_sliding_window=True,
          layer_types=["full_attention", "sliding_attention"]), 256, True),
    (_cfg("qwen3", sliding_window=256, use_sliding_window=True, layer_types=["full_attention"] * 2), 1024, False),
])
def test_sliding_window_limits_the_context_length(cfg, context, noted):
    hp = read_hyperparams(cfg)
    assert hp.context_length == context
    assert bool(hp.notes) is noted and (not noted or "no sliding-window attention" in hp.notes[0])


@pytest.mark.parametrize(("cfg", "written"), [
    (_cfg("llama", head_dim=16), False),  # llama: only where head_dim differs (existing files unchanged)
    (_cfg("llama", head_dim=32), True),
    (_cfg("qwen2"), False),  # the converter writes them when config.json names head_dim
    (_cfg("qwen2", head_dim=16), True),
    (_cfg("qwen3", head_dim=16), True),
])
def test_key_length_is_written_as_the_converter_writes_it(cfg, written):
    assert read_hyperparams(cfg).write_key_length is written


# ------------------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    return gguf_helpers.write_tiny_spm(tmp_path_factory.mktemp("spm"))


def test_sentencepiece_pieces_scores_and_types(spm_dir):
    proto = gguf_helpers.tiny_spm_proto()
    n = len(proto.pieces)
    meta = read_tokenizer(spm_dir, n + 5)
    assert (meta.model, meta.pre, meta.merges, meta.padded) == ("llama", "default", [], 5)
    assert meta.tokens[:n] == [p.piece for p in proto.pieces]
    assert meta.scores[:n] == [p.score for p in proto.pieces]
    assert meta.token_types[:3] == [2, 3, 3] and set(meta.token_types[3:259]) == {6}
    assert set(meta.token_types[259:n]) == {1}
    assert meta.tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 5)] and meta.scores[n:] == [PAD_SCORE] * 5
    assert set(meta.token_types[n:]) == {5}
    assert meta.special_ids == {"bos": 1, "eos": 2, "unk": 0}
    assert meta.add_bos is True and meta.add_eos is False and meta.add_space_prefix is True
    assert "[INST]" in meta.chat_template


def test_sentencepiece_added_tokens_and_prefix_space(tmp_path):
    n = len(gguf_helpers.tiny_spm_proto().pieces)
    d = gguf_helpers.write_tiny_spm(tmp_path, config={
        "add_prefix_space": False,
        "added_tokens_decoder": {"1": {"content": "<s>", "special": True},
                                 str(n): {"content": "[INST]", "special": True},
                                 str(n + 1): {"content": "\u2581tool", "special": False},
                                 str(n + 2): {"content": "<|im_end|>", "special": False}}})
    (d / "added_tokens.json").write_text(json.dumps({"<extra>": n + 3}))
    meta = read_tokenizer(d, n + 4)
    assert meta.tokens[n:] == ["[INST]", " tool", "<|im_end|>", "<extra>"]  # user-defined: a space, not ▁
    assert meta.token_types[n:] == [3, 4, 3, 4]  # <|...|> is a control token whatever the config says
    assert meta.scores[n:] == [ADDED_TOKEN_SCORE] * 4 and meta.scores[1] == ADDED_TOKEN_SCORE
    assert meta.token_types[1] == 3 and meta.padded == 0
    assert meta.add_space_prefix is False  # tokenizer_config's add_prefix_space wins over the model's


@pytest.mark.parametrize(("override", "match"), [
    ({"trainer_spec.model_type": 1}, "is not BPE"),
    ({"normalizer_spec.name": "nmt_nfkc"}, "normalizer 'nmt_nfkc' rewrites text"),
    ({"normalizer_spec.remove_extra_whitespaces": True}, "remove_extra_whitespaces=true collapses spaces"),
    ({"normalizer_spec.escape_whitespaces": False}, "escape_whitespaces=false"),
    ({"trainer_spec.treat_whitespace_as_suffix": True}, "treat_whitespace_as_suffix=true"),
    ({"trainer_spec.byte_fallback": False}, "byte_fallback=false"),
])
def test_sentencepiece_models_llama_cpp_cannot_reproduce_are_refused(tmp_path, override, match):
    d = gguf_helpers.write_tiny_spm(tmp_path, proto=gguf_helpers.tiny_spm_proto(**override))
    with pytest.raises(UnsupportedModelError, match=f"cannot be written as a llama.cpp tokenizer: .*{match}"):
        read_tokenizer(d, gguf_helpers.SPM_VOCAB)


def test_sentencepiece_file_problems(spm_dir, tmp_path, monkeypatch):
    with pytest.raises(UnsupportedModelError, match=f"has {gguf_helpers.SPM_VOCAB} tokens but the model's embedding"):
        read_tokenizer(spm_dir, gguf_helpers.SPM_VOCAB - 1)
    # a tokenizer.model that is no SentencePiece model (Llama-3 ships a tiktoken file by that name)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(UnsupportedModelError, match="is not a readable SentencePiece model"):
        read_tokenizer(bad, 320)
    gguf_helpers.make_tiny_bpe_tokenizer(bad, pre="gpt-2")  # ... next to a tokenizer.json: that one is read
    assert read_tokenizer(bad, gguf_helpers.BPE_VOCAB).model == "gpt2"
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'qalora-export\[sentencepiece\]'"):
        read_tokenizer(spm_dir, gguf_helpers.SPM_VOCAB + 1)


def test_llama_cpp_tokenizes_a_sentencepiece_gguf_as_sentencepiece(tmp_path):
    """A Mistral base with the tiny SentencePiece model: llama.cpp's tokens of the exported file are
    SentencePiece's own (legacy behaviour: the dummy prefix also after special tokens)."""
    import sentencepiece as spm

    from qalora_export.formats.gguf.runtime import tokenize_cases

    base = gguf_helpers.make_arch_base(tmp_path / "base", "mistral", tokenizer="spm", sliding_window=None)
    out = tmp_path / "m.gguf"
    G.export(MergedView.open(base), out)
    sp = spm.SentencePieceProcessor(model_proto=gguf_helpers.tiny_spm_proto().SerializeToString())
    texts = ["the quick brown fox", " the  lazy dog\n", "Zebra é 🦙 weight-group/scale", "", "  ", "modelmodel"]
    got = tokenize_cases(out, [{"text": t} for t in texts] + [{"text": "<s>the fox</s>", "parse_special": True},
                                                             {"text": "the dog", "add_special": True}])
    assert got["ids"][:len(texts)] == [sp.encode(t) for t in texts]
    assert got["ids"][len(texts)] == [1] + sp.encode("the fox") + [2]
    assert got["ids"][-1] == [1] + sp.encode("the dog")
    assert got["vocab"]["type"] == 1 and got["vocab"]["add_bos"] is True and got["vocab"]["bos"] == 1
