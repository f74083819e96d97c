"""Tests of qalora_export.formats.gguf.tokenizer: ``tokenizer.ggml.*`` from a Hugging Face fast tokenizer.

The tokenizer is the tiny byte-level BPE of ``gguf_helpers`` (specials ``<|endoftext|>`` 0,
``<|im_start|>`` 1 = BOS, ``<|im_end|>`` 2 = EOS, ``<pad>`` 3, then 256 byte tokens and merges up to
320). Expected values are taken from ``tokenizer.json`` / ``tokenizer_config.json`` directly, and what
the metadata writes into a GGUF is read back with gguf-py's ``GGUFReader``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf_helpers
import pytest
import tiny_models

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import UnsupportedModelError
from qalora_export.formats.gguf.tokenizer import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    TokenizerMetadata,
    pre_tokenizer_name,
    read_tokenizer,
)

VOCAB = gguf_helpers.BPE_VOCAB


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bpe-tok")
    dirs = {}
    for pre in ("smollm", "gpt-2"):
        d = root / pre
        d.mkdir()
        dirs[pre] = gguf_helpers.make_tiny_bpe_tokenizer(d, pre=pre)
    return dirs


@pytest.fixture(scope="module")
def tok_dir(bpe_dirs) -> Path:
    return bpe_dirs["smollm"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _copy(src: Path, dst: Path, edit=None) -> Path:
    """A copy of a tokenizer directory, ``edit(tokenizer_json_dict)`` applied to its tokenizer.json."""
    shutil.copytree(src, dst)
    if edit is not None:
        tok = _json(dst / "tokenizer.json")
        edit(tok)
        (dst / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    return dst


# ----------------------------------------------------------------------------------- what is read


def test_tokens_types_and_merges_in_id_order(tok_dir):
    tj = _json(tok_dir / "tokenizer.json")
    meta = read_tokenizer(tok_dir, VOCAB)
    assert isinstance(meta, TokenizerMetadata)
    assert meta.model == "gpt2" and meta.pre == "smollm" and meta.padded == 0
    assert len(meta.tokens) == len(meta.token_types) == VOCAB

    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    specials = {a["id"]: a["content"] for a in tj["added_tokens"]}
    by_id.update(specials)
    assert sorted(by_id) == list(range(VOCAB))  # the trained vocabulary has no holes
    assert meta.tokens == [by_id[i] for i in range(VOCAB)]
    assert meta.tokens[:4] == gguf_helpers.SPECIALS
    assert meta.token_types == [TOKEN_CONTROL if i in specials else TOKEN_NORMAL for i in range(VOCAB)]
    assert meta.token_types[:4] == [TOKEN_CONTROL] * 4 and set(meta.token_types[4:]) == {TOKEN_NORMAL}

    merges = tj["model"]["merges"]
    assert len(merges) > 10
    assert meta.merges == [" ".join(m) if isinstance(m, list) else m for m in merges]  # in rank order
    for merge in meta.merges:  # every merge joins two tokens into one of the vocabulary
        left, right = merge.split(" ")
        assert left in tj["model"]["vocab"] and right in tj["model"]["vocab"]
        assert left + right in tj["model"]["vocab"]


def test_special_ids_match_tokenizer_config_and_template_is_carried(tok_dir):
    meta = read_tokenizer(tok_dir, VOCAB)
    cfg = _json(tok_dir / "tokenizer_config.json")
    ids = {t: i for i, t in enumerate(meta.tokens)}
    assert meta.special_ids["bos"] == ids[cfg["bos_token"]] == 1
    assert meta.special_ids["eos"] == ids[cfg["eos_token"]] == 2
    assert meta.special_ids["pad"] == ids[cfg["pad_token"]] == 3
    assert meta.special_ids["unk"] == ids[cfg["unk_token"]] == 0
    assert meta.chat_template == gguf_helpers.CHAT_TEMPLATE
    # the tiny tokenizer's post-processor adds nothing when encoding (measured through transformers)
    assert meta.add_bos is False and meta.add_eos is False


def test_token_list_is_padded_to_the_embedding_rows(tok_dir):
    meta = read_tokenizer(tok_dir, VOCAB + 7)
    assert meta.padded == 7 and len(meta.tokens) == len(meta.token_types) == VOCAB + 7
    assert meta.tokens[VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 7)]
    assert meta.token_types[VOCAB:] == [TOKEN_UNUSED] * 7
    assert meta.tokens[:VOCAB] == read_tokenizer(tok_dir, VOCAB).tokens


def test_more_tokens_than_embedding_rows_is_refused(tok_dir):
    match = f"has {VOCAB} tokens but the model's embedding has {VOCAB - 1} rows"
    with pytest.raises(UnsupportedModelError, match=match):
        read_tokenizer(tok_dir, VOCAB - 1)


def test_user_defined_added_tokens_and_holes(tok_dir, tmp_path):
    def edit(tok):
        tok["added_tokens"].append({"id": VOCAB + 2, "content": "<tool>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False})
    d = _copy(tok_dir, tmp_path / "tok", edit)
    meta = read_tokenizer(d, VOCAB + 4)
    assert meta.tokens[VOCAB:] == [f"[PAD{VOCAB}]", f"[PAD{VOCAB + 1}]", "<tool>", f"[PAD{VOCAB + 3}]"]
    assert meta.token_types[VOCAB:] == [TOKEN_UNUSED, TOKEN_UNUSED, TOKEN_USER_DEFINED, TOKEN_UNUSED]
    assert meta.padded == 3


def test_bos_and_eos_added_by_the_post_processor_are_measured(tok_dir, tmp_path):
    def template(*pieces):
        return [{"SpecialToken": {"id": p, "type_id": 0}} if p.startswith("<")
                else {"Sequence": {"id": p, "type_id": 0}} for p in pieces]

    def adds(*single):
        def edit(tok):
            used = [p for p in single if p.startswith("<")]
            tok["post_processor"] = {
                "type": "TemplateProcessing", "single": template(*single), "pair": template(*single, "B"),
                "special_tokens": {p: {"id": p, "ids": [gguf_helpers.SPECIALS.index(p)], "tokens": [p]} for p in used}}
        return edit

    both = read_tokenizer(_copy(tok_dir, tmp_path / "both", adds("<|im_start|>", "A", "<|im_end|>")), VOCAB)
    assert (both.add_bos, both.add_eos) == (True, True)
    bos = read_tokenizer(_copy(tok_dir, tmp_path / "bos", adds("<|im_start|>", "A")), VOCAB)
    assert (bos.add_bos, bos.add_eos) == (True, False)
    assert bos.tokens == both.tokens and bos.merges == both.merges


# ----------------------------------------------------------------------------------- pre-tokenizer


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_pre_tokenizer_of_the_helper_tokenizers(bpe_dirs, pre):
    tj = _json(bpe_dirs[pre] / "tokenizer.json")
    assert pre_tokenizer_name(tj, Path("t.json")) == pre
    assert read_tokenizer(bpe_dirs[pre], VOCAB).pre == pre


def _byte_level(use_regex: bool, add_prefix_space: bool = False) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@pytest.mark.parametrize(("pre", "name"), [
    (_byte_level(True), "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)]},
     "smollm"),
    ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_SPLIT), _byte_level(False)]}, "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [_split(QWEN2_SPLIT), _byte_level(False)]}, "qwen2"),
])
def test_pre_tokenizer_names(pre, name):
    assert pre_tokenizer_name({"pre_tokenizer": pre}, Path("t.json")) == name


@pytest.mark.parametrize(("pre", "match"), [
    (None, "has no pre_tokenizer"),
    (_byte_level(True, add_prefix_space=True), "add_prefix_space=true has no llama.cpp equivalent"),
    (_byte_level(False), "matches none of the llama.cpp pre-tokenizers"),  # no split at all
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, _byte_level(True)]},
     "matches none"),
    ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_SPLIT.replace("{1,3}", "{1,2}")), _byte_level(False)]},
     "matches none"),
    ({"type": "Sequence", "pretokenizers": [_byte_level(True), {"type": "Digits", "individual_digits": True}]},
     "matches none"),  # order matters
    ({"type": "Metaspace", "replacement": "\u2581"}, "matches none"),
])
def test_unknown_pre_tokenizers_are_refused(pre, match):
    with pytest.raises(UnsupportedModelError, match=match) as info:
        pre_tokenizer_name({"pre_tokenizer": pre}, Path("some/tokenizer.json"))
    assert str(info.value).startswith("some/tokenizer.json: ")
    if "matches none" in match:
        assert "(gpt-2, llama-bpe, qwen2, smollm)" in str(info.value)


# ----------------------------------------------------------------------------------- refusals


def test_word_level_tokenizer_is_refused(tmp_path):
    tiny_models.make_tokenizer(tmp_path)
    with pytest.raises(UnsupportedModelError,
                       match=r"tokenizer model 'WordLevel' cannot be expressed in GGUF metadata.*byte-level BPE"):
        read_tokenizer(tmp_path, tiny_models.TINY_VOCAB)


def test_directory_without_tokenizer_json_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"has no tokenizer.json \(nor a SentencePiece tokenizer.model\); GGUF export needs"):
        read_tokenizer(tmp_path, VOCAB)


def _set_model(key, value):
    def edit(tok):
        tok["model"][key] = value
    return edit


@pytest.mark.parametrize(("edit", "match"), [
    (_set_model("byte_fallback", True), r"byte_fallback=true.*tokenizer.ggml.model=llama.*has no tokenizer.model"),
    (_set_model("continuing_subword_prefix", "##"), "subword prefixes/suffixes"),
    (_set_model("end_of_word_suffix", "</w>"), "subword prefixes/suffixes"),
    (lambda tok: tok.update(normalizer={"type": "NFKC"}), "normalizer 'NFKC' is not applied"),
    (lambda tok: tok.update(decoder={"type": "Metaspace", "replacement": "\u2581"}), "decoder 'Metaspace'"),
    (lambda tok: tok.update(pre_tokenizer=None), "has no pre_tokenizer"),
    (lambda tok: tok["model"].update(vocab={}, merges=[]) or tok.update(added_tokens=[]), "empty vocabulary"),
])
def test_tokenizers_llama_cpp_cannot_reproduce_are_refused(tok_dir, tmp_path, edit, match):
    d = _copy(tok_dir, tmp_path / "tok", edit)
    with pytest.raises(UnsupportedModelError, match=match):
        read_tokenizer(d, VOCAB)


def test_nfc_normalizer_is_allowed(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path / "tok", lambda tok: tok.update(normalizer={"type": "NFC"}))
    assert read_tokenizer(d, VOCAB).tokens == read_tokenizer(tok_dir, VOCAB).tokens


def test_unreadable_tokenizer_json_is_refused(tok_dir, tmp_path):
    d = _copy(tok_dir, tmp_path / "tok")
    (d / "tokenizer.json").write_bytes(b'{"model": {"type": "BPE", ')
    with pytest.raises(UnsupportedModelError, match="is not readable JSON"):
        read_tokenizer(d, VOCAB)


# ----------------------------------------------------------------------------------- in a GGUF file


def _fields(path: Path) -> dict:
    from gguf import GGUFReader

    return {k: v.contents() for k, v in GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}


def _expected_fields(meta: TokenizerMetadata) -> dict:
    gguf_names = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    out = {"tokenizer.ggml.model": meta.model, "tokenizer.ggml.pre": meta.pre, "tokenizer.ggml.tokens": meta.tokens,
           "tokenizer.ggml.token_type": meta.token_types, "tokenizer.ggml.merges": meta.merges,
           "tokenizer.ggml.add_bos_token": meta.add_bos, "tokenizer.ggml.add_eos_token": meta.add_eos,
           "tokenizer.ggml.add_space_prefix": False, "tokenizer.chat_template": meta.chat_template}
    out.update({f"tokenizer.ggml.{gguf_names[k]}": v for k, v in meta.special_ids.items()})
    return out


def test_add_to_writes_what_gguf_py_reads_back(tok_dir, tmp_path):
    import gguf

    def edit(tok):  # adds BOS, and a user-defined token past the trained vocabulary
        tok["post_processor"] = {"type": "TemplateProcessing",
                                 "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                            {"Sequence": {"id": "A", "type_id": 0}}],
                                 "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}},
                                          {"Sequence": {"id": "B", "type_id": 1}}],
                                 "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                                      "tokens": ["<|im_start|>"]}}}
        tok["added_tokens"].append({"id": VOCAB, "content": "<tool>", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": False})
    meta = read_tokenizer(_copy(tok_dir, tmp_path / "tok", edit), VOCAB + 3)
    assert meta.add_bos is True and meta.padded == 2
    path = tmp_path / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    meta.add_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    fields = _fields(path)
    assert fields == _expected_fields(meta)
    assert fields["tokenizer.ggml.token_type"][VOCAB:] == [TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_UNUSED]


def test_exported_gguf_carries_the_tokenizer(tmp_path):
    from qalora_export.formats import get_format

    base = gguf_helpers.make_bpe_base(tmp_path / "base", pre="gpt-2")
    out = tmp_path / "m.gguf"
    summary = get_format("gguf").export(MergedView.open(base), out)
    meta = read_tokenizer(base, json.loads((base / "config.json").read_text())["vocab_size"])
    assert summary["tokenizer"]["pre"] == "gpt-2" and summary["tokenizer"]["tokens"] == VOCAB
    assert _fields(out) == _expected_fields(meta)
