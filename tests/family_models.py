"""Tiny random-weight models of the families people fine-tune, with their real tokenizers.

Llama-3, Mistral (Llama-2 SentencePiece tokenizer), Qwen2/2.5 and Qwen3: each a 2-layer model
(hidden 128) carrying the family's real architecture details (llama3 rope scaling and an untied
head; a sliding window; q/k/v biases and tied embeddings; q/k norms and an explicit head_dim) and
the family's FULL real vocabulary and chat template, taken from llama.cpp's vocab-only GGUFs and
templates (:func:`qalora_export.fixtures.llama_cpp_source.llama_cpp_source_dir`; no model download).

Tokenizers are built as the families' repositories ship them, not through transformers' GGUF
conversion: a ``tokenizer.json`` (byte-level BPE with the family's split regex, merges and special
tokens) for Llama-3 and Qwen, and a SentencePiece ``tokenizer.model`` rebuilt from the vocab file's
pieces, scores and types for Mistral (transformers' llama-spm GGUF conversion tokenizes 15 of
llama.cpp's 47 test strings differently; the rebuilt ModelProto agrees on all of them).

Weights: normal(0, 0.08) for the projections, 0.25 for embeddings / head (logits with a standard
deviation of a few units: peaked enough that a wrong export shows, not so peaked that an adapter's
effect vanishes), norms and biases perturbed away from their defaults (never zeros or ones, so a
dropped bias or norm shows).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

FAMILY_NAMES = ("llama3", "mistral", "qwen2", "qwen3")

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 128, 2, 4, 2, 256


@dataclass(frozen=True)
class FamilySpec:
    """What one family's tiny model is made of."""

    name: str
    model_type: str
    vocab_file: str  # models/ggml-vocab-<...>.gguf in llama.cpp's source
    template: str | None  # models/templates/<...>.jinja, or None for :data:`MISTRAL_TEMPLATE`
    config: dict  # config.json fields beyond the shared sizes
    tokenizer: dict  # bos / eos / pad / unk token strings, add_bos, generation eos strings


# Mistral-7B-Instruct-v0.1/v0.2 style (Llama-2 tokenizer, [INST] as plain text); written here
# because llama.cpp's templates folder only has the newer Tekken-tokenizer Mistral templates.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
    "{% set system.text = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
# (A system message is prepended to the next user turn, as Mistral's later templates do; v0.1's
# template raises on it.)


SPECS: dict[str, FamilySpec] = {
    "llama3": FamilySpec(
        "llama3", "llama", "ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.1-8B-Instruct.jinja",
        config=dict(tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    rms_norm_eps=1e-5),
        tokenizer=dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None, add_bos=True,
                       generation_eos=("<|end_of_text|>", "<|eot_id|>")),
    ),
    "mistral": FamilySpec(
        "mistral", "mistral", "ggml-vocab-llama-spm.gguf", None,
        config=dict(tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=10000.0,
                    sliding_window=4096, rms_norm_eps=1e-5),
        tokenizer=dict(bos="<s>", eos="</s>", pad=None, unk="<unk>", add_bos=True, generation_eos=("</s>",)),
    ),
    "qwen2": FamilySpec(
        "qwen2", "qwen2", "ggml-vocab-qwen2.gguf", "Qwen-Qwen2.5-7B-Instruct.jinja",
        config=dict(tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
                    use_sliding_window=False, sliding_window=None, rms_norm_eps=1e-6),
        tokenizer=dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, add_bos=False,
                       generation_eos=("<|im_end|>", "<|endoftext|>")),
    ),
    "qwen3": FamilySpec(
        "qwen3", "qwen3", "ggml-vocab-qwen2.gguf", "Qwen-Qwen3-0.6B.jinja",
        config=dict(tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1000000.0,
                    head_dim=64, attention_bias=False, use_sliding_window=False, sliding_window=None,
                    rms_norm_eps=1e-6),
        tokenizer=dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, add_bos=False,
                       generation_eos=("<|im_end|>", "<|endoftext|>")),
    ),
}

