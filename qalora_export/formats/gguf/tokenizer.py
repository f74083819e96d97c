"""Tokenizer metadata (``tokenizer.ggml.*``) from a Hugging Face tokenizer directory.

llama.cpp re-implements each tokenizer family itself, so a GGUF can only carry a tokenizer that
one of its implementations reproduces. This module writes two kinds:

- byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama-3, Qwen2/Qwen3, StarCoder) from
  ``tokenizer.json`` as ``tokenizer.ggml.model = "gpt2"`` with tokens, token types, merges, special
  ids and the chat template, and the pre-tokenizer (the regex split before BPE) llama.cpp must use.
  The pre-tokenizer is identified from the structure of ``tokenizer.json``'s ``pre_tokenizer``
  (table :data:`PRE_TOKENIZERS`);
- SentencePiece BPE tokenizers (Llama-2, Mistral) from ``tokenizer.model`` as
  ``tokenizer.ggml.model = "llama"`` with pieces, scores and types (:mod:`.tokenizer_spm`). A
  directory with a SentencePiece ``tokenizer.model`` is read that way, as llama.cpp's converter
  reads it, even when it also has a ``tokenizer.json``.

Anything else is refused with :class:`UnsupportedModelError` rather than written as a tokenizer
that tokenizes differently: WordLevel / WordPiece / Unigram models, byte-fallback BPE in a
``tokenizer.json`` without its ``tokenizer.model``, normalizers other than NFC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from qalora_export.errors import UnsupportedModelError
from qalora_export.formats.gguf.tokenizer_spm import (SPM_MODEL_FILE, load_model_proto, looks_like_control,
                                                      read_spm_vocabulary)

TOKENIZER_JSON = "tokenizer.json"

# llama.cpp token types (llama_token_type / gguf.TokenType).
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Signature of tokenizer.json's pre_tokenizer -> llama.cpp's tokenizer.ggml.pre. A signature is a
# tuple of steps: ("ByteLevel", use_regex), ("Digits", individual_digits), ("Split", regex).
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # llama.cpp: \p{N} split, then the GPT-2 regex
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
ALLOWED_NORMALIZERS = (None, "NFC")


@dataclass
class TokenizerMetadata:
    """What goes into ``tokenizer.ggml.*`` (ids index ``tokens``/``token_types``)."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # empty for SentencePiece ("llama") tokenizers
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, ...
    add_bos: bool = False
    add_eos: bool = False
    chat_template: Optional[object] = None
    padded: int = 0  # tokens appended as [PAD{i}] to reach the embedding's row count
    scores: Optional[list[float]] = None  # SentencePiece piece scores ("llama" tokenizers only)
    add_space_prefix: bool = False  # prepend a space (SentencePiece's dummy prefix) before tokenizing

    def add_to(self, writer) -> None:
        """Add the fields to a ``gguf.GGUFWriter`` (before its header is written)."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def _signature(pre: Optional[dict], source: Path) -> tuple:
    if pre is None:
        raise UnsupportedModelError(f"{source}: the tokenizer has no pre_tokenizer; llama.cpp's BPE needs one")
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                raise UnsupportedModelError(
                    f"{source}: ByteLevel pre-tokenizer with add_prefix_space=true has no llama.cpp equivalent")
            sig.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            sig.append(("Digits", bool(step.get("individual_digits", False))))
        elif kind == "Split":
            pattern = step.get("pattern", {})
            sig.append(("Split", pattern.get("Regex", pattern.get("String"))))
        else:
            sig.append((kind,))
    return tuple(sig)


def pre_tokenizer_name(tokenizer: dict, source: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a ``tokenizer.json`` object (see :data:`PRE_TOKENIZERS`)."""
    sig = _signature(tokenizer.get("pre_tokenizer"), source)
    name = PRE_TOKENIZERS.get(sig)
    if name is None:
        raise UnsupportedModelError(
            f"{source}: pre_tokenizer {json.dumps(tokenizer.get('pre_tokenizer'))[:300]} matches none of the "
            f"llama.cpp pre-tokenizers this tool knows ({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); "
            f"writing another one would tokenize differently in llama.cpp"
        )
    return name


#: read_tokenizer's recent results: verify exports the same base three times (artifact, floor, F32
#: reference), and reading a 150k-token vocabulary (and measuring BOS/EOS through transformers) takes seconds
_CACHE: dict[tuple, TokenizerMetadata] = {}
_CACHE_SIZE = 4


