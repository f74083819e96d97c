"""``genai_config.json``: what onnxruntime-genai (0.18) needs to load and run the decoder.

The fields mirror what onnxruntime-genai's own model builder writes for a CPU decoder with
GroupQueryAttention (rotary inside the op, so no ``position_ids`` input): the graph's input and
output names (``past_key_values.%d.key`` patterns), the attention geometry, special token ids and
the default search options (greedy). ``type`` is genai's name of the family
(:data:`GENAI_MODEL_TYPES`: llama, mistral, qwen2, qwen3, each of which genai 0.18 maps to its
decoder-only model class). ``eos_token_id`` lists every end token of the family the tokenizer has
(:data:`END_TOKEN_GROUPS`).

``pad_token_id``: genai masks every prompt token equal to it out of the attention, so a pad that
occurs in chat prompts (SmolLM2's and Llama 3's pad is their end-of-turn token) makes genai compute
something else on every chat prompt. :func:`prompt_safe_pad` keeps the model's pad only when no
rendered chat prompt contains it, else writes an unused special token (docs/onnx.md).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Optional, Union

from qalora_export.formats.onnx.decoder import DecoderConfig
from qalora_export.formats.onnx.spec import GENAI_CONFIG_FILE, MODEL_FILE


#: ``model_type`` -> genai's ``model.type`` (the types onnxruntime-genai 0.18 accepts for these
#: decoders; all four run its decoder-only model with the graph's inputs and outputs).
GENAI_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def _token_ids(model_config: dict, generation_config: Optional[dict]) -> tuple:
    """bos, eos (int or list), pad; ``generation_config.json`` wins over ``config.json``."""
    merged = dict(model_config)
    for key, value in (generation_config or {}).items():
        if key in ("bos_token_id", "eos_token_id", "pad_token_id") and value is not None:
            merged[key] = value
    bos = merged.get("bos_token_id")
    eos = merged.get("eos_token_id")
    pad = merged.get("pad_token_id")
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return bos, eos, pad


#: Special-token roles a chat template can name as variables (``{{ eos_token }}``).
TOKEN_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
#: Preference among unused special tokens for the pad: a pad-like name first, then end-of-text.
PAD_PREFERENCE = (r"pad", r"endoftext|end_of_text", r"unk")
#: End tokens that belong together, per ``model_type``: when the model's eos ids hold one token of
#: a group, genai stops at every token of the group that the tokenizer has as a special token. A
#: chat model ends a turn with one and a document with another (Llama 3 ``<|eot_id|>`` /
#: ``<|end_of_text|>`` / ``<|eom_id|>`` (3.1: tool calls); Qwen2 / Qwen3 ``<|im_end|>`` /
#: ``<|endoftext|>``); a config that lists only one of them would let genai run past the other.
#: Mistral / Llama 2 end with ``</s>`` alone. SmolLM2 (``llama``, ``<|im_end|>``) holds no token of
#: the ``llama`` group and keeps its ids.
END_TOKEN_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "llama": (("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),),
    "qwen2": (("<|im_end|>", "<|endoftext|>"),),
    "qwen3": (("<|im_end|>", "<|endoftext|>"),),
}
#: SentencePiece piece types (``sentencepiece_model.proto``) that are special tokens: UNKNOWN, CONTROL.
SPM_SPECIAL_TYPES = (2, 3)


def _json(path: Path) -> dict:
    """A JSON object file's content, or {} (missing, unreadable, not an object). Cached by path,
    modification time and size: one export reads ``tokenizer.json`` (~10 MB for Llama 3 / Qwen)
    for several questions."""
    try:
        st = Path(path).stat()
    except OSError:
        return {}
    return _json_cached(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _json_cached(path: str, mtime_ns: int, size: int) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _chat_templates(tokenizer_dir: Path, tok_config: dict) -> str:
    """Every chat template of the tokenizer (``tokenizer_config.json``, ``chat_template.jinja``), joined."""
    template = tok_config.get("chat_template") or ""
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    jinja = Path(tokenizer_dir) / "chat_template.jinja"
    return str(template) + ("\n" + jinja.read_text() if jinja.is_file() else "")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(data: bytes):
    """``(field number, wire type, value)`` of one protobuf message (value: int or bytes)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield field, wire, value


