"""Rendering conversations with a chat template, and finding each assistant answer's tokens in them.

The loss of a QA-LoRA run covers the assistant's answers only: each answer's own tokens plus the
end-of-turn token the template puts right after it (``<|eot_id|>``, ``</s>``, ``<|im_end|>``,
the tokenizer's EOS in the plain fallback format), so that the model learns to stop. Everything the
template writes around an answer is context: headers, role markers, a default system prompt, and
scaffolding it inserts between the generation prompt and the answer (Qwen3's empty
``<think>\\n\\n</think>\\n\\n``, which is what its ``enable_thinking=False`` prompt holds), and
whitespace after the end-of-turn token.

No template-specific markers are hard-coded. The whole conversation is rendered once (that text
is what the model trains on); each answer's place in it is found by rendering the conversation
again with that answer replaced by a sentinel string (everything else renders the same, so the
answer is what lies between the common head and tail). Templates that render history differently
from the last turn (Qwen3 drops earlier turns' think blocks) work, since nothing assumes that a
shorter conversation renders as a prefix of a longer one. What is checked instead is what
training relies on:

- the generation prompt (``messages[:k]`` with ``add_generation_prompt``) is a token prefix of the
  rendered conversation ending before answer ``k``: the model learns to answer what it will be
  prompted with;
- the template renders each answer verbatim (up to surrounding whitespace it trims) and drops no
  message's text (a template that ignores system messages would train on other data than given).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qalora_export.errors import DataError

#: Replaces one assistant answer to locate it in the rendered text (never occurs in real text:
#: it is checked to be absent from the conversation).
SENTINEL = "\u2063qalora-export answer\u2063"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _fallback_render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts = [getattr(tokenizer, "bos_token", None) or ""]
    for message in messages:
        if message["role"] == "system":
            parts.append(f"{message['content']}\n\n")
        elif message["role"] == "user":
            parts.append(f"### Instruction:\n{message['content']}\n\n")
        else:
            parts.append(f"### Response:\n{message['content']}{eos}\n\n")
    if add_generation_prompt:
        parts.append("### Response:\n")
    return "".join(parts)


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render messages as text with the chat template, or the plain fallback format.

    Raises:
        DataError: the template refuses the conversation (e.g. a template that raises on a role it
            does not support), naming its message.
    """
    if not has_chat_template(tokenizer):
        return _fallback_render(tokenizer, messages, add_generation_prompt)
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2's TemplateError, raise_exception(...) in the template, ...
        roles = "/".join(m["role"] for m in messages)
        raise DataError(
            f"the tokenizer's chat template refuses a conversation of roles {roles} "
            f"({type(exc).__name__}: {exc}); change the record to a shape the template accepts "
            f"(e.g. no system message, alternating user/assistant turns)"
        ) from exc
    if not isinstance(text, str):
        raise DataError(f"the chat template rendered {type(text).__name__}, not text; check the tokenizer's chat_template")
    return text


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as rendered (the template writes the special tokens itself)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def end_token_ids(tokenizer: Any) -> set[int]:
    """Tokens that can close a turn: the EOS and every special token of the vocabulary."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, token in decoder.items() if getattr(token, "special", False)}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def _answer_chars(tokenizer: Any, messages: Sequence[dict[str, str]], k: int, full: str) -> tuple[int, int]:
    """Character span of assistant message ``k``'s text in ``full`` (the rendered conversation)."""
    marked = [dict(m) for m in messages]
    marked[k]["content"] = SENTINEL
    text = render(tokenizer, marked)
    at = text.find(SENTINEL)
    if at < 0 or text.count(SENTINEL) != 1:
        raise DataError(
            f"the chat template does not render assistant message {k}'s text once and verbatim; the answer's "
            f"tokens cannot be found for the loss mask. Use a template that writes message['content'] as it is, "
            f"or remove the tokenizer's chat_template to use the plain format"
        )
    head, tail = text[:at], text[at + len(SENTINEL):]
    start, end = len(head), len(full) - len(tail)
    if not (full.startswith(head) and full.endswith(tail) and start <= end):
        raise DataError(
            f"the chat template renders the rest of the conversation differently depending on assistant message "
            f"{k}'s text (e.g. reasoning inside <think> tags that the template moves); the answer's tokens cannot "
            f"be found for the loss mask. Give the answer as plain text"
        )
    if full[start:end].strip() != messages[k]["content"].strip():
        raise DataError(
            f"the chat template changes assistant message {k}'s text when it renders it; training on it would "
            f"train on other text than the record's. Use a template that writes message['content'] as it is"
        )
    return start, end


