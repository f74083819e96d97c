"""``genai_config.json``: what onnxruntime-genai (0.18) needs to load and run the decoder.

The fields mirror what onnxruntime-genai's own model builder writes for a CPU decoder with
GroupQueryAttention (rotary inside the op, so no ``position_ids`` input): the graph's input and
output names (``past_key_values.%d.key`` patterns), the attention geometry, special token ids and
the default search options (greedy). ``type`` is the transformers ``model_type`` (llama, mistral,
qwen2), which genai maps to its decoder-only model class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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


def genai_config(cfg: DecoderConfig, model_config: dict, generation_config: Optional[dict] = None) -> dict:
    """The ``genai_config.json`` object for a decoder built by ``graph.build_decoder``."""
    bos, eos, pad = _token_ids(model_config, generation_config)
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


def write_genai_config(out_dir: Path, cfg: DecoderConfig, model_config: dict, generation_config: Optional[dict]) -> Path:
    path = Path(out_dir) / GENAI_CONFIG_FILE
    path.write_text(json.dumps(genai_config(cfg, model_config, generation_config), indent=2) + "\n")
    return path