def sentencepiece_specials(path: Path) -> dict[int, str]:
    """``{id: piece}`` of the UNKNOWN and CONTROL pieces of a SentencePiece ``tokenizer.model``
    (Llama 2 / Mistral ``<unk>``, ``<s>``, ``</s>``); empty when the file is missing or unreadable.
    A piece's id is its index in ``ModelProto.pieces`` (field 1; a piece's field 1 is its text,
    field 3 its type, NORMAL when absent)."""
    try:
        data = Path(path).read_bytes()
        specials, index = {}, 0
        for field, wire, value in _proto_fields(data):
            if field != 1 or wire != 2:
                continue
            text, kind = "", 1
            for f, w, v in _proto_fields(value):
                if f == 1 and w == 2:
                    text = v.decode("utf-8", "replace")
                elif f == 3 and w == 0:
                    kind = v
            if kind in SPM_SPECIAL_TYPES:
                specials[index] = text
            index += 1
        return specials
    except (OSError, ValueError):
        return {}


def special_tokens(tokenizer_dir: Path, tok_config: Optional[dict] = None) -> dict[int, str]:
    """``{id: text}`` of the tokenizer's special tokens: ``tokenizer.json``'s special added tokens,
    ``tokenizer_config.json``'s ``added_tokens_decoder`` and a SentencePiece ``tokenizer.model``'s
    control and unknown pieces (the first source that names an id wins)."""
    tokenizer_dir = Path(tokenizer_dir)
    tok_config = _json(tokenizer_dir / "tokenizer_config.json") if tok_config is None else tok_config
    specials: dict[int, str] = {}
    for t in _json(tokenizer_dir / "tokenizer.json").get("added_tokens", []):
        if isinstance(t, dict) and t.get("special") and isinstance(t.get("id"), int):
            specials[t["id"]] = str(t.get("content", ""))
    for i, t in (tok_config.get("added_tokens_decoder") or {}).items():
        if isinstance(t, dict) and t.get("special") and str(i).isdigit():
            specials.setdefault(int(i), str(t.get("content", "")))
    if (tokenizer_dir / "tokenizer.model").is_file():
        for i, text in sentencepiece_specials(tokenizer_dir / "tokenizer.model").items():
            specials.setdefault(i, text)
    return specials


def _inserts_id(node, token_id: int) -> bool:
    """Whether a ``tokenizer.json`` post-processor (any nesting) lists ``token_id`` among its ids."""
    if isinstance(node, dict):
        ids = node.get("ids")
        if isinstance(ids, list) and token_id in ids:
            return True
        if node.get("id") == token_id or (isinstance(node.get("sep"), list) and token_id in node["sep"]) \
                or (isinstance(node.get("cls"), list) and token_id in node["cls"]):
            return True
        return any(_inserts_id(v, token_id) for v in node.values())
    if isinstance(node, list):
        return any(_inserts_id(v, token_id) for v in node)
    return False


def tokenizer_adds_bos(tokenizer_dir: Path, tok_config: dict, bos) -> bool:
    """Whether tokenizing a prompt puts ``bos`` in it (True when the files do not say).

    Yes when ``tokenizer_config.json`` says ``add_bos_token: true`` or ``tokenizer.json``'s
    post-processor inserts its id (Llama 3, Llama 2 / Mistral); no when neither does and either
    ``add_bos_token`` is false or a ``tokenizer.json`` is there to say so (Qwen2 / Qwen3, whose
    config's bos ``<|endoftext|>`` no prompt carries).
    """
    if bos is None:
        return False
    tok_json = _json(Path(tokenizer_dir) / "tokenizer.json")
    if tok_config.get("add_bos_token") is True or _inserts_id(tok_json.get("post_processor"), bos):
        return True
    return not (tok_config.get("add_bos_token") is False or "post_processor" in tok_json)