# The split regexes of the byte-level BPE families (tokenizer.json "Split" pre-tokenizer).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp / sentencepiece token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def source_dir() -> Path:
    """llama.cpp's source subset (converter, vocab GGUFs, templates), cached once."""
    from qalora_export.fixtures.llama_cpp_source import llama_cpp_source_dir

    return llama_cpp_source_dir()


@lru_cache(maxsize=None)
def read_vocab(vocab_file: str) -> dict:
    """Tokens, types, scores, merges and special ids of one ``ggml-vocab-*.gguf``.

    Parsed once and kept as JSON beside the source files: gguf's reader takes tens of seconds over
    a 150k-token vocabulary, the JSON a fraction of a second.
    """
    parsed = source_dir() / "models" / f"{vocab_file}.parsed.json"
    if parsed.is_file():
        return json.loads(parsed.read_text())
    vocab = _parse_vocab(source_dir() / "models" / vocab_file)
    tmp = parsed.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(vocab))
    tmp.replace(parsed)
    return vocab


def _parse_vocab(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)

    def strings(key: str) -> list[str]:
        field = reader.fields.get(key)
        if field is None:
            return []
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def values(key: str) -> list:
        field = reader.fields.get(key)
        return [] if field is None else [field.parts[i].tolist()[0] for i in field.data]

    def scalar(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.parts[-1].tolist()[0]

    return {"model": bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode(),
            "tokens": strings("tokenizer.ggml.tokens"), "types": values("tokenizer.ggml.token_type"),
            "scores": values("tokenizer.ggml.scores"), "merges": strings("tokenizer.ggml.merges"),
            "bos": scalar("tokenizer.ggml.bos_token_id"), "eos": scalar("tokenizer.ggml.eos_token_id"),
            "unk": scalar("tokenizer.ggml.unknown_token_id")}


def _chat_template(spec: FamilySpec) -> str:
    if spec.template is None:
        return MISTRAL_TEMPLATE
    return (source_dir() / "models" / "templates" / spec.template).read_text()


def _write_bpe_tokenizer(spec: FamilySpec, out_dir: Path) -> None:
    """A byte-level BPE ``tokenizer.json`` as the Llama-3 / Qwen2 repositories ship it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = read_vocab(spec.vocab_file)
    tokens, types = vocab["tokens"], vocab["types"]
    regular = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (NORMAL, UNKNOWN, BYTE)}
    merges = [tuple(m.split(" ", 1)) for m in vocab["merges"]]
    llama3 = spec.name == "llama3"
    tok = Tokenizer(models.BPE(regular, merges, ignore_merges=llama3, fuse_unk=False, byte_fallback=False))
    if not llama3:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_REGEX if llama3 else QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Control and user-defined tokens (<|begin_of_text|>, <|im_start|>, <think> ...) at their ids;
    # tokens are added in id order so that each lands on its vocab id.
    # "[PAD<id>]" entries only pad the vocab file to the embedding's rows (as llama.cpp's
    # converter writes them); the repositories' tokenizer.json has no such tokens.
    added = [(t, ty) for t, ty in zip(tokens, types)
             if ty in (CONTROL, USER_DEFINED) and not re.fullmatch(r"\[PAD\d+\]", t)]
    specials = [AddedToken(t, special=(ty == CONTROL), normalized=False) for t, ty in added]
    tok.add_tokens(specials)
    if spec.tokenizer["add_bos"]:
        bos = spec.tokenizer["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for t, _ in added:
        assert tok.token_to_id(t) == tokens.index(t), f"{spec.name}: special {t} moved"
    t = spec.tokenizer
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=t["bos"], eos_token=t["eos"],
                                   pad_token=t["pad"], unk_token=t["unk"], clean_up_tokenization_spaces=False)
    fast.chat_template = _chat_template(spec)
    fast.save_pretrained(str(out_dir))


def _write_spm_tokenizer(spec: FamilySpec, out_dir: Path) -> None:
    """A SentencePiece ``tokenizer.model`` (+ tokenizer_config) as Llama-2 / Mistral ship it."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = read_vocab(spec.vocab_file)
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(vocab["tokens"])
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.trainer_spec.split_digits = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    for token, score, ty in zip(vocab["tokens"], vocab["scores"], vocab["types"]):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(ty)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    t = spec.tokenizer
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": t["bos"], "eos_token": t["eos"],
              "unk_token": t["unk"], "pad_token": None, "add_bos_token": True, "add_eos_token": False,
              "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": 32768,
              "chat_template": _chat_template(spec)}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": t["bos"], "eos_token": t["eos"], "unk_token": t["unk"]}, indent=2))


