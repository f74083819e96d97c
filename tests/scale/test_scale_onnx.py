"""ONNX external data is written without copying tensor bytes, and the files are unchanged by it.

``ExternalData.add`` used to write ``array.tobytes()`` (a second copy of every initializer, 0.5 GB
for a 7B lm_head in fp32) and float projections were cast from a transposed view (Fortran order,
a third copy when written). The export now writes a memoryview of one C-order array. This test
exports the same tiny model with the current code and with the original ``add`` patched back in,
and compares every file byte for byte (untied lm_head as a float MatMul included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import tiny_models
from qalora_export.formats.onnx import write as onnx_write
from qalora_export.formats.onnx import graph as onnx_graph
from qalora_export.checkpoint.merged_view import MergedView


def original_add(self, name: str, array: np.ndarray) -> TensorProto:
    """``ExternalData.add`` as it was before streaming (tobytes copy)."""
    array = np.ascontiguousarray(array)
    pad = (-self._offset) % onnx_graph.EXTERNAL_ALIGN
    if pad:
        self._file.write(b"\0" * pad)
        self._offset += pad
    data = array.tobytes()
    self._file.write(data)
    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", self.path.name), ("offset", str(self._offset)), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    self._offset += len(data)
    return tensor


def test_streamed_external_data_is_byte_identical(tmp_path, monkeypatch):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32, tie_embeddings=False)
    adapter = tiny_models.make_random_adapter(base, tmp_path / "adapter", rank=4)
    model = MergedView.open(base, adapter)
    onnx_write.export(model, tmp_path / "new", zero_points="split")
    onnx_write.export_float_reference(model, tmp_path / "new-float")
    monkeypatch.setattr(onnx_graph.ExternalData, "add", original_add)
    onnx_write.export(model, tmp_path / "old", zero_points="split")
    onnx_write.export_float_reference(model, tmp_path / "old-float")
    for new, old in (("new", "old"), ("new-float", "old-float")):
        files = sorted(p.name for p in (tmp_path / new).iterdir())
        assert files == sorted(p.name for p in (tmp_path / old).iterdir())
        for name in files:
            assert (tmp_path / new / name).read_bytes() == (tmp_path / old / name).read_bytes(), f"{new}/{name}"


def test_float_weight_in_row_blocks_is_byte_identical(tmp_path, monkeypatch):
    """The untied lm head (a float MatMul on the transposed, widened table) is written in row
    blocks; with blocks of a few rows (uneven last block) the files equal the one-copy original."""
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32, tie_embeddings=False)
    adapter = tiny_models.make_random_adapter(base, tmp_path / "adapter", rank=4)
    model = MergedView.open(base, adapter)
    hidden = model.model_config["hidden_size"]
    vocab = model.model_config["vocab_size"]
    monkeypatch.setattr(onnx_graph, "FLOAT_BLOCK_BYTES", 3 * vocab * 4)  # 3 rows of weight_t a block
    assert hidden % 3
    onnx_write.export(model, tmp_path / "blocks", zero_points="split")
    onnx_write.export_float_reference(model, tmp_path / "blocks-float")

    def one_copy(weight, dtype):  # the original: the whole transposed table in one C-order copy
        yield np.ascontiguousarray(np.asarray(weight).T, dtype=dtype)

    monkeypatch.setattr(onnx_graph, "transposed_row_blocks", one_copy)
    onnx_write.export(model, tmp_path / "whole", zero_points="split")
    onnx_write.export_float_reference(model, tmp_path / "whole-float")
    for new, old in (("blocks", "whole"), ("blocks-float", "whole-float")):
        for name in sorted(p.name for p in (tmp_path / old).iterdir()):
            assert (tmp_path / new / name).read_bytes() == (tmp_path / old / name).read_bytes(), f"{new}/{name}"


def test_add_blocks_equals_add(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.standard_normal((7, 5)).astype(np.float32)
    one = onnx_graph.ExternalData(tmp_path / "one.data")
    t_one = one.add("w", array)
    one.close()
    blocks = onnx_graph.ExternalData(tmp_path / "blocks.data")
    t_blocks = blocks.add_blocks("w", np.float32, (7, 5), [array[:3], array[3:3], array[3:]])
    blocks.close()
    assert (t_one.data_type, list(t_one.dims)) == (t_blocks.data_type, [7, 5])
    assert [(e.key, e.value.replace("blocks", "one")) for e in t_blocks.external_data] == \
        [(e.key, e.value) for e in t_one.external_data]
    assert (tmp_path / "one.data").read_bytes() == (tmp_path / "blocks.data").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tables_read_in_row_blocks_equal_whole_reads(tmp_path, monkeypatch, dtype):
    """Float tables are read a row block at a time into one array (no whole-file residency while
    copying); the array equals the whole read, bfloat16 widened to float32 as before."""
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32, tie_embeddings=False)
    model = MergedView.open(base)
    monkeypatch.setattr(model.base, "read_tensor", _as_dtype(model.base.read_tensor, dtype))
    monkeypatch.setattr(model.base, "tensor_spec", lambda name, real=model.base.tensor_spec: (dtype, real(name)[1]))
    monkeypatch.setattr(onnx_write, "READ_BLOCK_BYTES", 5 * 64 * 2)  # 5 rows (hidden 64), uneven last block
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        whole = model.base.read_tensor(name)
        expected = (whole.to(torch.float32) if dtype == torch.bfloat16 else whole).numpy()
        got = onnx_write._tensor_np(model, name)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), name


def _as_dtype(read, dtype):
    def read_as(name, rows=None):
        t = read(name) if rows is None else read(name, rows)
        return t.to(dtype) if t.is_floating_point() else t
    return read_as