def family_eos(model_type: str, eos, specials: dict[int, str]):
    """``eos`` plus the other end tokens of its family's group (:data:`END_TOKEN_GROUPS`) that the
    tokenizer has: an int stays an int when nothing is added; the model's own ids keep their order
    (the first is the pad's fallback)."""
    ids = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    by_text = {text: i for i, text in specials.items()}
    texts = {specials.get(i) for i in ids}
    added = []
    for group in END_TOKEN_GROUPS.get(model_type, ()):
        if texts & set(group):
            added += [by_text[t] for t in group if t in by_text and by_text[t] not in ids + added]
    if not added:
        return eos
    return ids + added


def prompt_safe_pad(tokenizer_dir: Optional[Path], bos, eos, pad, vocab_size: int) -> Union[int, None]:
    """A ``pad_token_id`` that no rendered chat prompt contains.

    A special token is unsafe when the tokenizer puts it in prompts as the bos
    (:func:`tokenizer_adds_bos`), when the chat template holds its text, or when the template names
    its role (``{{ eos_token }}``). The model's pad is kept when it is safe (or when no tokenizer
    files are there to judge); otherwise the first unused special token by :data:`PAD_PREFERENCE`
    (SmolLM2: ``<|endoftext|>`` for ``<|im_end|>``; Llama 3: ``<|end_of_text|>`` kept, else
    ``<|finetune_right_pad_id|>``; Llama 2 / Mistral: ``<unk>``; Qwen2 / Qwen3: ``<|endoftext|>``
    kept). With no unused special token the model's pad is kept (docs/onnx.md: genai then masks it
    in prompts; verify strips it there). User text that spells a special token is tokenized to it
    too; no pad can avoid that.
    """
    if tokenizer_dir is None:
        return pad
    tok_config = _json(Path(tokenizer_dir) / "tokenizer_config.json")
    specials = special_tokens(Path(tokenizer_dir), tok_config)
    if not specials:
        return pad
    template = _chat_templates(Path(tokenizer_dir), tok_config)
    named = set()
    for role in TOKEN_ROLES:
        value = tok_config.get(role)
        content = value.get("content") if isinstance(value, dict) else value
        if content and re.search(rf"\b{role}\b", template):
            named.add(str(content))
    unsafe = {i for i, text in specials.items() if text and (text in template or text in named)}
    if tokenizer_adds_bos(Path(tokenizer_dir), tok_config, bos):
        unsafe.add(bos)
    if pad is not None and pad not in unsafe:
        return pad
    free = sorted(i for i in specials if i not in unsafe and i != bos and 0 <= i < vocab_size)
    for pattern in PAD_PREFERENCE:
        for i in free:
            if re.search(pattern, specials[i], re.IGNORECASE):
                return i
    return free[0] if free else pad


def genai_config(cfg: DecoderConfig, model_config: dict, generation_config: Optional[dict] = None,
                 tokenizer_dir: Optional[Path] = None) -> dict:
    """The ``genai_config.json`` object for a decoder built by ``graph.build_decoder``; with
    ``tokenizer_dir`` its pad is :func:`prompt_safe_pad`."""
    bos, eos, pad = _token_ids(model_config, generation_config)
    if tokenizer_dir is not None:
        eos = family_eos(cfg.model_type, eos, special_tokens(Path(tokenizer_dir)))
    pad = prompt_safe_pad(tokenizer_dir, bos, eos, pad, cfg.vocab)
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": cfg.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": GENAI_MODEL_TYPES[cfg.model_type],
            "vocab_size": cfg.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": cfg.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(out_dir: Path, cfg: DecoderConfig, model_config: dict, generation_config: Optional[dict],
                       tokenizer_dir: Optional[Path] = None) -> Path:
    path = Path(out_dir) / GENAI_CONFIG_FILE
    config = genai_config(cfg, model_config, generation_config, tokenizer_dir)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