def _token_boundary(tokenizer: Any, full: str, chars: int, input_ids: list[int], k: int, what: str) -> int:
    """Number of tokens of ``full`` before character ``chars``: a token prefix of ``input_ids``.

    Whitespace just before an answer may be part of its first token (SentencePiece's ``▁word``);
    then the boundary is where that whitespace starts.
    """
    for cut in dict.fromkeys((chars, len(full[:chars].rstrip()))):
        ids = encode(tokenizer, full[:cut])
        if _is_prefix(ids, input_ids):
            return len(ids)
    raise DataError(
        f"the {what} of assistant message {k} falls inside a token of the rendered conversation (its text merges "
        f"with the template's); the loss mask cannot be computed. Use a template that separates the answer from "
        f"its markers, or remove the tokenizer's chat_template to use the plain format"
    )


def answer_token_spans(tokenizer: Any, messages: Sequence[dict[str, str]], full: str,
                       input_ids: list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` token spans of every assistant answer in ``input_ids`` (= ``full`` encoded),
    each covering the answer's tokens and the end-of-turn token that closes it (with any
    whitespace between them).

    Raises:
        DataError: the template drops a message, changes an answer's text, or renders a generation
            prompt that is not what the model sees before the answer.
    """
    for i, message in enumerate(messages):
        if SENTINEL in message["content"]:
            raise DataError(f"messages[{i}] contains the answer sentinel {SENTINEL!r}; remove it from the text")
        if message["role"] != "assistant" and message["content"].strip() not in full:  # answers: checked below
            raise DataError(
                f"the chat template drops messages[{i}] (role {message['role']}): its text does not appear in the "
                f"rendered conversation, so training would not see it. Fold it into the first user message, "
                f"drop it from the data, or use a template that renders {message['role']} messages"
            )
    ends = end_token_ids(tokenizer)
    spans: list[tuple[int, int]] = []
    last_char = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_char, end_char = _answer_chars(tokenizer, messages, k, full)
        prompt = render(tokenizer, messages[:k], add_generation_prompt=True)
        prompt_ids = encode(tokenizer, prompt)
        if not (full.startswith(prompt) and len(prompt) <= start_char and start_char >= last_char
                and _is_prefix(prompt_ids, input_ids)):
            raise DataError(
                f"the chat template's generation prompt for assistant message {k} is not a prefix of the rendered "
                f"conversation up to that answer; the model would train on other context than it is prompted "
                f"with, so response masks cannot be computed. Use a tokenizer whose template renders the "
                f"generation prompt as it renders the conversation, or remove its chat_template to use the "
                f"plain format"
            )
        start = max(_token_boundary(tokenizer, full, start_char, input_ids, k, "start"), len(prompt_ids))
        stop = _token_boundary(tokenizer, full, end_char, input_ids, k, "end")
        stop = _through_end_token(tokenizer, input_ids, stop, ends)
        spans.append((start, stop))
        last_char = end_char
    return spans


def _through_end_token(tokenizer: Any, input_ids: list[int], stop: int, ends: set[int]) -> int:
    """``stop`` moved past the end-of-turn token that follows the answer (only whitespace between);
    unchanged when the template writes none."""
    j = stop
    while j < len(input_ids) and input_ids[j] not in ends and not tokenizer.decode([input_ids[j]]).strip():
        j += 1
    return j + 1 if j < len(input_ids) and input_ids[j] in ends else stop
