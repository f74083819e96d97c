"""benchmarks/table1.py's pieces that the table's claims rest on, at a tiny size: the "float zeros,
merged" row evaluates the folded float-zero weights, which compute what the unmerged model does."""

from __future__ import annotations


import torch

import benchmark_scripts
import tiny_models
from qalora_export.checkpoint.adapter_files import load_adapter
from qalora_export.modeling.model import build_model


def load_table1():
    return benchmark_scripts.load("table1")


def test_folded_float_zero_model_matches_the_unmerged_model(tmp_path):
    table1 = load_table1()
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=2, group_size=16)
    adapter = tiny_models.make_random_adapter(base, tmp_path / "adapter", magnitude=0.3)
    folded = table1.folded_float_model(base, adapter)
    unmerged = build_model(base, load_adapter(adapter))
    plain = build_model(base)
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = folded(input_ids=ids).logits, unmerged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4
    assert float((b - c).abs().max()) > 1e-2  # the adapter changes the model: the check has teeth


def test_format_table_marks_device_and_steps():
    table1 = load_table1()
    row = {"held_out_loss": 1.5, "correct": 3, "total": 4, "exact_match": 0.75}
    text = table1.format_table({4: {name: row for name in table1.ROWS}},
                               {"group_size": 32, "device": "cpu", "steps": 40, "examples": 320, "held_out": 32})
    assert "CPU, 40 steps" in text and text.count("| 1.500 | 3/4 (75%) |") == len(table1.ROWS)
