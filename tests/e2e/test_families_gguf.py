"""GGUF export of the model families people fine-tune (``tests/family_models.py``: Llama 3 with llama3
rope scaling and an untied head, Mistral with a sliding window and a SentencePiece ``tokenizer.model``,
Qwen2 with q/k/v biases and tied embeddings, Qwen3 with q/k norms and head_dim 64 != 128 / 4), each
with its real full vocabulary and chat template, against two oracles:

- **llama.cpp's own converter** (``convert_hf_to_gguf.py`` of the llama-cpp-python sdist, on the same
  float model): every metadata key and value of our file equals its file's, tokenizer arrays
  included, except quantization and provenance keys and the differences listed in
  :data:`ALLOWED_DIFFERENCES`, each with the reason llama.cpp reads both files the same; and
  llama.cpp tokenizes its own tokenizer test strings (``models/ggml-vocab-*.gguf.inp``, with the
  token ids it expects in ``.out``) and rendered chat prompts identically with both files, and makes
  the same special tokens and BOS/EOS/SEP flags of them;
- **the unmerged PyTorch model** (base + adapter): the merged GGUF passes verify's runtime level in
  llama.cpp (mean KL within 3x llama.cpp's own floor), greedy continuations equal, and the adapter
  moves the reference far beyond the allowed KL, so the gate can fail.

Agreement of llama.cpp's tokenization with transformers' is measured too (docs/gguf.md). Each
family's model is built once per session (``family_model``), exported and converted once per module;
each GGUF is loaded once in llama.cpp for all its tokenizations (vocab only).
"""

from __future__ import annotations

import json
from pathlib import Path

import family_models
import gguf_helpers
import pytest

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import container
from qalora_export.formats.gguf import verify as gguf_verify
from qalora_export.formats.gguf.runtime import tokenize_cases

pytest.importorskip("llama_cpp")
pytest.importorskip("sentencepiece")  # llama.cpp's converter and our SentencePiece reader

FAMILIES = family_models.FAMILY_NAMES
#: llama.cpp's tokenizer test files (models/ggml-vocab-<name>.gguf.inp/.out) of each family's vocabulary
VOCAB_TESTS = {"llama3": "llama-bpe", "mistral": "llama-spm", "qwen2": "qwen2", "qwen3": "qwen2"}

#: Chat conversations rendered with each family's own template.
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
    [{"role": "user", "content": "Add 12345 + 678:\n  indented\tand a tab, an accent (é) and an emoji 🦙."}],
]

#: Metadata that describes quantization or where the file came from: never compared.
NOT_COMPARED = ("general.file_type", "general.quantization_version")
PROVENANCE_PREFIX = "qalora_export."
ABSENT, ANY = "<absent>", "<any>"
_DEFAULT = "llama.cpp's default when the key is absent is the same value (llama-vocab.cpp); the files give the same "
#: key -> (ours, converter's, why llama.cpp runs both files the same), per family. The test requires
#: exactly these differences: a difference not listed fails, and so does a listed one that went away.
ALLOWED_DIFFERENCES: dict[str, dict[str, tuple[object, object, str]]] = {
    "*": {
        "general.name": (ANY, ANY, "descriptive only: ours names the base directory, the converter makes a title of "
                                   "the float directory's name; llama.cpp only prints it"),
    },
    "llama3": {
        "llama.attention.key_length": (ABSENT, 32, "llama.cpp's default is embedding_length / head_count = 128 / 4 = "
                                                   "32; for llama we write it only when head_dim differs, so that "
                                                   "existing llama exports stay byte-identical"),
        "llama.attention.value_length": (ABSENT, 32, "as key_length"),
        "tokenizer.ggml.add_eos_token": (False, ABSENT, _DEFAULT + "add_eos (test below)"),
        "tokenizer.ggml.add_sep_token": (ABSENT, False, _DEFAULT + "add_sep (test below)"),
        "tokenizer.ggml.add_space_prefix": (False, ABSENT, _DEFAULT + "tokens for every test string (false for BPE)"),
    },
    "mistral": {
        "llama.attention.key_length": (ABSENT, 32, "as for llama3"),
        "llama.attention.value_length": (ABSENT, 32, "as for llama3"),
        "llama.context_length": (4096, 32768, "deliberate: the model's sliding window. llama.cpp's llama graph has no "
                                              "sliding-window attention, so past 4096 tokens the converter's file "
                                              "computes another model than transformers; ours declares the context "
                                              "where both agree (docs/gguf.md)"),
        "tokenizer.ggml.add_space_prefix": (True, ABSENT, _DEFAULT + "tokens for every test string (true for "
                                                          "SentencePiece); ours reads the model's add_dummy_prefix"),
        "tokenizer.ggml.unknown_token_id": (0, ABSENT, "llama.cpp's default unk of a SentencePiece vocabulary is 0; "
                                                       "ours takes the model's trainer_spec.unk_id"),
    },
    "qwen2": {
        "tokenizer.ggml.add_space_prefix": (False, ABSENT, _DEFAULT + "tokens for every test string (false for BPE)"),
    },
    "qwen3": {
        "tokenizer.ggml.add_space_prefix": (False, ABSENT, _DEFAULT + "tokens for every test string (false for BPE)"),
    },
}


