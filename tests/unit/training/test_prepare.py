"""Tests of qalora_export.training.prepare: the tokenizer, the data a run trains on, the batch stream.

The tokenizer is the WordLevel one of ``tiny_models`` (tokens ``w4 .. w127``, ``<|im_start|>`` = 1
as BOS, ``<|im_end|>`` = 2 as EOS, ``<pad>`` = 3; ``user``/``assistant`` are ``<unk>`` = 0), so the
length of a rendered instruction record is known in advance: ``<|im_start|> user <instruction words>
<|im_end|> <|im_start|> assistant <output words> <|im_end|>`` is ``6 + n_in + n_out`` tokens, of which
the last ``n_out + 1`` (the output and its end-of-turn token) carry the loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import tiny_models
import torch

from qalora_export.errors import CheckpointError, DataError
from qalora_export.training.config import TrainConfig
from qalora_export.training.examples import IGNORE_INDEX, DatasetStats
from qalora_export.training.prepare import (
    BatchStream,
    PreparedData,
    file_sha256,
    load_tokenizer,
    prepare_data,
)

PAD, BOS, EOS, UNK = 3, 1, 2, 0


def record(rng: random.Random, n_in: int, n_out: int, with_input: bool = False) -> dict:
    words = [f"w{rng.randint(10, 120)}" for _ in range(n_in + n_out)]
    rec = {"instruction": " ".join(words[:n_in]), "output": " ".join(words[n_in:])}
    if with_input:  # the instruction's last word moved into "input": the same tokens, joined by "\n\n"
        rec = {"instruction": " ".join(words[:n_in - 1]), "input": words[n_in - 1], "output": rec["output"]}
    return rec


def expected_ids(rec: dict) -> list[int]:
    """The token ids of a record rendered by the tiny chat template (independent of the code under test)."""
    user = rec["instruction"].split() + (rec.get("input") or "").split()
    words = user, rec["output"].split()
    return [BOS, UNK, *(int(w[1:]) for w in words[0]), EOS, BOS, UNK, *(int(w[1:]) for w in words[1]), EOS]


def make_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [record(rng, rng.randint(2, 6), rng.randint(1, 4), with_input=bool(i % 3 == 0)) for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tiny_models.make_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


# ----------------------------------------------------------------------------- file_sha256


@pytest.mark.parametrize("size", [0, 17, (1 << 20), (5 << 19) + 3])  # empty, small, one chunk, 2.5 chunks
def test_file_sha256_is_hashlib_of_the_bytes(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_sha256(path) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_file_sha256_sees_a_one_byte_change_past_the_first_chunk(tmp_path):
    data = bytearray(os.urandom((1 << 20) + 100))
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(data))
    before = file_sha256(path)
    data[(1 << 20) + 50] ^= 0x01
    path.write_bytes(bytes(data))
    assert file_sha256(path) != before
    assert file_sha256(path) == "sha256:" + hashlib.sha256(bytes(data)).hexdigest()


# ----------------------------------------------------------------------------- load_tokenizer


def _tokenizer_without(out_dir: Path, *, pad: bool, eos: bool) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"unk_token": "<unk>", "bos_token": "<s>"}
    if eos:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "a"
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(str(out_dir))
    return out_dir


def test_load_tokenizer_keeps_its_pad_token(tokenizer):
    assert tokenizer.pad_token_id == PAD and tokenizer.pad_token == "<pad>"
    assert tokenizer.eos_token_id == EOS and tokenizer.bos_token_id == BOS
    assert tokenizer("w17 w99", add_special_tokens=False)["input_ids"] == [17, 99]


def test_load_tokenizer_pads_with_eos_when_there_is_no_pad(tmp_path):
    tok = load_tokenizer(_tokenizer_without(tmp_path, pad=False, eos=True))
    assert tok.pad_token_id == 2 and tok.pad_token == "</s>"


def test_load_tokenizer_without_pad_and_eos_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither a pad nor an EOS token"):
        load_tokenizer(_tokenizer_without(tmp_path, pad=False, eos=False))


def test_load_tokenizer_without_files_names_the_directory(tmp_path):
    empty = tmp_path / "no-tokenizer"
    empty.mkdir()
    match = r"(?s)no-tokenizer: cannot load the tokenizer \(.*quantize` copies them"
    with pytest.raises(CheckpointError, match=match):
        load_tokenizer(empty)


# ----------------------------------------------------------------------------- prepare_data


def test_prepare_data_splits_tokenizes_and_counts(tokenizer, tmp_path):
    records = make_records(20, seed=1)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = prepare_data(tokenizer, path, TrainConfig(held_out=5, seed=7, max_length=64))
    assert isinstance(data, PreparedData) and data.pad_token_id == PAD
    assert len(data.train) == 15 and len(data.held_out) == 5

    # the held-out set is 5 records of the file, both sets in file order, together all of it
    all_ids = [expected_ids(r) for r in records]
    train_ids = [e.input_ids for e in data.train]
    held_ids = [e.input_ids for e in data.held_out]
    positions = [all_ids.index(ids) for ids in held_ids]
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert train_ids == [ids for i, ids in enumerate(all_ids) if i not in positions]

    for example in data.train + data.held_out:
        ids = example.input_ids
        start = len(ids) - ids[::-1].index(BOS) + 1  # after the last "<|im_start|> assistant"
        assert example.labels == [IGNORE_INDEX] * start + ids[start:]
        assert example.labels[-1] == EOS and not example.truncated

    for name, part in (("train", data.train), ("held_out", data.held_out)):
        stats = data.stats[name]
        assert stats == {"examples_in": len(part), "examples": len(part), "dropped_overlong": 0, "truncated": 0,
                         "dropped_no_response": 0,
                         "response_tokens": sum(e.num_response_tokens for e in part),
                         "total_tokens": sum(len(e.input_ids) for e in part)}
    json.dumps(data.stats)  # recorded in the adapter's metadata: JSON-able


def test_prepare_data_split_is_deterministic_for_a_seed(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_records(30, seed=2))

    def held(seed: int) -> list[list[int]]:
        return [e.input_ids for e in prepare_data(tokenizer, path, TrainConfig(held_out=0.2, seed=seed)).held_out]

    first = held(3)
    assert len(first) == 6  # round(0.2 * 30)
    assert held(3) == first
    assert held(4) != first  # another seed holds out other records (6 of 30: same set has p < 1e-6)


def test_prepare_data_without_held_out_keeps_everything(tokenizer, tmp_path):
    records = make_records(9, seed=3)
    data = prepare_data(tokenizer, write_jsonl(tmp_path / "d.jsonl", records), TrainConfig(held_out=0))
    assert [e.input_ids for e in data.train] == [expected_ids(r) for r in records]
    assert data.held_out == [] and data.stats["held_out"] == asdict(DatasetStats())
    assert data.stats["train"]["examples"] == 9


def test_prepare_data_accepts_the_messages_shape(tokenizer, tmp_path):
    records = [{"messages": [{"role": "system", "content": "w5"}, {"role": "user", "content": "w6 w7"},
                             {"role": "assistant", "content": "w8"}, {"role": "user", "content": "w9"},
                             {"role": "assistant", "content": "w11 w12"}]}] * 3
    data = prepare_data(tokenizer, write_jsonl(tmp_path / "m.jsonl", records), TrainConfig(held_out=1))
    assert len(data.train) == 2 and len(data.held_out) == 1
    example = data.train[0]
    assert example.input_ids == [BOS, UNK, 5, EOS, BOS, UNK, 6, 7, EOS, BOS, UNK, 8, EOS,
                                 BOS, UNK, 9, EOS, BOS, UNK, 11, 12, EOS]
    assert [t for t in example.labels if t != IGNORE_INDEX] == [8, EOS, 11, 12, EOS]  # both assistant turns


def _length_records() -> list[dict]:
    """(n_in, n_out) chosen around max_length 12: full lengths 6 + n_in + n_out."""
    rng = random.Random(5)
    shapes = [(2, 1), (3, 3), (2, 4), (4, 4), (8, 2), (3, 1), (9, 3)]  # lengths 9, 12, 12, 14, 16, 10, 18
    return [record(rng, n_in, n_out) for n_in, n_out in shapes]


def test_overlong_examples_are_dropped_and_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _length_records())
    data = prepare_data(tokenizer, path, TrainConfig(held_out=0, max_length=12, on_overlong="drop"))
    assert [len(e.input_ids) for e in data.train] == [9, 12, 12, 10]
    stats = data.stats["train"]
    assert stats["examples_in"] == 7 and stats["examples"] == 4
    assert stats["dropped_overlong"] == 3 and stats["truncated"] == 0 and stats["dropped_no_response"] == 0
    assert stats["total_tokens"] == 43 and stats["response_tokens"] == 2 + 4 + 5 + 2


def test_overlong_examples_are_truncated_and_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _length_records())
    data = prepare_data(tokenizer, path, TrainConfig(held_out=0, max_length=12, on_overlong="truncate"))
    # (4, 4): response starts at 5 + 4 = 9 -> 3 response tokens kept; (8, 2): starts at 13 -> none left
    # (dropped, no response); (9, 3): starts at 14 -> none left
    assert [len(e.input_ids) for e in data.train] == [9, 12, 12, 12, 10]
    assert [e.truncated for e in data.train] == [False, False, False, True, False]
    assert data.train[3].num_response_tokens == 3
    stats = data.stats["train"]
    assert stats["examples"] == 5 and stats["truncated"] == 1 and stats["dropped_no_response"] == 2
    assert stats["dropped_overlong"] == 0 and stats["response_tokens"] == 2 + 4 + 5 + 3 + 2


def test_nothing_left_to_train_on_is_a_data_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", _length_records())
    with pytest.raises(DataError, match=r"no training example is left .*7 longer than --max-length 8"):
        prepare_data(tokenizer, path, TrainConfig(held_out=0, max_length=8))


@pytest.mark.parametrize(("text", "match"), [
    ('{"instruction": "w5", "output": "w6"}\n{"instruction": "w5" "output": "w6"}\n', r"d\.jsonl:2: malformed JSON"),
    ('{"instruction": "w5", "output": "w6"}\n{"instruction": "w5"}\n', r"d\.jsonl:2: missing field 'output'"),
    ('', r"d\.jsonl: the file is empty"),
    ('{"instruction": "w5", "output": "w6"}\n\n{"instruction": "w5", "output": "w6"}\n', r"d\.jsonl:2: blank line"),
])
def test_bad_data_file_is_a_data_error_naming_the_line(tokenizer, tmp_path, text, match):
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        prepare_data(tokenizer, path, TrainConfig(held_out=0))


def test_missing_data_file_is_a_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read training data"):
        prepare_data(tokenizer, tmp_path / "missing.jsonl", TrainConfig())


def test_held_out_leaving_no_training_data_is_a_data_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", make_records(4))
    with pytest.raises(DataError, match="held-out size 4 leaves no training or no held-out examples out of 4"):
        prepare_data(tokenizer, path, TrainConfig(held_out=4))


# ----------------------------------------------------------------------------- BatchStream


def test_batch_stream_batches_are_full_seeded_and_cover_every_epoch():
    n, size = 13, 5
    stream = BatchStream(n, size, seed=11)
    batches = [stream.next_batch() for _ in range(13)]  # 65 draws = exactly 5 epochs
    assert all(len(b) == size for b in batches)
    flat = [i for b in batches for i in b]
    epochs = [flat[e * n:(e + 1) * n] for e in range(5)]
    assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 5  # a fresh permutation per epoch
    assert stream.state_dict() == {"epoch": 4, "position": 13}  # the next epoch starts at the next draw
    again = BatchStream(n, size, seed=11)
    assert [again.next_batch() for _ in range(13)] == batches
    other = BatchStream(n, size, seed=12)
    assert [other.next_batch() for _ in range(13)] != batches


def test_batch_stream_epoch_permutation_is_pinned():
    """Checkpoints store only (epoch, position): the permutation of an epoch must not change across
    versions, or a resumed run would draw other batches than the run it continues."""
    stream = BatchStream(9, 9, seed=4)
    for epoch in range(3):
        gen = torch.Generator().manual_seed(4 * 1_000_003 + epoch)
        assert stream.next_batch() == torch.randperm(9, generator=gen).tolist()


@pytest.mark.parametrize("stop_after", [0, 1, 2, 3, 7])
def test_batch_stream_resumes_exactly_from_its_state(stop_after):
    reference = BatchStream(10, 4, seed=3)
    expected = [reference.next_batch() for _ in range(12)]
    run = BatchStream(10, 4, seed=3)
    for _ in range(stop_after):
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
    assert set(state) == {"epoch", "position"} and all(isinstance(v, int) for v in state.values())
    resumed = BatchStream(10, 4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(12 - stop_after)] == expected[stop_after:]


def test_batch_stream_state_counts_epoch_and_position():
    stream = BatchStream(10, 4, seed=0)
    assert stream.state_dict() == {"epoch": 0, "position": 0}
    states = []
    for _ in range(4):
        stream.next_batch()
        states.append(stream.state_dict())
    # 4, 8, then 2 left of epoch 0 + 2 of epoch 1, then 6 of epoch 1
    assert states == [{"epoch": 0, "position": 4}, {"epoch": 0, "position": 8},
                      {"epoch": 1, "position": 2}, {"epoch": 1, "position": 6}]


def test_batch_stream_wraps_epochs_inside_one_batch_when_n_is_small():
    stream = BatchStream(3, 8, seed=5)
    batch = stream.next_batch()
    assert len(batch) == 8
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2]  # epochs 0 and 1 whole, then 2 of epoch 2
    assert set(batch[6:]) < {0, 1, 2} and len(set(batch[6:])) == 2
    assert stream.state_dict() == {"epoch": 2, "position": 2}
    single = BatchStream(1, 3, seed=0)
    assert single.next_batch() == [0, 0, 0]


def test_batch_stream_without_examples_is_a_data_error():
    with pytest.raises(DataError, match="no training examples"):
        BatchStream(0, 4, seed=0)
