"""Training data for a QA-LoRA run: reading, splitting and tokenizing it, and the seeded batch stream.

``prepare_data`` reads the JSONL (``data.py`` checks every line and names it), splits off the
held-out set and tokenizes both with the base's tokenizer, counting what ``--max-length`` dropped
or truncated (``PreparedData.stats``, reported by ``train``). :class:`BatchStream` draws the
global batches of every step from seeded epoch permutations; its position is two integers, which
is what a checkpoint stores to resume exactly, and every rank of a data-parallel run draws the
same batches from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qalora_export.errors import CheckpointError, DataError
from qalora_export.training.examples import DatasetStats, TokenizedExample, build_dataset, read_jsonl, split_held_out

if TYPE_CHECKING:
    from qalora_export.training.config import TrainConfig


class BatchStream:
    """Batches of example indices from an endless, seeded stream of epoch permutations.

    Epoch ``e`` is ``randperm(n)`` under seed ``(seed, e)``; the stream concatenates epochs, so
    every batch is full even when ``n`` is not a multiple of the batch size (or smaller than it).
    The position is two integers (:meth:`state_dict`), enough to resume a run exactly.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise DataError("no training examples to draw batches from")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), self.n - self.position)
            out.extend(self._order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


@dataclass
class PreparedData:
    """Tokenized train and held-out sets plus what tokenizing them counted."""

    train: list[TokenizedExample]
    held_out: list[TokenizedExample]
    stats: dict
    pad_token_id: int


def load_tokenizer(base_dir: Path):
    """The base checkpoint's tokenizer, with a pad id (its pad token, else its EOS)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as exc:  # transformers raises OSError/ValueError/... for missing files
        raise CheckpointError(
            f"{base_dir}: cannot load the tokenizer ({exc}); the base directory needs the tokenizer "
            f"files of the model it was quantized from (`qalora-export quantize` copies them)"
        ) from exc
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise CheckpointError(f"{base_dir}: the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token  # padding positions carry no loss and no attention
    return tokenizer


def prepare_data(tokenizer, data_path: Path, config: TrainConfig) -> PreparedData:
    """Read, split and tokenize; raise :class:`DataError` when nothing is left to train on."""
    examples = read_jsonl(data_path)
    if config.held_out:
        train_records, held_records = split_held_out(examples, config.held_out, config.seed)
    else:
        train_records, held_records = list(examples), []
    train, train_stats = build_dataset(tokenizer, train_records, config.max_length, config.on_overlong)
    held, held_stats = build_dataset(tokenizer, held_records, config.max_length, config.on_overlong) \
        if held_records else ([], DatasetStats())
    if not train:
        raise DataError(
            f"{data_path}: no training example is left after tokenizing ({train_stats.dropped_overlong} longer "
            f"than --max-length {config.max_length}, {train_stats.dropped_no_response} without a response "
            f"token); raise --max-length or pass --on-overlong truncate"
        )
    stats = {"train": asdict(train_stats), "held_out": asdict(held_stats)}
    return PreparedData(train, held, stats, int(tokenizer.pad_token_id))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
