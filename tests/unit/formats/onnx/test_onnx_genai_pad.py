"""The ``pad_token_id`` of ``genai_config.json`` never occurs in rendered chat prompts.

onnxruntime-genai masks every prompt token equal to the pad out of the attention, so a pad that
is the end-of-turn token (SmolLM2, Llama 3) changes every chat prompt. Unit checks of
:func:`prompt_safe_pad` on tokenizer files laid out like each family's (SmolLM2/llama ChatML,
Llama 3, Llama 2 / Mistral, Qwen2) and without a safe token; then the SmolLM2 fixture with a random
adapter folded: genai's greedy continuation of real chat prompts (its own chat template, several
``<|im_end|>`` = the former pad inside) equals the unmerged PyTorch model's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models

from qalora_export.formats.onnx.genai import prompt_safe_pad

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}")
LLAMA2 = "{% for m in messages %}{{ bos_token + '[INST] ' + m['content'] + ' [/INST]' }}{{ eos_token }}{% endfor %}"


def tokenizer_dir(path: Path, specials: dict[int, str], template, roles: dict | None = None,
                  template_file: bool = False) -> Path:
    """``tokenizer.json`` (added special tokens) and ``tokenizer_config.json`` (template, roles)."""
    path.mkdir(parents=True, exist_ok=True)
    added = [{"id": i, "content": c, "special": True} for i, c in specials.items()]
    (path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    config = dict(roles or {})
    if template_file:
        (path / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_smollm2_pad_im_end_becomes_endoftext(tmp_path):
    d = tokenizer_dir(tmp_path, {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 3: "<repo_name>"}, CHATML,
                      template_file=True)
    assert prompt_safe_pad(d, bos=1, eos=2, pad=2, vocab_size=49152) == 0


def test_llama3_pad_is_the_finetune_pad_token(tmp_path):
    specials = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128002: "<|reserved_special_token_0|>",
                128004: "<|finetune_right_pad_id|>", 128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
                128009: "<|eot_id|>"}
    d = tokenizer_dir(tmp_path, specials, LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    assert prompt_safe_pad(d, bos=128000, eos=[128001, 128009], pad=128001, vocab_size=128256) == 128001  # safe: kept
    assert prompt_safe_pad(d, bos=128000, eos=[128009], pad=128009, vocab_size=128256) == 128004


def test_llama2_and_mistral_templates_name_their_eos_by_role(tmp_path):
    d = tokenizer_dir(tmp_path, {0: "<unk>", 1: "<s>", 2: "</s>"}, LLAMA2,
                      {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>"})
    assert prompt_safe_pad(d, bos=1, eos=2, pad=2, vocab_size=32000) == 0  # {{ eos_token }} is in every prompt


def test_qwen2_pad_endoftext_is_kept(tmp_path):
    specials = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
    d = tokenizer_dir(tmp_path, specials, [{"name": "default", "template": CHATML}])
    assert prompt_safe_pad(d, bos=None, eos=[151645, 151643], pad=151643, vocab_size=152064) == 151643


def test_without_a_safe_token_or_tokenizer_files_the_pad_is_kept(tmp_path):
    d = tokenizer_dir(tmp_path, {1: "<|im_start|>", 2: "<|im_end|>"}, CHATML)
    assert prompt_safe_pad(d, bos=1, eos=2, pad=2, vocab_size=100) == 2  # nothing unused: docs/onnx.md
    assert prompt_safe_pad(None, bos=1, eos=2, pad=2, vocab_size=100) == 2
    assert prompt_safe_pad(tmp_path / "missing", bos=1, eos=2, pad=2, vocab_size=100) == 2
    e = tokenizer_dir(tmp_path / "e", {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>"}, CHATML)
    assert prompt_safe_pad(e, bos=1, eos=2, pad=2, vocab_size=0) == 2  # outside the embedding table: not used


def test_the_tiny_models_pad_is_kept(tmp_path):
    tiny_models.make_tokenizer(tmp_path)
    assert prompt_safe_pad(tmp_path, bos=1, eos=2, pad=3, vocab_size=tiny_models.TINY_VOCAB) == 3
    assert prompt_safe_pad(tmp_path, bos=1, eos=2, pad=2, vocab_size=tiny_models.TINY_VOCAB) == 3  # <pad>


# ----------------------------------------------------------------------------------- SmolLM2 in genai

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
]


def test_genai_greedy_on_smollm2_chat_prompts_equals_pytorch(smollm2_base, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats import get_format
    from qalora_export.formats.onnx.runtime import eos_ids, genai_greedy, pad_id, torch_greedy
    from qalora_export.modeling.model import build_model
    from qalora_export.training.evaluate import cached_base_weights

    adapter = tiny_models.make_random_adapter(smollm2_base, tmp_path / "adapter", magnitude=0.02)
    model = MergedView.open(smollm2_base, adapter)
    out = tmp_path / "onnx"
    get_format("onnx").export(model, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert pad_id(out) == tok.convert_tokens_to_ids("<|endoftext|>") != im_end
    ref = build_model(model.base, model.adapter)
    eos = eos_ids(out)
    with cached_base_weights(ref):
        for conversation in CONVERSATIONS:
            prompt = list(tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
            assert prompt.count(im_end) >= 1 and pad_id(out) not in prompt
            expected, _ = torch_greedy(ref, prompt, 5, eos)
            got = genai_greedy(out, prompt, 5)
            assert got == [t for t in expected if t not in eos] or got == expected, conversation
