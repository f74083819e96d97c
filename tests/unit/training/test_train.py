"""Tests of qalora_export.training.train: the QA-LoRA training loop on tiny GPTQ bases.

A tiny random LLaMA quantized by RTN learns a small copy task (answer = the instruction's words
reversed) written into a JSONL file by the test. Checked: the loss goes down, nothing but the
adapter factors moves, a seed reproduces the adapter bit for bit, the saved directory is a
loadable PEFT-layout adapter with our metadata and log, bad data is a DataError with nothing
written, and an adapter trained on an act-order base folds into its zero-points exactly.
Bad input the trainer must refuse before training (issue 3): empty or malformed JSONL lines (their
line number in the error), examples longer than ``--max-length`` (counted, never silently cut), a
base that is not a GPTQ checkpoint, an unsupported architecture; resume refusals are in
``test_train_resume.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

import tiny_models
from qalora_export.checkpoint.adapter_files import load_adapter
from qalora_export.training.examples import collate
from qalora_export.errors import (CheckpointError, ConfigError, DataError, OutputExistsError, TrainingError,
                                  UnsupportedModelError)
from qalora_export.training.evaluate import held_out_loss
from qalora_export.core.fold import effective_weight, fold_into_zero_points
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.modeling.model import TARGET_MODULES, build_model, qalora_modules
from qalora_export.modeling.qalora_linear import QALoRALinear
from qalora_export.training.config import TrainConfig
from qalora_export.training.prepare import BatchStream, load_tokenizer, prepare_data
from qalora_export.training.train import iter_training_log, train_adapter
from qalora_export.training.optim import adapter_parameters, init_adapters, lr_lambda, make_optimizer, train_step

GROUP_SIZE = 16
FAST = dict(rank=4, alpha=8.0, batch_size=8, max_length=32, lr=1e-2, warmup_steps=2, held_out=8)


def copy_task(n: int, seed: int = 0) -> list[dict]:
    """Instruction: four words of the tiny vocabulary; output: the same words reversed."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = [f"w{rng.randint(10, 40)}" for _ in range(4)]
        records.append({"instruction": " ".join(words), "output": " ".join(reversed(words))})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dir_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_base(tmp_path_factory.mktemp("train") / "base-w4g16", bits=4, group_size=GROUP_SIZE)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", copy_task(72))


@pytest.fixture(scope="module")
def trained(base, data_file, tmp_path_factory):
    """One 30-step run shared by the tests that only inspect its result."""
    before = dir_digest(base)
    out = tmp_path_factory.mktemp("run") / "adapter"
    progress: list[tuple[int, float]] = []
    result = train_adapter(base, data_file, out, TrainConfig(steps=30, **FAST),
                           progress=lambda step, loss: progress.append((step, loss)))
    return result, out, progress, before


# ----------------------------------------------------------------------------- the run


def test_loss_decreases_on_train_and_held_out(trained):
    result, _, progress, _ = trained
    assert result.steps == 30 and len(result.losses) == 30
    assert [s for s, _ in progress] == list(range(1, 31))
    assert [loss for _, loss in progress] == result.losses
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, result.losses
    assert result.held_out_loss_after < result.held_out_loss_before - 0.3
    assert result.train_loss_first == result.losses[0] and result.train_loss_last == result.losses[-1]
    assert result.train_examples == 64 and result.held_out_examples == 8
    assert result.tokens > 0 and result.seconds > 0
    assert result.dataset_stats["train"]["examples"] == 64 and result.dataset_stats["held_out"]["examples"] == 8


def test_base_checkpoint_is_untouched(trained, base):
    *_, before = trained
    assert dir_digest(base) == before


