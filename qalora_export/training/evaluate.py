"""Measuring an unmerged QA-LoRA model on instruction data: held-out loss and exact-match accuracy.

Both run on the model ``build_model`` returns (frozen quantized base + adapters, unmerged), so
``train`` can report a held-out loss before and after training and the demo can show what an
adapter changed before any merge or export.

- :func:`response_loss` is the training objective too: the mean next-token cross-entropy over the
  response tokens only (labels ``IGNORE_INDEX`` elsewhere, see ``data.py``). It runs the decoder
  on the whole batch but the LM head only at positions that carry a loss, which on short answers
  saves most of the vocabulary projection (49152 x 576 per token on SmolLM2).
- :func:`held_out_loss` is the same loss over a dataset, weighted by response tokens.
- :func:`exact_match_accuracy` generates greedily from each prompt (the conversation without its
  final assistant turn) and asks a task-specific checker whether the answer is right.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from qalora_export.modeling.qalora_linear import QALoRALinear
from qalora_export.training.chat import render
from qalora_export.training.examples import IGNORE_INDEX, TokenizedExample, collate, to_messages


@contextlib.contextmanager
def cached_base_weights(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Dequantize every frozen base weight once for the block (``QALoRALinear``'s cache).

    Generation runs every layer once per new token, so without the cache each token pays a full
    dequant pass over the model; with it, one float copy of the weights stays in memory for the
    block (about 4 bytes per parameter in float32).
    """
    modules = [m for m in model.modules() if isinstance(m, QALoRALinear)] if enabled else []
    try:
        for module in modules:
            module.cache_dequantized_weight(True)
        yield
    finally:
        for module in modules:
            module.cache_dequantized_weight(False)


def autocast_context(device: torch.device | str):
    """bf16 autocast on CUDA (training and evaluation speed); a no-op elsewhere (CPU: float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def response_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over response tokens, and how many there are.

    Args:
        model: a transformers ``*ForCausalLM`` (decoder via ``get_decoder()``, head via
            ``get_output_embeddings()``).
        input_ids, attention_mask, labels: int64 ``[batch, seq]`` (``collate``'s output);
            position ``t`` predicts ``labels[:, t + 1]``.

    Returns:
        (float32 scalar sum of token losses, number of tokens). Divide for the mean, which equals
        transformers' own ``labels=`` loss on the same batch.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    # No KV cache: nothing generates from it, and activation checkpointing refuses one.
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # [B, T-1]
    n_tokens = int(keep.sum())
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    logits = head(hidden[:, :-1][keep])  # [n_tokens, vocab]: the head only where a loss is taken
    loss = nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, n_tokens


def batches(dataset: Sequence[TokenizedExample], batch_size: int) -> list[list[TokenizedExample]]:
    """Consecutive batches in dataset order (evaluation needs no shuffling)."""
    return [list(dataset[i:i + batch_size]) for i in range(0, len(dataset), batch_size)]


@torch.no_grad()
def held_out_loss(model: nn.Module, dataset: Sequence[TokenizedExample], pad_token_id: int,
                  batch_size: int = 8, device: torch.device | str = "cpu", cache_weights: bool = False) -> float:
    """Mean cross-entropy per response token over ``dataset`` (nan when it has none).

    ``cache_weights`` dequantizes the base once for all batches (:func:`cached_base_weights`).
    The model is left in eval mode.
    """
    model.eval()
    total, count = 0.0, 0
    with cached_base_weights(model, cache_weights and len(dataset) > batch_size):
        for batch in batches(dataset, batch_size):
            tensors = {k: v.to(device) for k, v in collate(batch, pad_token_id).items()}
            with autocast_context(device):
                loss_sum, n = response_loss(model, **tensors)
            total += float(loss_sum)
            count += n
    return total / count if count else math.nan


# --------------------------------------------------------------------------------------- generation


@dataclass
class GenerationSample:
    """One prompt's greedy answer and whether the checker accepted it."""

    prompt: str
    expected: str
    generated: str
    correct: bool


@dataclass
class AccuracyResult:
    """Exact-match accuracy over a set of examples."""

    correct: int
    total: int
    samples: list[GenerationSample] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan


def prompt_and_answer(example: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """The conversation up to the last user turn, and the expected final assistant answer."""
    messages = to_messages(example)
    return messages[:-1], messages[-1]["content"]


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]],
                    max_new_tokens: int = 32, device: torch.device | str = "cpu",
                    cache_weights: bool = True) -> list[str]:
    """Greedy continuations of chat prompts, decoded without special tokens.

    Prompts are rendered the way ``data.py`` renders training data (chat template with the
    generation prompt, or the plain fallback) and tokenized without extra special tokens; the
    batch is left-padded so every row continues from its last real token. Generation stops at
    the tokenizer's EOS. ``cache_weights`` dequantizes the base once for the call
    (:func:`cached_base_weights`) instead of once per generated token.
    """
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [list(tokenizer(render(tokenizer, list(p), add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"]) for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    with autocast_context(device), cached_base_weights(model, cache_weights):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             eos_token_id=eos, pad_token_id=pad)
    new_tokens = out[:, width:].cpu()
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new_tokens]


def exact_match_accuracy(model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]],
                         check_answer: Callable[[dict[str, Any], str], bool],
                         max_new_tokens: int = 32, batch_size: int = 16,
                         device: torch.device | str = "cpu",
                         progress: Optional[Callable[[int, int], None]] = None,
                         cache_weights: bool = True) -> AccuracyResult:
    """Share of ``examples`` whose greedy answer ``check_answer(example, text)`` accepts.

    Args:
        examples: records as ``data.read_jsonl`` returns them (instruction/input/output or
            messages ending with the expected assistant answer).
        check_answer: the task's checker, e.g. ``fixtures.instruct_task.check_answer``.
        progress: called with (examples done, total) after each batch.
        cache_weights: keep the dequantized base for the whole evaluation (one float copy of
            the weights in memory; much faster generation).
    """
    result = AccuracyResult(correct=0, total=0)
    with cached_base_weights(model, cache_weights):
        for start in range(0, len(examples), batch_size):
            result = _accuracy_batch(model, tokenizer, examples, start, batch_size, check_answer,
                                     max_new_tokens, device, result)
            if progress is not None:
                progress(result.total, len(examples))
    return result


def _accuracy_batch(model, tokenizer, examples, start, batch_size, check_answer, max_new_tokens, device,
                    result: AccuracyResult) -> AccuracyResult:
    chunk = list(examples[start:start + batch_size])
    prompts, expected = zip(*(prompt_and_answer(ex) for ex in chunk))
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens, device, cache_weights=False)
    for example, prompt, answer, text in zip(chunk, prompts, expected, texts):
        ok = bool(check_answer(example, text))
        result.correct += int(ok)
        result.total += 1
        result.samples.append(GenerationSample(prompt=prompt[-1]["content"], expected=answer,
                                               generated=text, correct=ok))
    return result