@pytest.fixture(scope="module", autouse=True)
def passive_openmp():
    """llama.cpp's OpenMP threads spin while waiting by default; on a shared 2-core machine that makes
    every decode in the child processes several times slower (docs/gguf.md, benchmark notes)."""
    with pytest.MonkeyPatch.context() as mp:
        import os

        if "OMP_WAIT_POLICY" not in os.environ:
            mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        yield


@pytest.fixture(scope="module")
def files(family_model, tmp_path_factory):
    """``files(family) -> (FamilyModel, ours.gguf, converter.gguf, summary)``, built once per module: our
    merged export of the GPTQ base + adapter, and llama.cpp's converter on the float model
    (``--vocab-only``: all its metadata, hyperparameters included; the tensors are not compared)."""
    root = tmp_path_factory.mktemp("families-gguf")
    done: dict = {}

    def get(family: str):
        if family not in done:
            fm = family_model(family)
            ours = root / f"{family}.Q4_1.gguf"
            summary = G.export(MergedView.open(fm.base_dir, fm.adapter_dir), ours)
            theirs = gguf_helpers.convert_with_llama_cpp(fm.float_dir, root / f"{family}.converter.gguf")
            done[family] = (fm, ours, theirs, summary)
        return done[family]

    return get


@pytest.fixture(scope="module")
def tokenizations(files):
    """``tokenizations(family) -> dict``: llama.cpp's tokens of the test strings and chat prompts with our
    file and with the converter's (each loaded once, vocab only), transformers' tokens of the same."""
    from transformers import AutoTokenizer

    done: dict = {}

    def get(family: str) -> dict:
        if family not in done:
            fm, ours, theirs, _ = files(family)
            texts, expected = gguf_helpers.llama_cpp_vocab_tests(VOCAB_TESTS[family])
            tok = AutoTokenizer.from_pretrained(str(fm.float_dir))
            chats = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CONVERSATIONS]
            # llama.cpp's test-tokenizer-0 mode (no BOS, control tokens as text), the same with BOS, and
            # chat prompts as a server tokenizes a rendered template (control tokens parsed)
            cases = ([{"text": t} for t in texts] + [{"text": t, "add_special": True} for t in texts]
                     + [{"text": c, "parse_special": True} for c in chats])
            done[family] = {
                "texts": texts, "expected": expected, "chats": chats, "tokenizer": tok, "float_dir": fm.float_dir,
                "ours": tokenize_cases(ours, cases), "theirs": tokenize_cases(theirs, cases),
            }
        return done[family]

    return get


# ------------------------------------------------------------------------------------------ metadata


def _same(a, b) -> bool:
    return a == b and type(a) is type(b)


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_equals_llama_cpps_converter(family, files):
    fm, ours_path, theirs_path, summary = files(family)
    ours, theirs = gguf_helpers.gguf_metadata(ours_path), gguf_helpers.gguf_metadata(theirs_path)
    allowed = {**ALLOWED_DIFFERENCES["*"], **ALLOWED_DIFFERENCES[family]}
    compared = sorted(k for k in set(ours) | set(theirs)
                      if k not in NOT_COMPARED and not k.startswith(PROVENANCE_PREFIX))
    differences = {}
    for key in compared:
        mine, other = ours.get(key), theirs.get(key)
        if mine is not None and other is not None and mine[0] == other[0] and _same(mine[1], other[1]):
            continue
        differences[key] = (ABSENT if mine is None else mine[1], ABSENT if other is None else other[1])
    unexplained = {k: (str(v[0])[:80], str(v[1])[:80]) for k, v in differences.items() if k not in allowed}
    assert not unexplained, f"{family}: metadata differs from llama.cpp's converter: {unexplained}"
    for key, (want_ours, want_theirs, reason) in allowed.items():
        assert key in differences, f"{family}: {key} no longer differs; remove it from ALLOWED_DIFFERENCES"
        got_ours, got_theirs = differences[key]
        assert want_ours is ANY or got_ours == want_ours, (key, got_ours, reason)
        assert want_theirs is ANY or got_theirs == want_theirs, (key, got_theirs, reason)
    # the big arrays really were compared (and are the full vocabulary)
    n_vocab = len(ours["tokenizer.ggml.tokens"][1])
    config = json.loads((fm.float_dir / "config.json").read_text())
    assert n_vocab == summary["tokenizer"]["tokens"] == config["vocab_size"]
    assert ours["tokenizer.ggml.token_type"][1] == theirs["tokenizer.ggml.token_type"][1]
    print(f"\n{family}: {len(compared)} keys compared ({n_vocab} tokens), allowed differences: "
          + "; ".join(f"{k}: ours {v[0]!r}, converter {v[1]!r}" for k, v in differences.items()))