def token_id(family: str, token: str) -> int:
    """A token's id in the family's vocabulary."""
    return read_vocab(SPECS[family].vocab_file)["tokens"].index(token)


def make_family_float(family: str, out_dir: Path, seed: int = 0) -> Path:
    """A float Hugging Face directory of one family (config, safetensors, tokenizer, generation config)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    spec = SPECS[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = read_vocab(spec.vocab_file)
    t = spec.tokenizer
    eos_ids = [token_id(family, e) for e in t["generation_eos"]]
    bos_id = token_id(family, t["bos"]) if t["bos"] else vocab["bos"]
    pad_id = token_id(family, t["pad"]) if t["pad"] else None
    config = AutoConfig.for_model(
        spec.model_type, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=len(vocab["tokens"]),
        bos_token_id=bos_id, eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0], pad_token_id=pad_id,
        hidden_act="silu", **spec.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                p.normal_(0, 0.25)
            elif p.ndim == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # RMSNorm weights (input/post-attention/final, q_norm/k_norm)
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_ids, pad_token_id=pad_id,
                     do_sample=False).save_pretrained(str(out_dir))
    if vocab["model"] == "llama":
        _write_spm_tokenizer(spec, out_dir)
    else:
        _write_bpe_tokenizer(spec, out_dir)
    return out_dir


def make_family_base(family: str, out_dir: Path, bits: int = 4, group_size: int = 32, method: str = "rtn",
                     seed: int = 0) -> Path:
    """A GPTQ base of one family (its float directory is built beside it, at ``out_dir-float``)."""
    from qalora_export.quantization.quantize import quantize_model

    float_dir = Path(str(out_dir) + "-float")
    if not (float_dir / "config.json").is_file():
        make_family_float(family, float_dir, seed=seed)
    kwargs = {"n_samples": 8, "seq_len": 64} if method == "gptq" else {}
    quantize_model(float_dir, out_dir, bits, group_size, "gptq_v2", method=method, **kwargs)
    return Path(out_dir)


def make_family_adapter(family: str, base_dir: Path, out_dir: Path, seed: int = 0, rank: int = 4,
                        alpha: float = 8.0, magnitude: float = 0.15) -> Path:
    """A random QA-LoRA adapter on every quantized layer of a family base (our adapter format).

    ``magnitude`` 0.15 moves these models' logits by about a unit (KL base vs base+adapter well
    above the verification limits) — the default of ``tiny_models.make_random_adapter`` (0.05) is
    too small to show on a model whose projections are 0.08-scaled.
    """
    import tiny_models

    return tiny_models.make_random_adapter(Path(base_dir), Path(out_dir), rank=rank, alpha=alpha, seed=seed,
                                           magnitude=magnitude)


@dataclass(frozen=True)
class FamilyModel:
    """One family's float model, 4-bit g32 RTN base and random adapter (built once per session)."""

    name: str
    float_dir: Path
    base_dir: Path
    adapter_dir: Path


def build_family_model(family: str, root: Path) -> FamilyModel:
    """Float dir, base and adapter of ``family`` under ``root`` (reused when already built)."""
    base = Path(root) / f"{family}-base"
    adapter = Path(root) / f"{family}-adapter"
    if not (base / "config.json").is_file():
        make_family_base(family, base)
    if not (adapter / "adapter_config.json").is_file() and not any(adapter.glob("*")):
        make_family_adapter(family, base, adapter)
    return FamilyModel(family, Path(str(base) + "-float"), base, adapter)


def logits_std(float_dir: Path, text: str = "The quick brown fox jumps over the lazy dog.") -> float:
    """Standard deviation of the float model's logits on ``text`` (to check the models are peaked)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(float_dir))
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32)
    with torch.no_grad():
        logits = model(**tok(text, return_tensors="pt")).logits
    return float(np.std(logits.numpy()))
