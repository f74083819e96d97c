"""Tests of qalora_export.training.examples: JSONL parsing, chat rendering and response masks, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from qalora_export.training.examples import (
    IGNORE_INDEX,
    TokenizedExample,
    build_dataset,
    collate,
    read_jsonl,
    split_held_out,
    to_messages,
    tokenize_example,
)
from qalora_export.errors import DataError

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "###", "Instruction", ":", "Response", "sys", "hello", "world", "a", "b", "c"]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path):
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture()
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer without a chat template (fallback format)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labelled(example: TokenizedExample) -> list[int]:
    return [t for t in example.labels if t != IGNORE_INDEX]


# --------------------------------------------------------------------------- read_jsonl


def test_read_jsonl_both_shapes_and_trailing_blank_lines(tmp_path: Path) -> None:
    records = [
        {"instruction": "Add", "input": "1 2", "output": "3"},
        {"instruction": "Say hi", "output": "hi"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ]
    path = write(tmp_path, "\n".join(json.dumps(r) for r in records) + "\n\n  \n")
    assert read_jsonl(path) == records


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": "b"}\n', 2, "blank line"),
        ('{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', 2, "malformed JSON"),
        ('["instruction", "output"]\n', 1, "expected a JSON object"),
        ('{"instruction": "a"}\n', 1, "missing field 'output'"),
        ('{"output": "a"}\n', 1, "missing field 'instruction'"),
        ('{"instruction": "", "output": "b"}\n', 1, "'instruction' is empty"),
        ('{"instruction": "a", "output": "  "}\n', 1, "'output' is empty"),
        ('{"instruction": "a", "output": 3}\n', 1, "'output' must be a string"),
        ('{"instruction": "a", "input": 1, "output": "b"}\n', 1, "'input' must be a string"),
        ('{"messages": []}\n', 1, "non-empty list"),
        ('{"messages": "hi"}\n', 1, "non-empty list"),
        ('{"messages": ["hi"]}\n', 1, "messages[0] must be an object"),
        ('{"messages": [{"role": "user"}]}\n', 1, "no 'content'"),
        ('{"messages": [{"content": "x"}]}\n', 1, "no 'role'"),
        ('{"messages": [{"role": "bot", "content": "x"}]}\n', 1, "role 'bot'"),
        ('{"messages": [{"role": "user", "content": ["x"]}]}\n', 1, "must be a string"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', 1, "must be the assistant"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}\n', 1, "first message"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], '
         '"output": "z"}\n', 1, "both"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert f"{path}:{line}:" in message
    assert fragment in message


def test_read_jsonl_empty_missing_and_bad_utf8(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        read_jsonl(write(tmp_path, "\n \n"))
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "nope.jsonl")
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_jsonl(path)


def test_to_messages() -> None:
    assert to_messages({"instruction": "Do", "input": "this", "output": "ok"}) == [
        {"role": "user", "content": "Do\n\nthis"},
        {"role": "assistant", "content": "ok"},
    ]
    assert to_messages({"instruction": "Do", "input": "", "output": "ok"})[0]["content"] == "Do"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_messages({"messages": messages}) == messages
    with pytest.raises(DataError, match="last message"):
        to_messages({"messages": messages[:1]})


# --------------------------------------------------------------------------- masks, real template


def test_smollm2_mask_single_turn(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    messages = to_messages({"instruction": "Name a colour.", "output": "Blue is nice"})
    example = tokenize_example(tok, messages, max_length=512)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == ids(tok, full)
    assert not example.truncated
    # The loss covers exactly the answer and its end-of-turn token, nothing of the prompt.
    assert labelled(example) == ids(tok, "Blue is nice") + [tok.convert_tokens_to_ids("<|im_end|>")]
    first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert first == len(ids(tok, prompt))
    assert tok.decode(example.input_ids[first:]).startswith("Blue is nice<|im_end|>")
    # Labels align with input ids wherever they are set.
    assert all(l in (IGNORE_INDEX, t) for l, t in zip(example.labels, example.input_ids))


def test_smollm2_mask_multi_turn(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "Two?"},
        {"role": "assistant", "content": "second answer"},
    ]
    example = tokenize_example(tok, messages, max_length=None)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert labelled(example) == ids(tok, "first answer") + [end] + ids(tok, "second answer") + [end]
    text = tok.decode([t for t, l in zip(example.input_ids, example.labels) if l == IGNORE_INDEX])
    assert "Two?" in text and "Be brief." in text and "answer" not in text


def test_smollm2_truncation_and_build_dataset(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    short = {"instruction": "Hi", "output": "Hello"}
    long = {"instruction": "Hi " * 10, "output": "word " * 40}
    n_short = len(tokenize_example(tok, to_messages(short), None).input_ids)
    n_long = len(tokenize_example(tok, to_messages(long), None).input_ids)
    prompt = tok.apply_chat_template(to_messages(long)[:1], tokenize=False, add_generation_prompt=True)
    prompt_len = len(ids(tok, prompt))
    max_length = prompt_len + 5
    assert n_short <= max_length < n_long

    cut = tokenize_example(tok, to_messages(long), max_length)
    assert cut.truncated and len(cut.input_ids) == len(cut.labels) == max_length
    assert len(labelled(cut)) == 5

    data, stats = build_dataset(tok, [short, long], max_length, on_overlong="drop")
    assert len(data) == stats.examples == 1 and stats.dropped_overlong == 1 and stats.truncated == 0
    assert stats.total_tokens == n_short and stats.response_tokens == data[0].num_response_tokens > 0

    data, stats = build_dataset(tok, [short, long], max_length, on_overlong="truncate")
    assert stats.examples == 2 and stats.truncated == 1 and stats.dropped_overlong == 0
    assert stats.total_tokens == n_short + max_length

    # Truncated before the answer starts: nothing to learn, dropped and counted.
    data, stats = build_dataset(tok, [long], prompt_len, on_overlong="truncate")
    assert data == [] and stats.dropped_no_response == 1 and stats.examples_in == 1

    with pytest.raises(DataError, match="on_overlong"):
        build_dataset(tok, [short], 64, on_overlong="keep")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="max_length"):
        tokenize_example(tok, to_messages(short), 0)


# --------------------------------------------------------------------------- fallback and bad templates


def test_fallback_format_without_chat_template(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    example = tokenize_example(tok, messages, max_length=None)
    v = {w: i for i, w in enumerate(WORDS)}
    expected = [
        "<s>", "sys",
        "###", "Instruction", ":", "hello",
        "###", "Response", ":", "world", "a", "</s>",
        "###", "Instruction", ":", "b",
        "###", "Response", ":", "c", "</s>",
    ]
    assert example.input_ids == [v[w] for w in expected]
    assert labelled(example) == [v["world"], v["a"], v["</s>"], v["c"], v["</s>"]]


def test_template_without_prefix_property_is_rejected(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    # Starts with a marker that depends on the conversation length: prefixes differ.
    tok.chat_template = (
        "{{ 'a' if messages|length == 1 else 'b' }}{% for m in messages %} {{ m['content'] }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    with pytest.raises(DataError, match="prefix"):
        tokenize_example(tok, messages, max_length=None)


def test_simple_custom_template_is_used(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] == 'user' and 'Instruction : ' or '' }}{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}</s>{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}Response : {% endif %}"
    )
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    with pytest.raises(DataError, match="prefix"):
        # The generation prompt is not part of the rendered conversation: no prefix property.
        tokenize_example(tok, messages, max_length=None)
    tok.chat_template = tok.chat_template.replace("{% if add_generation_prompt %}Response : {% endif %}", "")
    example = tokenize_example(tok, messages, max_length=None)
    v = {w: i for i, w in enumerate(WORDS)}
    assert labelled(example) == [v["world"], v["</s>"]]


# --------------------------------------------------------------------------- collate, split


def test_collate_right_pads() -> None:
    batch = [TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample([8], [8])]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in out.values())
    with pytest.raises(DataError, match="empty batch"):
        collate([], 0)
    with pytest.raises(DataError, match="pad token"):
        collate(batch, None)


def test_split_held_out_deterministic_and_disjoint() -> None:
    items = list(range(50))
    train, held = split_held_out(items, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert sorted(train + held) == items and not set(train) & set(held)
    assert train == sorted(train) and held == sorted(held)
    assert split_held_out(items, 0.2, seed=3) == (train, held)
    assert split_held_out(items, 0.2, seed=4) != (train, held)
    assert len(split_held_out(items, 7, seed=0)[1]) == 7
    for bad in (0, 50, 0.0, 1.0, True, "3"):
        with pytest.raises(DataError):
            split_held_out(items, bad, seed=0)  # type: ignore[arg-type]
