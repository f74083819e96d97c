"""Integer-zero training (``train --integer-zeros``): the zero shift is rounded (straight-through)
and clamped to the GPTQ format's range in the forward, so the saved adapter folds into integral,
in-range zero-points and ``merge --to gptq --require-exact`` is bit-exact.
"""

from __future__ import annotations


import pytest
import torch

import tiny_models
from qalora_export.checkpoint.adapter_files import load_adapter
from qalora_export.core.fold import effective_weight, fold_into_zero_points, round_zero_shift
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import zero_range
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.modeling.model import build_model, qalora_modules
from qalora_export.training.config import TrainConfig
from qalora_export.training.train import train_adapter
from test_train import FAST, GROUP_SIZE, copy_task, write_jsonl

from qalora_export.formats.gptq import FORMAT as gptq_converter


def test_round_zero_shift_rounds_clamps_and_passes_gradients_straight_through():
    zeros = torch.tensor([[0.0, 7.0, 15.0, 1.0]], dtype=torch.float64)
    shift = torch.tensor([[-0.6, 2.4, -3.0, 0.5]], dtype=torch.float64, requires_grad=True)
    out = round_zero_shift(shift, zeros, (0, 15))
    # zero - shift in [0, 15]: -0.6 -> -1 (zero 1); 2.4 -> 2; -3 clamped to 0 (zero 15 is the top); 0.5 -> 0 (half to even)
    assert out.tolist() == [[-1.0, 2.0, 0.0, 0.0]]
    out.sum().backward()
    assert shift.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]  # identity inside the range, 0 where clamped
    v1 = round_zero_shift(torch.tensor([[0.9]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64),
                          zero_range(4, "gptq"))
    assert v1.tolist() == [[0.0]]  # gptq (v1) stores zero - 1: a true zero of 0 is out of range


@pytest.fixture(scope="module")
def integer_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("intzero")
    base = tiny_models.make_tiny_base(root / "base-w4g16", bits=4, group_size=GROUP_SIZE)
    data = write_jsonl(root / "train.jsonl", copy_task(48))
    config = TrainConfig(**{**FAST, "steps": 12, "lr": 3e-2}, integer_zeros=True)
    result = train_adapter(base, data, root / "adapter", config)
    return base, root / "adapter", result, root


def test_integer_zero_training_lowers_the_loss(integer_run):
    _, _, result, _ = integer_run
    first = sum(result.losses[:3]) / 3
    last = sum(result.losses[-3:]) / 3
    assert last < first
    assert result.held_out_loss_after < result.held_out_loss_before


def test_integer_zero_adapter_records_its_mode_and_range(integer_run):
    _, adapter_dir, _, _ = integer_run
    adapter = load_adapter(adapter_dir)
    assert adapter.extra["integer_zeros"] is True
    assert adapter.extra["zero_range"] == [0, 15]
    assert adapter.extra["zero_range_format"] == "gptq_v2"


def test_integer_zero_adapter_merges_exactly_into_gptq(integer_run):
    base, adapter_dir, _, root = integer_run
    adapter = load_adapter(adapter_dir)
    model = build_model(base, adapter)
    layers = qalora_modules(model)
    assert layers and all(m.integer_zeros for m in layers.values())

    out = root / "merged"
    gptq_converter.export(MergedView.open(base, adapter_dir), out, require_exact=True)
    merged = GPTQCheckpoint(out)
    ckpt = GPTQCheckpoint(base)
    moved = 0
    for name, module in layers.items():
        record = merged.read_layer(name)
        base_record = ckpt.read_layer(name)
        assert torch.equal(record.zeros, torch.round(record.zeros))
        assert float(record.zeros.min()) >= 0 and float(record.zeros.max()) <= 15
        moved += int((record.zeros != base_record.zeros.to(record.zeros.dtype)).sum())
        with torch.no_grad():
            trained = module.effective_weight(torch.float64)
        assert torch.equal(record.dequantize(torch.float64), trained), name
        assert torch.equal(effective_weight(base_record, adapter), trained), name
        folded, stats = fold_into_zero_points(base_record, adapter)
        assert stats.integral and torch.equal(folded.zeros, module.integer_zero_points().detach())
    assert moved > 0  # training did move zero-points


def test_float_zero_adapters_are_unchanged(integer_run):
    """An adapter without the metadata keeps the exact float fold and the pooled forward."""
    base, adapter_dir, _, _ = integer_run
    adapter = load_adapter(adapter_dir)
    for key in ("integer_zeros", "zero_range", "zero_range_format"):
        adapter.extra.pop(key)
    model = build_model(base, adapter)
    layer = next(iter(qalora_modules(model).values()))
    assert not layer.integer_zeros
    record = GPTQCheckpoint(base).read_layer(layer.name)
    folded, stats = fold_into_zero_points(record, adapter)
    assert not stats.integral
