"""GGUF float tables (token embedding, untied output) are written in row blocks, never whole.

The export reads each table a row block at a time (``read_tensor(key, rows)``) and hands the
writer a stand-in whose ``tofile`` writes the blocks in turn. With blocks of a few rows (an uneven
last block) the file equals the original export, which read the table whole and converted it in
one piece, for every embedding type (F16, F32 and the row-wise Q8_0), tied and untied.
"""

from __future__ import annotations

import pytest

import gguf_helpers
import tiny_models
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import plan as gguf_plan
from qalora_export.checkpoint.merged_view import MergedView


@pytest.mark.parametrize("embeddings", ["f16", "f32", "q8_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_row_blocks_are_byte_identical_to_whole_tables(tmp_path, monkeypatch, embeddings, tied):
    base = gguf_helpers.make_bpe_base(tmp_path / "base", bits=4, group_size=32, tie_embeddings=tied)
    model = MergedView.open(base, tiny_models.make_random_adapter(base, tmp_path / "adapter"))
    hidden, vocab = model.model_config["hidden_size"], model.model_config["vocab_size"]
    monkeypatch.setattr(gguf_plan, "FLOAT_BLOCK_BYTES", 7 * hidden * 2)  # 7 rows a block
    assert vocab % 7
    reads = []
    real_read = MergedView.read_tensor

    def spy(self, name, rows=None):
        reads.append((name, rows))
        return real_read(self, name, rows)

    with monkeypatch.context() as patched:
        patched.setattr(MergedView, "read_tensor", spy)
        G.export(model, tmp_path / "blocks.gguf", embeddings=embeddings)
    assert all(rows is not None for name, rows in reads if name == "model.embed_tokens.weight")
    assert sum(name == "model.embed_tokens.weight" for name, _ in reads) == -(-vocab // 7)

    def whole(model, key, shape, ggml_type):  # the original: the table read and converted in one piece
        yield gguf_plan._float_array(model.read_tensor(key), ggml_type)

    monkeypatch.setattr(gguf_plan, "_float_row_blocks", whole)
    G.export(model, tmp_path / "whole.gguf", embeddings=embeddings)
    assert (tmp_path / "blocks.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


def test_fp16_tables_keep_their_bytes_as_f16():
    """An fp16 table stored as F16 is copied, not widened and narrowed: the same bytes as the
    fp32 round trip for every value (subnormals, signed zeros, infinities, the extremes); a table
    with a NaN takes the round trip itself."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, size=(64, 32), dtype=np.uint16)
    bits[(bits & 0x7C00) == 0x7C00] &= 0xFC00  # no NaN: exponent all ones keeps only the infinities
    special = np.array([0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00], dtype=np.uint16)
    bits[0, :len(special)] = special
    table = torch.from_numpy(bits.view(np.float16).copy())
    round_trip = table.to(torch.float32).numpy().astype(np.float16)
    assert gguf_plan._float_array(table, "F16").tobytes() == round_trip.tobytes()
    with_nan = table.clone()
    with_nan[3, 3] = float("nan")
    assert gguf_plan._float_array(with_nan, "F16").tobytes() == with_nan.to(torch.float32).numpy().astype(np.float16).tobytes()
