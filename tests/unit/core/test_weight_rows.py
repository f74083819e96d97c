"""Verify's weight level compares layers a row block at a time, with the same results as whole layers.

Every piece that became row-wise is compared with its whole-layer form on random data: the
record's dequantization, the unmerged reference (plain, consecutive pooling, integer zeros), each
converter's reader (GPTQ, ONNX split zero-points with act-order permutation, GGUF with q/k row
permutation), and the whole weight report with blocks of a few rows against one block.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import gguf_helpers  # noqa: E402
import tiny_models  # noqa: E402
from qalora_export.core import weight_rows  # noqa: E402
from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter  # noqa: E402
from qalora_export.formats import get_format  # noqa: E402
from qalora_export.core.fold import effective_weight, effective_weight_rows  # noqa: E402
from qalora_export.checkpoint.merged_view import MergedView  # noqa: E402
from qalora_export.core.record import QuantizedLinear, contiguous_g_idx  # noqa: E402
from qalora_export.verify import weight_report  # noqa: E402

BLOCKS = [(0, 3), (3, 4), (4, 17), (17, 24)]


def _layer(act_order: bool, seed: int = 0) -> QuantizedLinear:
    rng = np.random.default_rng(seed)
    out, k, gs = 24, 64, 16
    g_idx = contiguous_g_idx(k, gs)
    if act_order:
        g_idx = g_idx[torch.from_numpy(rng.permutation(k))]
    return QuantizedLinear(
        name="layer", bits=4, group_size=gs, codes=torch.from_numpy(rng.integers(0, 16, (out, k)).astype(np.uint8)),
        scales=torch.from_numpy(rng.uniform(1e-3, 0.1, (k // gs, out)).astype(np.float32)),
        zeros=torch.from_numpy(rng.integers(0, 16, (k // gs, out)) + rng.normal(0, 0.5, (k // gs, out))), g_idx=g_idx)


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_rows_equal_rows_of_the_whole(act_order):
    layer = _layer(act_order)
    whole = layer.dequantize(torch.float64)
    for start, stop in BLOCKS:
        assert torch.equal(layer.dequantize(torch.float64, slice(start, stop)), whole[start:stop])


@pytest.mark.parametrize("kind", ["quantization", "consecutive", "integer_zeros"])
def test_reference_rows_equal_rows_of_the_whole(kind):
    layer = _layer(act_order=kind != "consecutive", seed=3)
    gen = torch.Generator().manual_seed(1)
    pooled = layer.num_groups if kind != "consecutive" else layer.num_groups // 2
    extra = {"integer_zeros": True, "zero_range": [0, 15]} if kind == "integer_zeros" else {}
    adapter = QALoRAAdapter(
        layers={"layer": AdapterLayer(torch.randn(4, pooled, generator=gen), torch.randn(24, 4, generator=gen))},
        rank=4, alpha=8.0, pooling="peft", pool_group_size=64 // pooled,
        pool_groups="consecutive" if kind == "consecutive" else "quantization", extra=extra)
    whole = effective_weight(layer, adapter)
    rows_of = effective_weight_rows(layer, adapter)
    for start, stop in BLOCKS:
        assert torch.equal(rows_of(slice(start, stop)), whole[start:stop])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """Tiny exports with every row-wise step present: split residual + act-order Gather (ONNX),
    q/k row permutation (GGUF), a rounded GPTQ merge."""
    root = tmp_path_factory.mktemp("weight_rows")
    out = {}
    act = tiny_models.make_tiny_base(root / "act", bits=4, group_size=32, act_order=True)
    act_adapter = tiny_models.make_random_adapter(act, root / "act-adapter")
    out["onnx"] = (act, act_adapter, root / "onnx")
    get_format("onnx").export(MergedView.open(act, act_adapter), root / "onnx", zero_points="split")
    bpe = gguf_helpers.make_bpe_base(root / "bpe", bits=4, group_size=32)
    bpe_adapter = tiny_models.make_random_adapter(bpe, root / "bpe-adapter")
    out["gguf"] = (bpe, bpe_adapter, root / "model.gguf")
    get_format("gguf").export(MergedView.open(bpe, bpe_adapter), root / "model.gguf")
    out["gptq"] = (bpe, bpe_adapter, root / "gptq")
    get_format("gptq").export(MergedView.open(bpe, bpe_adapter), root / "gptq")
    return out


@pytest.mark.parametrize("fmt", ["gptq", "onnx", "gguf"])
def test_reader_row_blocks_equal_rows_of_the_whole(artifacts, fmt):
    converter = get_format(fmt)
    _, _, path = artifacts[fmt]
    whole = dict(converter.read_weights(path))
    rows = dict(converter.read_weight_rows(path))
    assert sorted(whole) == sorted(rows) and whole
    for name, weight in whole.items():
        assert rows[name].shape == tuple(weight.shape)
        n = weight.shape[0]
        for start, stop in ((0, 1), (1, n // 3), (n // 3, n)):
            assert torch.equal(rows[name].rows(start, stop), weight[start:stop]), name


@pytest.mark.parametrize("fmt", ["gptq", "onnx", "gguf"])
def test_weight_report_in_row_blocks_equals_one_block(artifacts, fmt, monkeypatch):
    base, adapter, path = artifacts[fmt]
    converter = get_format(fmt)
    one_block = weight_report(MergedView.open(base, adapter), converter, path)
    monkeypatch.setattr(weight_rows, "ROW_BLOCK_BYTES", 3 * 8 * 128)  # a few rows of the widest layer
    decoded_rows = []
    real = converter.read_weight_rows

    def spy(artifact):
        for name, rows in real(artifact):
            def decode(start, stop, rows=rows):
                decoded_rows.append(stop - start)
                return rows.rows(start, stop)
            yield name, weight_rows.WeightRows(rows.shape, decode)

    monkeypatch.setattr(converter, "read_weight_rows", spy)
    blocks = weight_report(MergedView.open(base, adapter), converter, path)
    assert blocks == one_block and one_block["passed"]
    assert decoded_rows and max(decoded_rows) <= 8  # never a whole layer (64..256 rows) at once
