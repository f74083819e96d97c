"""``genai_config.json``: what onnxruntime-genai (0.18) needs to load and run the decoder.

The fields mirror what onnxruntime-genai's own model builder writes for a CPU decoder with
GroupQueryAttention (rotary inside the op, so no ``position_ids`` input): the graph's input and
output names (``past_key_values.%d.key`` patterns), the attention geometry, special token ids and
the default search options (greedy). ``type`` is the transformers ``model_type`` (llama, mistral,
qwen2), which genai maps to its decoder-only model class.

``pad_token_id``: genai masks every prompt token equal to it out of the attention, so a pad that
occurs in chat prompts (SmolLM2's and Llama 3's pad is their end-of-turn token) makes genai compute
something else on every chat prompt. :func:`prompt_safe_pad` keeps the model's pad only when no
rendered chat prompt contains it, else writes an unused special token (docs/onnx.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

from qalora_export.formats.onnx.decoder import DecoderConfig
from qalora_export.formats.onnx.spec import GENAI_CONFIG_FILE, MODEL_FILE


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


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text()) if path.is_file() else {}
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


def prompt_safe_pad(tokenizer_dir: Optional[Path], bos, eos, pad, vocab_size: int) -> Union[int, None]:
    """A ``pad_token_id`` that no rendered chat prompt contains.

    A special token is unsafe when it is the bos, when the chat template holds its text, or when
    the template names its role (``{{ eos_token }}``). The model's pad is kept when it is safe (or
    when no tokenizer files are there to judge); otherwise the first unused special token by
    :data:`PAD_PREFERENCE` (SmolLM2: ``<|endoftext|>`` for ``<|im_end|>``; Llama 3:
    ``<|finetune_right_pad_id|>``; Llama 2 / Mistral: ``<unk>``). With no unused special token the
    model's pad is kept (docs/onnx.md: genai then masks it in prompts; verify strips it there).
    User text that spells a special token is tokenized to it too; no pad can avoid that.
    """
    if tokenizer_dir is None:
        return pad
    tok_config = _json(Path(tokenizer_dir) / "tokenizer_config.json")
    specials: dict[int, str] = {}
    for t in _json(Path(tokenizer_dir) / "tokenizer.json").get("added_tokens", []):
        if isinstance(t, dict) and t.get("special") and isinstance(t.get("id"), int):
            specials[t["id"]] = str(t.get("content", ""))
    for i, t in (tok_config.get("added_tokens_decoder") or {}).items():
        if isinstance(t, dict) and t.get("special") and str(i).isdigit():
            specials.setdefault(int(i), str(t.get("content", "")))
    if not specials:
        return pad
    template = _chat_templates(Path(tokenizer_dir), tok_config)
    named = set()
    for role in TOKEN_ROLES:
        value = tok_config.get(role)
        content = value.get("content") if isinstance(value, dict) else value
        if content and re.search(rf"\b{role}\b", template):
            named.add(str(content))
    unsafe = {bos} | {i for i, text in specials.items() if text and (text in template or text in named)}
    if pad is not None and pad not in unsafe:
        return pad
    free = sorted(i for i in specials if i not in unsafe and 0 <= i < vocab_size)
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
            "type": cfg.model_type,
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
