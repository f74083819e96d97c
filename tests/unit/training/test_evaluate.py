"""Tests of qalora_export.training.evaluate: the response-only loss, held-out loss and greedy accuracy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import tiny_models
from qalora_export.training.examples import IGNORE_INDEX, build_dataset, collate
from qalora_export.training.evaluate import exact_match_accuracy, greedy_generate, held_out_loss, response_loss
from qalora_export.modeling.model import build_model
from qalora_export.training.prepare import load_tokenizer

RECORDS = [
    {"instruction": "w10 w11 w12", "output": "w12 w11 w10"},
    {"instruction": "w20 w21", "input": "w22 w23 w24 w25", "output": "w25"},
    {"messages": [{"role": "system", "content": "w5"}, {"role": "user", "content": "w30"},
                  {"role": "assistant", "content": "w31 w32"}]},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_base(tmp_path_factory.mktemp("eval") / "base", bits=4, group_size=32)


@pytest.fixture(scope="module")
def model(base):
    return build_model(base)


@pytest.fixture(scope="module")
def tokenizer(base):
    return load_tokenizer(base)


def test_response_loss_equals_transformers_loss(model, tokenizer):
    dataset, _ = build_dataset(tokenizer, RECORDS, max_length=64)
    batch = collate(dataset, tokenizer.pad_token_id)
    with torch.no_grad():
        reference = model(**batch).loss
        total, count = response_loss(model, **batch)
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert float(total / count) == pytest.approx(float(reference), rel=1e-6)


def test_held_out_loss_is_token_weighted_and_batch_independent(model, tokenizer):
    dataset, _ = build_dataset(tokenizer, RECORDS, max_length=64)
    one = held_out_loss(model, dataset, tokenizer.pad_token_id, batch_size=1)
    three = held_out_loss(model, dataset, tokenizer.pad_token_id, batch_size=3)
    assert one == pytest.approx(three, rel=1e-5)
    assert math.isnan(held_out_loss(model, [], tokenizer.pad_token_id))


def manual_greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            out.append(token)
    return out


def test_batched_greedy_generation_equals_one_prompt_at_a_time(model, tokenizer):
    from qalora_export.training.examples import render

    prompts = [[{"role": "user", "content": "w10 w11 w12 w13 w14 w15"}], [{"role": "user", "content": "w40"}]]
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, batched):
        ids = tokenizer(render(tokenizer, prompt, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        expected = manual_greedy(model, list(ids), 6, tokenizer.eos_token_id)
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
        assert greedy_generate(model, tokenizer, [prompt], max_new_tokens=6) == [text]


def test_exact_match_accuracy_counts_the_checker(model, tokenizer):
    seen: list[tuple[int, int]] = []
    result = exact_match_accuracy(model, tokenizer, RECORDS, lambda ex, text: "w25" in ex.get("output", ""),
                                  max_new_tokens=3, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert (result.correct, result.total) == (1, 3) and result.accuracy == pytest.approx(1 / 3)
    assert seen == [(2, 3), (3, 3)]
    assert [s.expected for s in result.samples] == ["w12 w11 w10", "w25", "w31 w32"]
    assert result.samples[1].correct and not result.samples[0].correct


def test_cached_base_weights_change_nothing_and_are_released(model, tokenizer):
    from qalora_export.training.evaluate import cached_base_weights
    from qalora_export.modeling.qalora_linear import QALoRALinear

    prompts = [[{"role": "user", "content": "w10 w11 w12"}], [{"role": "user", "content": "w7"}]]
    plain = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, cache_weights=False)
    assert greedy_generate(model, tokenizer, prompts, max_new_tokens=5, cache_weights=True) == plain
    ids = torch.randint(4, tiny_models.TINY_VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    layers = [m for m in model.modules() if isinstance(m, QALoRALinear)]
    with torch.no_grad():
        reference = model(ids).logits
        with cached_base_weights(model):
            assert all(m._weight_cache is not None for m in layers)
            assert torch.equal(model(ids).logits, reference)  # bit-identical
    assert all(m._weight_cache is None for m in layers)