def test_family_specifics_are_in_the_files(files):
    """What each family carries, read back from our file: rope factors, biases, q/k norms, head_dim."""
    from gguf import GGMLQuantizationType

    f32 = int(GGMLQuantizationType.F32)
    tensors = {}
    for family in FAMILIES:
        _, ours, _, summary = files(family)
        tensors[family] = container.read_header(ours)[1]  # name -> (ggml type, dims innermost first)
        assert summary["architecture"] == {"llama3": "llama", "mistral": "llama"}.get(family, family)
    assert "rope_freqs.weight" in tensors["llama3"] and "output.weight" in tensors["llama3"]
    assert "output.weight" not in tensors["qwen2"] and "output.weight" not in tensors["qwen3"]  # tied
    assert all(tensors["qwen2"][f"blk.0.attn_{p}.bias"][0] == f32 for p in "qkv")
    assert not any(name.endswith(".bias") for family in ("llama3", "mistral", "qwen3") for name in tensors[family])
    assert tensors["qwen3"]["blk.1.attn_q_norm.weight"] == (f32, (64,))  # head_dim, not 128 / 4
    assert tensors["qwen3"]["blk.0.attn_q.weight"][1] == (128, 4 * 64)


def test_qwen2_biases_are_the_checkpoints_exactly(files):
    """q/k/v biases go into the file as float32 holding the base's values bit for bit, unpermuted."""
    import numpy as np
    import torch

    fm, ours, _, _ = files("qwen2")
    stored = {t.name: np.asarray(t.data) for t in container.GGUFFile(ours).tensors if t.name.endswith(".bias")}
    base = MergedView.open(fm.base_dir)
    for layer in range(family_models.LAYERS):
        for proj, stem in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            want = base.read_tensor(f"model.layers.{layer}.self_attn.{proj}.bias").to(torch.float32).numpy()
            got = stored[f"blk.{layer}.{stem}.bias"]
            assert got.dtype == np.float32 and np.array_equal(got, want)


# ----------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_tokenizes_as_with_the_converters_file(family, tokenizations):
    t = tokenizations(family)
    n = len(t["texts"])
    ours, theirs = t["ours"], t["theirs"]
    assert ours["vocab"] == theirs["vocab"]  # special ids, add_bos / add_eos / add_sep as llama.cpp reads them
    differing = [i for i, (a, b) in enumerate(zip(ours["ids"], theirs["ids"])) if a != b]
    assert not differing, [(i, (t["texts"] + t["texts"] + t["chats"])[i][:40]) for i in differing]
    # and both are what llama.cpp's own tokenizer tests expect of this vocabulary
    assert ours["ids"][:n] == t["expected"]
    bos = ours["vocab"]["bos"]
    assert all(ids == ([bos] if ours["vocab"]["add_bos"] else []) + plain
               for ids, plain in zip(ours["ids"][n:2 * n], ours["ids"][:n]))
    print(f"\n{family}: llama.cpp, our file vs the converter's: {len(ours['ids'])}/{len(ours['ids'])} tokenizations "
          f"equal ({n} test strings without and with BOS, {len(t['chats'])} chat prompts); vocab {ours['vocab']}")


def _transformers_agreement(t: dict, tok) -> tuple[int, int, list[tuple[list[int], list[int]]]]:
    n = len(t["texts"])
    texts = sum(tok(text, add_special_tokens=False)["input_ids"] == ids
                for text, ids in zip(t["texts"], t["ours"]["ids"]))
    chats = [(ids, tok(chat, add_special_tokens=False)["input_ids"])
             for chat, ids in zip(t["chats"], t["ours"]["ids"][2 * n:])]
    return texts, sum(a == b for a, b in chats), chats


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_byte_level_bpe_agrees_with_transformers(family, tokenizations):
    t = tokenizations(family)
    texts, chats, _ = _transformers_agreement(t, t["tokenizer"])
    print(f"\n{family}: llama.cpp vs transformers: {texts}/{len(t['texts'])} test strings, {chats}/{len(t['chats'])} "
          f"chat prompts")
    assert (texts, chats) == (len(t["texts"]), len(t["chats"]))


