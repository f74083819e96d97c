"""Answer spans in rendered conversations (qalora_export.training.chat) for template shapes the
model families use: history rendered unlike the last turn (Qwen3's think blocks), whitespace that
SentencePiece merges into the answer's first token, templates that drop, refuse or rewrite messages.
The real families' templates and tokenizers are checked in tests/e2e/test_families_core.py."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qalora_export.errors import DataError
from qalora_export.training.examples import IGNORE_INDEX, tokenize_example

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<think>", "</think>", "user", "assistant", "system", "[INST]", "[/INST]",
         "one", "two", "first", "second", "answer", "sys"]
CONVERSATION = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]


def tokenizer(template: str, metaspace: bool = False) -> PreTrainedTokenizerFast:
    vocab = {("▁" + w if metaspace and not w.startswith("<") else w): i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = (pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True) if metaspace
                         else pre_tokenizers.WhitespaceSplit())
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=["<think>", "</think>"])
    fast.chat_template = template
    return fast


def labelled_words(tok, example) -> list[str]:
    return tok.convert_ids_to_tokens([t for t in example.labels if t != IGNORE_INDEX])


# Qwen3's shape: the last answer after the last user turn gets an (empty) think block, earlier answers
# none, so a shorter conversation does not render as a prefix of a longer one.
THINK = ("{% for m in messages %}<s> {{ m.role }} {% if m.role == 'assistant' and loop.last %}<think> </think> "
         "{% endif %}{{ m.content }} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}")


def test_history_rendered_unlike_the_last_turn():
    tok = tokenizer(THINK)
    example = tokenize_example(tok, CONVERSATION, None)
    assert labelled_words(tok, example) == ["first", "answer", "</s>", "second", "answer", "</s>"]
    words = tok.convert_ids_to_tokens(example.input_ids)
    assert words.count("<think>") == 1  # only before the last answer, and there as context
    assert example.labels[words.index("<think>")] == IGNORE_INDEX
    single = tokenize_example(tok, CONVERSATION[:2], None)
    assert labelled_words(tok, single) == ["first", "answer", "</s>"]


def test_whitespace_merged_into_the_first_answer_token():
    # "[/INST] first": SentencePiece-style pieces carry their leading space ("▁first")
    template = ("{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
                "{% else %} {{ m.content }}</s>{% endif %}{% endfor %}")
    tok = tokenizer(template, metaspace=True)
    example = tokenize_example(tok, CONVERSATION, None)
    assert labelled_words(tok, example) == ["▁first", "▁answer", "</s>", "▁second", "▁answer", "</s>"]


def test_templates_that_lose_refuse_or_rewrite_messages_are_refused():
    drops_system = ("{% for m in messages %}{% if m.role != 'system' %}<s> {{ m.role }} {{ m.content }} </s> "
                    "{% endif %}{% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}")
    tok = tokenizer(drops_system)
    assert labelled_words(tok, tokenize_example(tok, CONVERSATION[:2], None)) == ["first", "answer", "</s>"]
    with pytest.raises(DataError, match=r"drops messages\[0\] \(role system\)"):
        tokenize_example(tok, [{"role": "system", "content": "sys"}] + CONVERSATION[:2], None)

    refuses = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
               "<s> {{ m.role }} {{ m.content }} </s> {% endfor %}")
    with pytest.raises(DataError, match="refuses a conversation of roles system/user/assistant.*no system role"):
        tokenize_example(tokenizer(refuses), [{"role": "system", "content": "sys"}] + CONVERSATION[:2], None)

    rewrites = ("{% for m in messages %}<s> {{ m.role }} {{ m.content | replace('first', 'second') }} </s> "
                "{% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}")
    with pytest.raises(DataError, match="changes assistant message 1's text"):
        tokenize_example(tokenizer(rewrites), [{"role": "user", "content": "one"},
                                               {"role": "assistant", "content": "first answer"}], None)


def test_no_end_token_leaves_the_span_at_the_answer():
    template = ("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
                "{% if add_generation_prompt %}assistant {% endif %}")
    tok = tokenizer(template)
    assert labelled_words(tok, tokenize_example(tok, CONVERSATION, None)) == ["first", "answer", "second", "answer"]