def test_adapter_directory_loads_with_its_metadata(trained, base, data_file):
    result, out, _, _ = trained
    adapter = load_adapter(out)
    ckpt = GPTQCheckpoint(base)
    assert adapter.pooling == "peft" and adapter.pool_groups == "quantization"
    assert adapter.pool_group_size == GROUP_SIZE
    assert adapter.rank == 4 and adapter.alpha == 8.0
    assert adapter.base_fingerprint == ckpt.fingerprint()
    assert sorted(adapter.target_modules) == sorted(TARGET_MODULES)
    assert sorted(adapter.layers) == ckpt.quantized_modules  # every projection of the tiny LLaMA
    for name, layer in adapter.layers.items():
        rec = ckpt.read_layer(name)
        assert tuple(layer.lora_A.shape) == (4, rec.num_groups)
        assert tuple(layer.lora_B.shape) == (rec.out_features, 4)
        assert float(layer.lora_B.abs().max()) > 0  # trained away from the zero init
    training = adapter.extra["training"]
    assert training["steps"] == 30 and training["lr"] == FAST["lr"] and training["seed"] == 0
    assert training["data_file"] == "train.jsonl"
    assert training["data_sha256"] == "sha256:" + hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert training["held_out_loss_after"] == result.held_out_loss_after
    assert training["train_loss_last"] == result.train_loss_last
    # contiguous base: our pooling over its quantization groups is PEFT's, so PEFT may load it
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_qalora"] is True and config["qalora_group_size"] == GROUP_SIZE
    rows = list(iter_training_log(out))
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert [r["loss"] for r in rows] == result.losses
    assert set(rows[0]) >= {"step", "loss", "lr", "tokens"}
    assert rows[-1]["tokens"] == result.tokens
    assert rows[0]["lr"] < rows[FAST["warmup_steps"]]["lr"] == pytest.approx(FAST["lr"])
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_saved_adapter_reproduces_the_reported_held_out_loss(trained, base, data_file):
    result, out, _, _ = trained
    config = TrainConfig(steps=30, **FAST)
    tokenizer = load_tokenizer(base)
    data = prepare_data(tokenizer, data_file, config)
    model = build_model(base, load_adapter(out))
    loss = held_out_loss(model, data.held_out, data.pad_token_id, batch_size=8)
    assert loss == pytest.approx(result.held_out_loss_after, rel=1e-5)


def test_same_seed_same_adapter_other_seed_differs(base, data_file, tmp_path):
    def run(name: str, seed: int):
        out = tmp_path / name
        result = train_adapter(base, data_file, out, TrainConfig(steps=4, seed=seed, **FAST))
        return result, load_adapter(out)

    r1, a1 = run("a", 0)
    r2, a2 = run("b", 0)
    r3, a3 = run("c", 1)
    assert r1.losses == r2.losses
    for name in a1.layers:
        assert torch.equal(a1.layers[name].lora_A, a2.layers[name].lora_A)
        assert torch.equal(a1.layers[name].lora_B, a2.layers[name].lora_B)
    assert any(not torch.equal(a1.layers[n].lora_A, a3.layers[n].lora_A) for n in a1.layers)
    assert r1.held_out_loss_before != r3.held_out_loss_before or r1.losses != r3.losses


