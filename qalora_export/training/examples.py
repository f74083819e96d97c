"""Instruction data for QA-LoRA training: JSONL reading, chat rendering, response masks.

Two record shapes are accepted, one JSON object per line:

* ``{"instruction": str, "input": str (optional), "output": str}``
* ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``

Loss is taken only on assistant tokens: each answer and the end-of-turn token after it, found in
the rendered conversation without template-specific markers (:mod:`qalora_export.training.chat`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qalora_export.errors import DataError
from qalora_export.training.chat import answer_token_spans, encode, render

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class TokenizedExample:
    """One tokenized conversation; ``labels`` is ``IGNORE_INDEX`` outside assistant tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_response_tokens(self) -> int:
        """Number of positions that carry a loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class DatasetStats:
    """Counts from :func:`build_dataset`."""

    examples_in: int = 0
    examples: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    response_tokens: int = 0
    total_tokens: int = 0


# --------------------------------------------------------------------------- reading JSONL


def _check_str(value: Any, where: str, field: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field {field!r} must be a string, got {type(value).__name__}; "
            "fix the record so the field holds text"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800": no tokenizer can encode it
        raise DataError(
            f"{where}: field {field!r} holds an unpaired UTF-16 surrogate escape at character {exc.start}; "
            "fix the escape (\\ud83d\\ude00 pairs) or remove it"
        ) from exc
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty; give it non-empty text or drop the line")


def _validate_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects, "
            f"got {type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}"
        )
    for i, message in enumerate(messages):
        item = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{item} must be an object with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise DataError(f"{item} has no {field!r} field; add it")
        if message["role"] not in ROLES:
            raise DataError(f"{item} has role {message['role']!r}; use one of {', '.join(ROLES)}")
        _check_str(message["content"], item, "content")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the first message is from the assistant; start with a user (or system) message")
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message has role {messages[-1]['role']!r}; "
            "it must be the assistant's answer (drop trailing turns or add the answer)"
        )


def validate_example(example: Any, where: str = "example") -> None:
    """Raise :class:`DataError` (prefixed with ``where``) unless ``example`` is a valid record."""
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(example).__name__}; write one object per line")
    if "messages" in example:
        if "instruction" in example or "output" in example:
            raise DataError(f"{where}: has both 'messages' and 'instruction'/'output'; use one record shape")
        _validate_messages(example["messages"], where)
        return
    for field in ("instruction", "output"):
        if field not in example:
            raise DataError(
                f"{where}: missing field {field!r}; a record needs 'instruction' and 'output' "
                "(and optional 'input'), or 'messages'"
            )
        _check_str(example[field], where, field)
    if "input" in example and example["input"] is not None:
        _check_str(example["input"], where, "input", allow_empty=True)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate instruction records from a JSONL file.

    Trailing blank lines are allowed; a blank line before the last record, malformed JSON or an
    invalid record raises :class:`DataError` naming the file and 1-based line number.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read training data ({exc.strerror or exc}); check the path") from exc
    lines = raw.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{path}: the file is empty; write one JSON record per line")
    examples: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not valid UTF-8 ({exc.reason}); save the file as UTF-8") from exc
        if not text.strip():
            raise DataError(f"{where}: blank line between records; remove it (only trailing blank lines are allowed)")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); write one JSON object per line"
            ) from exc
        except (ValueError, RecursionError) as exc:  # a number over Python's digit limit; absurd nesting
            raise DataError(f"{where}: JSON this tool cannot read ({type(exc).__name__}: {str(exc)[:120]})") from exc
        validate_example(record, where)
        examples.append(record)
    return examples


def to_messages(example: dict[str, Any]) -> list[dict[str, str]]:
    """Return the chat messages of a record (instruction/input/output or messages)."""
    validate_example(example)
    if "messages" in example:
        return [{"role": m["role"], "content": m["content"]} for m in example["messages"]]
    user = example["instruction"]
    if example.get("input"):
        user += "\n\n" + example["input"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": example["output"]}]


# --------------------------------------------------------------------------- tokenizing


def tokenize_example(
    tokenizer: Any, messages: Sequence[dict[str, str]], max_length: int | None
) -> TokenizedExample:
    """Tokenize a conversation with labels on assistant tokens only.

    Each assistant span covers the answer's tokens and the end-of-turn token that follows them (the
    EOS or the template's special end token, :mod:`qalora_export.training.chat`); the template's
    markers, scaffolding and whitespace after that token carry no loss. An example longer than
    ``max_length`` is cut to ``max_length`` tokens and returned with ``truncated=True``.
    """
    if max_length is not None and max_length < 1:
        raise DataError(f"max_length must be at least 1, got {max_length}; pass a positive --max-length")
    _validate_messages(list(messages), "conversation")
    full = render(tokenizer, messages)
    input_ids = encode(tokenizer, full)
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, stop in answer_token_spans(tokenizer, messages, full, input_ids):
        labels[start:stop] = input_ids[start:stop]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids=input_ids, labels=labels, truncated=truncated)


def build_dataset(
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    max_length: int,
    on_overlong: Literal["drop", "truncate"] = "drop",
) -> tuple[list[TokenizedExample], DatasetStats]:
    """Tokenize records; overlong ones are dropped or truncated, never silently.

    Examples left without any response token (e.g. after truncation) are dropped and counted.
    """
    if on_overlong not in ("drop", "truncate"):
        raise DataError(f"on_overlong must be 'drop' or 'truncate', got {on_overlong!r}; fix --on-overlong")
    stats = DatasetStats(examples_in=len(examples))
    kept: list[TokenizedExample] = []
    for example in examples:
        item = tokenize_example(tokenizer, to_messages(example), max_length)
        if item.truncated and on_overlong == "drop":
            stats.dropped_overlong += 1
            continue
        if item.num_response_tokens == 0:
            stats.dropped_no_response += 1
            continue
        stats.truncated += int(item.truncated)
        stats.response_tokens += item.num_response_tokens
        stats.total_tokens += len(item.input_ids)
        kept.append(item)
    stats.examples = len(kept)
    return kept, stats


def collate(batch: Sequence[TokenizedExample], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example; padding gets mask 0 and label ``IGNORE_INDEX``."""
    if not batch:
        raise DataError("cannot collate an empty batch; check that the dataset is not empty")
    if pad_token_id is None:
        raise DataError("the tokenizer has no pad token id; set tokenizer.pad_token (e.g. to its EOS token)")
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def split_held_out(
    examples: Sequence[Any], held_out: float | int, seed: int
) -> tuple[list[Any], list[Any]]:
    """Split into ``(train, held_out)`` deterministically for a seed; both keep input order.

    ``held_out`` is a fraction in (0, 1) or a count in [1, len(examples) - 1].
    """
    total = len(examples)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise DataError(f"held-out size must be a fraction or a count, got {held_out!r}")
    if isinstance(held_out, float):
        if not 0.0 < held_out < 1.0:
            raise DataError(f"held-out fraction must be in (0, 1), got {held_out}; fix --held-out")
        count = max(1, round(held_out * total))
    else:
        count = held_out
    if not 1 <= count < total:
        raise DataError(
            f"held-out size {count} leaves no training or no held-out examples out of {total}; "
            "choose a smaller --held-out or provide more data"
        )
    order = list(range(total))
    random.Random(seed).shuffle(order)
    chosen = set(order[:count])
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    held = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, held
