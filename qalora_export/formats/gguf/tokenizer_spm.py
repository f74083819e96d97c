"""SentencePiece tokenizers (Llama-2, Mistral v0.1-v0.3: ``tokenizer.model``) as ``tokenizer.ggml.*``.

llama.cpp's ``llama`` tokenizer re-implements SentencePiece BPE: it escapes spaces as ``▁``, prepends
one when ``add_space_prefix`` is set, merges the pair of pieces whose merged piece has the highest
score, and spells characters that no piece covers as byte pieces ``<0x00>`` .. ``<0xFF>``. So a
GGUF carries the model's pieces, their scores and their types (normal, unknown, control,
user-defined, unused, byte: the same numbering in SentencePiece and llama.cpp) and no merges.
They are read from the ``ModelProto`` in ``tokenizer.model`` (package ``sentencepiece``, which
brings the protobuf class). Tokens transformers adds on top of the model
(``tokenizer_config.json`` ``added_tokens_decoder``, ``added_tokens.json``) are matched before
SentencePiece runs; they are written as control tokens when special and as user-defined tokens
otherwise, with the score -1000 (llama.cpp's converter does the same, and our metadata must equal
its).

Refused (:class:`UnsupportedModelError`), because llama.cpp would tokenize differently: Unigram
models (llama.cpp's ``t5`` tokenizer, which this tool does not write), normalization rules (a
``precompiled_charsmap``, ``remove_extra_whitespaces``), whitespace as a suffix or not escaped, and
models without byte fallback (llama.cpp spells unknown characters as byte pieces, SentencePiece as
``<unk>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qalora_export.errors import MissingExtraError, UnsupportedModelError

SPM_MODEL_FILE = "tokenizer.model"
ADDED_TOKENS_FILE = "added_tokens.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# SentencePiece piece types (sentencepiece_model.proto), equal to llama.cpp's token types.
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_UNUSED, PIECE_BYTE = 1, 2, 3, 4, 5, 6
SPM_BPE = 2  # TrainerSpec.ModelType.BPE
#: scores of added tokens and of padding entries, as llama.cpp's converter writes them
ADDED_TOKEN_SCORE = -1000.0
PAD_SCORE = -10000.0
SPACE_MARK = "\u2581"  # "▁", SentencePiece's escaped space


def load_model_proto(path: Path):
    """The ``sentencepiece_model_pb2.ModelProto`` in ``path``."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as exc:  # sentencepiece missing, or its protobuf dependency
        raise MissingExtraError(
            f"{path} is a SentencePiece tokenizer; reading it for GGUF export needs the packages sentencepiece "
            f"and protobuf, which are not installed: pip install 'qalora-export[sentencepiece]' ({exc})") from exc
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as exc:  # protobuf's DecodeError, OSError
        raise UnsupportedModelError(
            f"{path} is not a readable SentencePiece model ({type(exc).__name__}: {exc})") from exc
    if not proto.pieces:
        raise UnsupportedModelError(f"{path} is not a readable SentencePiece model: it holds no pieces")
    return proto