def test_training_steps_change_only_the_adapter_factors(base, data_file):
    config = TrainConfig(steps=3, **FAST)
    tokenizer = load_tokenizer(base)
    data = prepare_data(tokenizer, data_file, config)
    model = build_model(base, train_rank=4, train_alpha=8.0)
    init_adapters(model, 0)
    named = adapter_parameters(model)
    assert {n.rsplit(".", 1)[-1] for n, _ in named} == {"lora_A", "lora_B"}
    frozen = {f"buffer:{n}": b.clone() for n, b in model.named_buffers() if b is not None}
    frozen.update({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
    factors = {n: p.detach().clone() for n, p in named}
    params = [p for _, p in named]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    stream = BatchStream(len(data.train), config.batch_size, config.seed)
    for _ in range(3):
        batch = collate([data.train[i] for i in stream.next_batch()], data.pad_token_id)
        train_step(model, batch, optimizer, scheduler, params, config, torch.device("cpu"))
    for name, value in model.named_buffers():
        if value is not None:
            assert torch.equal(value, frozen[f"buffer:{name}"]), name
    for name, value in model.named_parameters():
        if not value.requires_grad:
            assert torch.equal(value, frozen[name]), name
    assert all(not torch.equal(p, factors[n]) for n, p in named if n.endswith("lora_B"))
    qweights = [m.qweight for m in qalora_modules(model).values()]
    assert all(q.dtype == torch.int32 for q in qweights)  # the base stayed packed


# ----------------------------------------------------------------------------- act-order


def test_act_order_base_trains_and_folds_exactly(tmp_path, data_file):
    base = tiny_models.make_tiny_base(tmp_path / "base-act", bits=3, group_size=32, act_order=True)
    out = tmp_path / "adapter"
    result = train_adapter(base, data_file, out, TrainConfig(steps=6, **FAST))
    assert math.isfinite(result.held_out_loss_after)
    adapter = load_adapter(out)
    assert adapter.pool_groups == "quantization"
    # PEFT pools consecutive columns, not act-order groups: the directory must not claim use_qalora
    assert json.loads((out / "adapter_config.json").read_text())["use_qalora"] is False
    model = build_model(base, adapter)
    modules = qalora_modules(model)
    ckpt = GPTQCheckpoint(base)
    for name in ckpt.quantized_modules:
        layer = ckpt.read_layer(name)
        assert layer.is_act_order
        reference = effective_weight(layer, adapter)  # float64 [out, in]
        folded, stats = fold_into_zero_points(layer, adapter)
        assert stats.max_abs_shift > 0
        assert torch.allclose(folded.dequantize(torch.float64), reference, rtol=0, atol=1e-12)
        # the unmerged layer that trained the adapter computes x @ (W_hat + dW).T
        with torch.no_grad():
            unmerged = modules[name](torch.eye(layer.in_features)).T  # [out, in]
        assert torch.allclose(unmerged.double(), reference, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_malformed_data_is_a_data_error_and_writes_nothing(base, tmp_path):
    lines = [json.dumps(r) for r in copy_task(10)]
    lines[6] = '{"instruction": "w10 w11", "output": '
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:7"):
        train_adapter(base, bad, tmp_path / "out", TrainConfig(steps=2, **FAST))
    missing_field = write_jsonl(tmp_path / "nooutput.jsonl", [{"instruction": "w10"}] * 10)
    with pytest.raises(DataError, match="output"):
        train_adapter(base, missing_field, tmp_path / "out", TrainConfig(steps=2, **FAST))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, text, fragment", [
    (3, "", "blank line between records"),
    (4, "{}", "missing field 'instruction'"),
    (2, '{"instruction": "w10", "output": ""}', "field 'output' is empty"),
    (5, "[1, 2]", "expected a JSON object"),
])
def test_empty_and_malformed_lines_name_their_line(base, tmp_path, line, text, fragment):
    lines = [json.dumps(r) for r in copy_task(12)]
    lines[line - 1] = text
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:{line}: .*{re.escape(fragment)}"):
        train_adapter(base, bad, tmp_path / "out", TrainConfig(steps=2, **FAST))
    assert not (tmp_path / "out").exists()


def test_overlong_examples_are_counted_not_silently_cut(base, tmp_path):
    records = copy_task(24)
    for r in records[:4]:  # longer than --max-length 32, the answer partly cut by truncation
        r["instruction"] = " ".join(["w11"] * 24)
    data = write_jsonl(tmp_path / "long.jsonl", records)
    config = dict(FAST, held_out=0)
    dropped = train_adapter(base, data, tmp_path / "drop", TrainConfig(steps=1, **config))
    assert dropped.dataset_stats["train"]["dropped_overlong"] == 4 and dropped.train_examples == 20
    cut = train_adapter(base, data, tmp_path / "cut", TrainConfig(steps=1, on_overlong="truncate", **config))
    assert cut.dataset_stats["train"]["truncated"] == 4 and cut.train_examples == 24
    recorded = json.loads((tmp_path / "cut" / "qalora_export.json").read_text())["training"]
    assert recorded["on_overlong"] == "truncate" and recorded["max_length"] == 32


def test_a_float_model_is_not_a_gptq_base(base, data_file, tmp_path):
    float_dir = Path(str(base) + "-float")  # what make_tiny_base quantized
    with pytest.raises(CheckpointError, match="is not a GPTQ checkpoint.*qalora-export quantize"):
        train_adapter(float_dir, data_file, tmp_path / "out", TrainConfig(steps=2, **FAST))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_what_is_supported(base, data_file, tmp_path):
    other = tmp_path / "gpt2-base"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
        train_adapter(other, data_file, tmp_path / "out", TrainConfig(steps=2, **FAST))
    assert not (tmp_path / "out").exists()


def test_everything_overlong_is_a_data_error(base, data_file, tmp_path):
    config = TrainConfig(steps=2, **{**FAST, "max_length": 4})
    with pytest.raises(DataError, match="max-length"):
        train_adapter(base, data_file, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, flag", [
    ("rank", 0, "--rank"), ("steps", -1, "--steps"), ("lr", float("nan"), "--lr"), ("held_out", 1.5, "--held-out"),
    ("pooling", "avg", "--pooling"), ("target_modules", ("q_proj", "lm_head"), "--target-modules"),
    ("schedule", "step", "--schedule"), ("on_overlong", "cut", "--on-overlong"),
])
def test_bad_config_is_refused_before_training(base, data_file, tmp_path, field, value, flag):
    config = TrainConfig(**{**FAST, field: value})
    with pytest.raises(ConfigError, match=flag):
        train_adapter(base, data_file, tmp_path / "out", config)