def _cache_key(directory: Path, n_vocab: int) -> tuple:
    """The directory, ``n_vocab`` and every non-weight file's name, size and modification time."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in directory.iterdir()
                   if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")))
    return str(directory.resolve()), n_vocab, tuple(files)


def read_tokenizer(directory: Path, n_vocab: int) -> TokenizerMetadata:
    """Build the metadata from ``directory``: a SentencePiece ``tokenizer.model`` (:mod:`.tokenizer_spm`),
    else ``tokenizer.json``; with ``tokenizer_config.json`` and the chat template.

    Args:
        n_vocab: rows of the token embedding; the token list is padded with unused ``[PAD{i}]``
            tokens up to it (as llama.cpp's converter does) and may not exceed it.

    Raises:
        UnsupportedModelError: no tokenizer, or one llama.cpp cannot reproduce.
        MissingExtraError: a SentencePiece model, and the sentencepiece package is not installed.
    """
    directory = Path(directory)
    key = _cache_key(directory, n_vocab) if directory.is_dir() else None
    if key is not None and key in _CACHE:
        return _CACHE[key]
    meta = _read_tokenizer(directory, n_vocab)
    if key is not None:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = meta
    return meta


def _read_tokenizer(directory: Path, n_vocab: int) -> TokenizerMetadata:
    path = directory / TOKENIZER_JSON
    proto = _sentencepiece_proto(directory, fallback=path.is_file())
    if proto is not None:
        return _read_sentencepiece(directory, proto, n_vocab)
    if not path.is_file():
        raise UnsupportedModelError(
            f"{directory} has no {TOKENIZER_JSON} (nor a SentencePiece {SPM_MODEL_FILE}); GGUF export needs the "
            f"base's Hugging Face tokenizer (save it with tokenizer.save_pretrained into the base directory)")
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # also UnicodeDecodeError, over-long integers
        raise UnsupportedModelError(f"{path} is not readable JSON: {exc}") from exc
    model = tokenizer.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise UnsupportedModelError(
            f"{path}: tokenizer model {kind!r} cannot be expressed in GGUF metadata by this tool; "
            f"supported: byte-level BPE (GPT-2 style, tokenizer.ggml.model=gpt2)")
    if model.get("byte_fallback"):
        raise UnsupportedModelError(
            f"{path}: SentencePiece-style BPE (byte_fallback=true, as in Llama-2/Mistral) is written from the "
            f"SentencePiece model (tokenizer.ggml.model=llama needs its scores), and {directory} has no "
            f"{SPM_MODEL_FILE}; copy the model's tokenizer.model into it")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UnsupportedModelError(f"{path}: BPE with subword prefixes/suffixes has no llama.cpp equivalent")
    normalizer = (tokenizer.get("normalizer") or {}).get("type")
    if normalizer not in ALLOWED_NORMALIZERS:
        raise UnsupportedModelError(
            f"{path}: normalizer {normalizer!r} is not applied by llama.cpp's BPE tokenizer; supported: none, NFC")
    decoder = (tokenizer.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        raise UnsupportedModelError(f"{path}: decoder {decoder!r}; a GPT-2 style BPE needs a ByteLevel decoder")
    pre = pre_tokenizer_name(tokenizer, path)

    by_id: dict[int, tuple[str, int]] = {}
    for text, token_id in (model.get("vocab") or {}).items():
        by_id[int(token_id)] = (text, TOKEN_NORMAL)
    for added in tokenizer.get("added_tokens") or []:
        control = added.get("special") or looks_like_control(added["content"])
        by_id[int(added["id"])] = (added["content"], TOKEN_CONTROL if control else TOKEN_USER_DEFINED)
    if not by_id:
        raise UnsupportedModelError(f"{path}: the tokenizer has an empty vocabulary")
    size = max(by_id) + 1
    if size > n_vocab:
        raise UnsupportedModelError(
            f"{path}: the tokenizer has {size} tokens but the model's embedding has {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        text, typ = by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED))
        tokens.append(text)
        types.append(typ)
    padded = n_vocab - len(by_id)

    from gguf.vocab import SpecialVocab

    special = SpecialVocab(directory, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise UnsupportedModelError(f"{path}: the BPE tokenizer has no merges")
    add_bos, add_eos = _adds_special_tokens(directory, special.special_token_ids)
    return TokenizerMetadata(
        model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=list(special.merges),
        special_ids=dict(special.special_token_ids), add_bos=add_bos, add_eos=add_eos,
        chat_template=special.chat_template, padded=padded,
    )


def _sentencepiece_proto(directory: Path, fallback: bool):
    """The parsed SentencePiece ``tokenizer.model`` of ``directory``, or None when there is none (or,
    with a ``tokenizer.json`` to ``fallback`` on, when the file is not a SentencePiece model: Llama-3
    ships a tiktoken file by that name)."""
    path = directory / SPM_MODEL_FILE
    if not path.is_file():
        return None
    try:
        return load_model_proto(path)
    except UnsupportedModelError:
        if fallback:
            return None
        raise


def _read_sentencepiece(directory: Path, proto, n_vocab: int) -> TokenizerMetadata:
    from gguf.vocab import SpecialVocab

    vocab = read_spm_vocabulary(directory, n_vocab, proto)
    special = SpecialVocab(directory, load_merges=False, n_vocab=n_vocab)
    special_ids = dict(special.special_token_ids)
    for kind, token_id in vocab.model_special_ids.items():  # the model's own, where the configs name none
        special_ids.setdefault(kind, token_id)
    add_bos, add_eos = _adds_special_tokens(directory, special_ids)
    return TokenizerMetadata(
        model="llama", pre="default", tokens=vocab.tokens, token_types=vocab.token_types, merges=[],
        special_ids=special_ids, add_bos=add_bos, add_eos=add_eos, chat_template=special.chat_template,
        padded=vocab.padded, scores=vocab.scores, add_space_prefix=vocab.add_space_prefix,
    )


def _adds_special_tokens(directory: Path, special_ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether the transformers tokenizer adds BOS / EOS when encoding (measured, not guessed)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        ids = tok("a", add_special_tokens=True)["input_ids"]
        plain = tok("a", add_special_tokens=False)["input_ids"]
    except Exception as exc:  # the tokenizer files are the user's input
        raise UnsupportedModelError(f"{directory}: transformers cannot load the tokenizer ({exc})") from exc
    extra = len(ids) - len(plain)
    bos, eos = special_ids.get("bos"), special_ids.get("eos")
    add_bos = extra > 0 and bos is not None and ids[0] == bos and (not plain or plain[0] != bos)
    add_eos = extra > 0 and eos is not None and ids[-1] == eos and (not plain or plain[-1] != eos)
    return bool(add_bos), bool(add_eos)