def check_llama_cpp_reproduces(proto, path: Path) -> None:
    """Refuse a SentencePiece model whose tokenization llama.cpp's ``llama`` tokenizer does not reproduce."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != SPM_BPE:
        problems.append(f"model_type {trainer.model_type} is not BPE (2): llama.cpp's SentencePiece tokenizer "
                        f"merges pieces by score, which is BPE; Unigram models need its t5 tokenizer")
    if norm.precompiled_charsmap or norm.name not in ("", "identity"):
        problems.append(f"normalizer {norm.name!r} rewrites text before tokenizing; llama.cpp applies no "
                        f"SentencePiece normalization")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=true collapses spaces; llama.cpp's SentencePiece tokenizer "
                        "keeps them")
    if norm.HasField("escape_whitespaces") and not norm.escape_whitespaces:
        problems.append("escape_whitespaces=false; llama.cpp always spells spaces as \u2581")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix=true; llama.cpp's SentencePiece tokenizer puts \u2581 first")
    if not trainer.byte_fallback:
        problems.append("byte_fallback=false: SentencePiece turns unknown characters into <unk>, llama.cpp "
                        "into byte pieces <0x..>")
    if problems:
        raise UnsupportedModelError(f"{path}: this SentencePiece model cannot be written as a llama.cpp tokenizer: "
                                    + "; ".join(problems))


def looks_like_control(text: str) -> bool:
    """``<|...|>`` tokens are control tokens in llama.cpp files even when a config forgets to say so."""
    return len(text) > 4 and text.startswith("<|") and text.endswith("|>")


@dataclass
class SpmVocabulary:
    """What a GGUF needs of a SentencePiece tokenizer (lists ``n_vocab`` long, by id)."""

    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    add_space_prefix: bool
    model_special_ids: dict[str, int]  # bos / eos / unk as the SentencePiece model names them
    padded: int  # ids past the model's pieces and added tokens, written as [PAD{i}]


def read_spm_vocabulary(directory: Path, n_vocab: int, proto=None) -> SpmVocabulary:
    """``directory``'s ``tokenizer.model`` (or the already parsed ``proto``) with the tokens
    transformers adds on top of it, as GGUF token lists.

    Raises:
        UnsupportedModelError: a model llama.cpp cannot reproduce, or more tokens than ``n_vocab``.
        MissingExtraError: sentencepiece (or protobuf) is not installed.
    """
    path = Path(directory) / SPM_MODEL_FILE
    proto = proto if proto is not None else load_model_proto(path)
    check_llama_cpp_reproduces(proto, path)
    if len(proto.pieces) > n_vocab:
        raise UnsupportedModelError(
            f"{path}: the tokenizer has {len(proto.pieces)} tokens but the model's embedding has {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [PAD_SCORE] * n_vocab
    types = [PIECE_UNUSED] * n_vocab
    used = set(range(len(proto.pieces)))
    for i, piece in enumerate(proto.pieces):
        tokens[i], scores[i], types[i] = piece.piece, float(piece.score), int(piece.type) or PIECE_NORMAL

    def add(token_id, text, kind: int, source: Path) -> None:
        if not isinstance(token_id, int) or not 0 <= token_id < n_vocab:
            raise UnsupportedModelError(f"{source}: added token {text!r} has id {token_id!r}, outside the "
                                        f"model's embedding of {n_vocab} rows")
        tokens[token_id] = text
        types[token_id], scores[token_id] = kind, ADDED_TOKEN_SCORE
        used.add(token_id)

    added_path = Path(directory) / ADDED_TOKENS_FILE
    for text, token_id in _read_json(added_path).items():
        add(token_id, str(text), PIECE_USER_DEFINED, added_path)
    config_path = Path(directory) / TOKENIZER_CONFIG_FILE
    config = _read_json(config_path)
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict) or not all(isinstance(e, dict) for e in decoder.values()):
        raise UnsupportedModelError(f"{config_path}: added_tokens_decoder must map token ids to objects "
                                    f"with a content field")
    for token_id, entry in decoder.items():
        text = str(entry.get("content", ""))
        special = bool(entry.get("special")) or looks_like_control(text)
        # a user-defined token is matched in raw text, where a space is a space (not ▁)
        add(int(token_id) if str(token_id).isdigit() else token_id, text if special else text.replace(SPACE_MARK, " "),
            PIECE_CONTROL if special else PIECE_USER_DEFINED, config_path)
    add_space_prefix = config.get("add_prefix_space")
    if add_space_prefix is None:  # transformers' LlamaTokenizer: the model's own dummy prefix
        add_space_prefix = proto.normalizer_spec.add_dummy_prefix
    trainer = proto.trainer_spec
    model_ids = {k: int(i) for k, i in (("bos", trainer.bos_id), ("eos", trainer.eos_id), ("unk", trainer.unk_id))
                 if 0 <= i < n_vocab}
    return SpmVocabulary(tokens, scores, types, bool(add_space_prefix), model_ids, n_vocab - len(used))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise UnsupportedModelError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise UnsupportedModelError(f"{path} must hold a JSON object")
    return value