def test_a_diverging_loss_is_a_training_error_and_writes_nothing(base, data_file, tmp_path):
    config = TrainConfig(steps=6, **{**FAST, "lr": 1e30, "warmup_steps": 0})  # factors overflow to inf, loss NaN
    with pytest.raises(TrainingError, match=r"the training loss became nan; lower --lr \(now 1e\+30\)"):
        train_adapter(base, data_file, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_training(base, data_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        train_adapter(base, data_file, out, TrainConfig(steps=1000, **FAST))
    assert (out / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- pieces


def test_batch_stream_is_seeded_full_and_covers_each_epoch():
    a, b = BatchStream(10, 4, seed=3), BatchStream(10, 4, seed=3)
    batches = [a.next_batch() for _ in range(5)]  # 20 draws = two epochs
    assert batches == [b.next_batch() for _ in range(5)]
    assert all(len(x) == 4 for x in batches)
    flat = [i for x in batches for i in x]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a new permutation each epoch
    resumed = BatchStream(10, 4, seed=3)
    resumed.load_state_dict({"epoch": 0, "position": 8})
    assert resumed.next_batch() == batches[2]
    assert BatchStream(3, 8, seed=0).next_batch().count(0) >= 2  # fewer examples than a batch


def test_schedule_warmup_then_decay():
    f = lr_lambda(TrainConfig(steps=10, warmup_steps=2))
    values = [f(t) for t in range(10)]
    assert values[0] < values[1] < values[2] == 1.0
    assert all(x > y for x, y in zip(values[2:], values[3:])) and values[-1] > 0
    assert lr_lambda(TrainConfig(steps=10, warmup_steps=0, schedule="constant"))(9) == 1.0
    assert lr_lambda(TrainConfig(steps=10, warmup_steps=0, schedule="linear"))(5) == pytest.approx(0.5)


def test_fresh_adapters_start_as_the_base(base):
    model = build_model(base, train_rank=4, train_alpha=8.0)
    init_adapters(model, 0)
    plain = build_model(base)
    ids = torch.randint(4, tiny_models.TINY_VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
    assert all(isinstance(m, QALoRALinear) and float(m.lora_A.detach().abs().max()) > 0 for m in qalora_modules(model).values())