def test_sentencepiece_agreement_with_transformers_depends_on_legacy(tokenizations):
    """llama.cpp's SentencePiece tokenizer puts the dummy-prefix space before the text and after every
    special token (as SentencePiece itself does on each piece of text). transformers does the same with
    ``legacy: true``; with ``legacy: false`` it puts no space after special tokens (``<s>[INST]`` gives
    ``[``, not ``▁[``) and one space less before text that starts with spaces. The converter's file
    tokenizes exactly like ours (test above), so this is what users of either file should expect."""
    from transformers import AutoTokenizer

    t = tokenizations("mistral")
    float_dir = t["float_dir"]
    legacy = AutoTokenizer.from_pretrained(str(float_dir), legacy=True)
    strict = AutoTokenizer.from_pretrained(str(float_dir), legacy=False)
    texts_l, chats_l, _ = _transformers_agreement(t, legacy)
    texts_s, chats_s, pairs = _transformers_agreement(t, strict)
    print(f"\nmistral: llama.cpp vs transformers legacy=true: {texts_l}/{len(t['texts'])} test strings, "
          f"{chats_l}/{len(t['chats'])} chat prompts; legacy=false: {texts_s}/{len(t['texts'])}, "
          f"{chats_s}/{len(t['chats'])}")
    assert (texts_l, chats_l) == (len(t["texts"]), len(t["chats"]))
    # legacy=false: the chat prompts differ only in the token right after a special token
    control = {t["ours"]["vocab"]["bos"], t["ours"]["vocab"]["eos"]}
    for llama_ids, hf_ids in pairs:
        assert len(llama_ids) == len(hf_ids)
        assert all(i > 0 and llama_ids[i - 1] in control for i, (a, b) in enumerate(zip(llama_ids, hf_ids)) if a != b)
    assert chats_s < len(t["chats"])


# ------------------------------------------------------------------------------------------- runtime


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_gguf_passes_verify_in_llama_cpp(family, files, tokenizations, tmp_path):
    fm, ours, _, summary = files(family)
    model = MergedView.open(fm.base_dir, fm.adapter_dir)
    worst = 0.0
    for name, w in G.read_weights(ours):
        ref = model.reference_weight(name)
        worst = max(worst, float((w - ref).abs().max()) / float(ref.abs().max()))
    assert worst <= G.weight_tolerance

    tok = tokenizations(family)["tokenizer"]
    prompts = [list(tok(chat, add_special_tokens=False)["input_ids"]) for chat in tokenizations(family)["chats"][:2]]
    result = gguf_verify.verify_runtime(model, ours, prompts, tmp_path, n_new=4)
    art, effect = result["artifact"], result["adapter_effect"]
    floor, near_tie = result["floor"], 2 * result["floor"]["max_abs_logit_diff"]
    margins = [r["greedy_divergence_margin"] for r in art["per_prompt"]]
    print(f"\n{family}: max weight error {worst:.2e} x max|W|; artifact mean KL {art['mean_kl']:.2e} (allowed "
          f"{result['allowed_mean_kl']:.2e}, floor {floor['mean_kl']:.2e}), top-1 {art['top1_agreement']:.3f}, "
          f"greedy {art['greedy_match']:.2f} (parting at margins {margins}, near-tie {near_tie:.2f}); adapter "
          f"effect mean KL {effect['mean_kl']:.2e}, top-1 {effect['top1_agreement']:.3f}; F32 reference KL "
          f"{result['f32_reference']['mean_kl']:.1e}; notes {summary['notes']}")
    assert result["passed"], {k: result[k] for k in ("rule", "allowed_mean_kl", "kl_over_floor")}
    # greedy continuations equal, but where the reference itself is a near-tie: a top-1/top-2 margin
    # within twice llama.cpp's own logit error on the base (the floor), which activation rounding flips
    for row in art["per_prompt"]:
        assert row["greedy_first_divergence"] is None or row["greedy_divergence_margin"] <= near_tie, row
    assert effect["mean_kl"] > 20 * result["allowed_mean_kl"]  # the check can fail: the adapter matters
    assert result["f32_reference"]["mean_kl"] < 1e-4


def test_merge_to_gguf_on_the_command_line(family_model, tmp_path):
    """``merge --to gguf`` on the SentencePiece family: the export runs verify (weights and llama.cpp)
    into the handoff bundle, and it passes."""
    from qalora_export.cli import EXIT_OK, main

    fm = family_model("mistral")
    log = ["--log-file", str(tmp_path / "log.txt")]
    out = tmp_path / "mistral.gguf"
    assert main(["merge", str(fm.base_dir), str(fm.adapter_dir), "--to", "gguf", "-o", str(out)] + log) == EXIT_OK
    bundle = json.loads((Path(str(out) + ".bundle") / "verify.json").read_text())
    assert bundle["passed"] and bundle["weights"]["passed"] and bundle["runtime"]["passed"], bundle["runtime"]
    assert bundle["runtime"]["adapter_effect"]["mean_kl"] > 20 * bundle["runtime"]["allowed_mean_kl"]
