"""The ONNX export's fast path writes the same bytes as the unpack -> pack path it replaces.

For 2/4/8-bit layers without act-order, MatMulNBits ``B`` is re-laid from the packed GPTQ words
(``onnx_spec.b_from_qweight``) and the layer's ``max |W|`` (for the rounding report) comes from a
few candidate blocks (``onnx.max_abs_weight``). Each is compared with the original computation on
random data, and whole exports (every bit width, group sizes 16..128, v1 and v2 checkpoints,
act-order, each zero-point kind) with an export forced through the original path, file by file.
"""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.packing import pack_codes, unpack_codes
from qalora_export.formats.onnx import encode as onnx_encode
from qalora_export.formats.onnx import spec as spec
from qalora_export.formats.onnx import write as onnx_write


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
def test_b_from_qweight_equals_pack_b_of_the_codes(bits, block_size):
    rng = np.random.default_rng(bits * 1000 + block_size)
    for n, blocks in ((1, 1), (7, 3), (33, 5)):
        k = blocks * block_size
        qweight = rng.integers(-2**31, 2**31, size=(k * bits // 32, n), dtype=np.int64).astype(np.int32)
        codes = unpack_codes(torch.from_numpy(qweight), bits, dim=0, n_codes=k).T.numpy()
        expected = spec.pack_b(codes, bits, block_size)
        got = spec.b_from_qweight(qweight, bits, block_size)
        assert got.dtype == np.uint8 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_b_from_qweight_refuses_3_bit_and_partial_blocks():
    with pytest.raises(Exception, match="3-bit"):
        spec.b_from_qweight(np.zeros((3, 2), np.int32), 3, 32)
    with pytest.raises(Exception, match="whole 64-code blocks"):
        spec.b_from_qweight(np.ones((4, 2), np.int32), 4, 64)  # 32 codes per column


def _brute_max_abs(b, bits, scales64, zeros64) -> float:
    """The original rule: every block's smallest and largest code."""
    codes = spec.unpack_b(b, bits, b.shape[1] * b.shape[2] * 8 // bits)
    blocks = codes.reshape(b.shape[0], b.shape[1], -1)
    return float(np.maximum(np.abs(scales64 * (blocks.min(axis=2) - zeros64)),
                            np.abs(scales64 * (blocks.max(axis=2) - zeros64))).max())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("code_span", ["full", "narrow"])
@pytest.mark.parametrize("candidates", [1, 4, 256])
def test_max_abs_weight_equals_every_block_rule(bits, code_span, candidates, monkeypatch):
    """Bit-equal to the all-blocks rule, whether the candidates settle it or every block is read
    (narrow codes that never reach 0 or the top code make the bounds loose)."""
    monkeypatch.setattr(onnx_encode, "MAX_WEIGHT_CANDIDATES", candidates)
    rng = np.random.default_rng(bits + candidates)
    maxq = (1 << bits) - 1
    for n, k_blocks, block in ((1, 1, 16), (9, 4, 32), (40, 16, 16)):
        if code_span == "full":
            codes = rng.integers(0, maxq + 1, size=(n, k_blocks * block))
        else:
            codes = rng.integers(maxq // 3, 2 * maxq // 3 + 1, size=(n, k_blocks * block))
        b = spec.pack_b(codes.astype(np.uint8), bits, block)
        scales = rng.uniform(-0.1, 0.1, size=(n, k_blocks))  # negative scales too: |scale| is what counts
        zeros = rng.integers(0, maxq + 1, size=(n, k_blocks)) + rng.normal(0, 0.8, size=(n, k_blocks))
        assert onnx_encode.max_abs_weight(b, bits, scales, zeros) == _brute_max_abs(b, bits, scales, zeros)
        lazy = spec.BFromQweight(pack_codes(torch.from_numpy(codes.T.astype(np.uint8)), bits, dim=0).numpy(), bits, block)
        assert onnx_encode.max_abs_weight(lazy, bits, scales, zeros) == _brute_max_abs(b, bits, scales, zeros)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 64])
def test_lazy_b_row_blocks_take_and_array_equal_b_from_qweight(bits, block_size):
    rng = np.random.default_rng(bits * 7 + block_size)
    for n, blocks in ((1, 1), (7, 3), (33, 5)):
        qweight = rng.integers(-2**31, 2**31, size=(blocks * block_size * bits // 32, n), dtype=np.int64).astype(np.int32)
        whole = spec.b_from_qweight(qweight, bits, block_size)
        lazy = spec.BFromQweight(qweight, bits, block_size)
        assert lazy.shape == whole.shape and lazy.nbytes == whole.nbytes
        np.testing.assert_array_equal(np.asarray(lazy), whole)
        for block_bytes in (1, whole.shape[1] * whole.shape[2] * 2 + 1, 1 << 20):  # a row, uneven, one block
            parts = list(lazy.row_blocks(block_bytes))
            assert all(p.flags.c_contiguous and p.dtype == np.uint8 for p in parts)
            np.testing.assert_array_equal(np.concatenate(parts), whole)
        rows, cols = rng.integers(0, n, 11), rng.integers(0, blocks, 11)
        np.testing.assert_array_equal(lazy.take(rows, cols), whole[rows, cols])


def _slow_path(monkeypatch):
    """Route the export through the original path: codes unpacked, B packed from them, and
    ``max |W|`` over every block."""
    def read_with_codes(model, name):
        layer, fold = model.read_layer(name)
        return layer, fold, None

    monkeypatch.setattr(onnx_write, "read_for_encoding", read_with_codes)
    monkeypatch.setattr(onnx_encode, "max_abs_weight", _brute_max_abs)


def _assert_same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


CASES = [  # bits, group size, checkpoint format, act-order, zero-point kind
    (2, 16, "gptq_v2", False, "split"), (2, 32, "gptq", False, "float"), (2, 64, "gptq_v2", False, "split"),
    (2, 128, "gptq", False, "split"),
    (3, 16, "gptq", False, "split"), (3, 32, "gptq_v2", False, "float"), (3, 128, "gptq_v2", False, "split"),
    (4, 16, "gptq", False, "float"), (4, 32, "gptq_v2", False, "split"), (4, 64, "gptq", False, "uint8"),
    (4, 128, "gptq_v2", False, "float"), (4, 128, "gptq", False, "split"),
    (8, 16, "gptq_v2", False, "split"), (8, 32, "gptq", False, "split"), (8, 64, "gptq_v2", False, "uint8"),
    (8, 128, "gptq_v2", False, "split"),
    (4, 32, "gptq_v2", True, "split"), (2, 64, "gptq", True, "float"), (8, 32, "gptq_v2", True, "split"),
]


@pytest.mark.parametrize("bits,group_size,fmt,act_order,zero_points", CASES)
def test_fast_export_is_byte_identical_to_the_unpacking_path(tmp_path, monkeypatch, bits, group_size, fmt,
                                                             act_order, zero_points):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=bits, group_size=group_size, act_order=act_order,
                                      checkpoint_format=fmt, hidden=128, intermediate=256, seed=bits + group_size)
    adapter = tiny_models.make_random_adapter(base, tmp_path / "adapter", rank=4, seed=group_size)
    model = MergedView.open(base, adapter)
    # uint8 zero-points hold only integral zeros: round and report (the rounding report reads max |W|)
    options = {"zero_points": zero_points, "allow_rounding": zero_points == "uint8"}
    monkeypatch.setattr(spec, "B_ROW_BLOCK_BYTES", 1000)  # B written in several uneven row blocks
    fast = onnx_write.export(model, tmp_path / "fast", **options)
    assert fast["max_weight_rel_error"] > 0  # the max |W| report is exercised
    with monkeypatch.context() as patched:
        _slow_path(patched)
        slow = onnx_write.export(MergedView.open(base, adapter), tmp_path / "slow", **options)
    assert fast["act_order_permuted_layers"] == slow["act_order_permuted_layers"] == (7 * 2 if act_order else 0)
    _assert_same_files(tmp_path / "fast", tmp_path / "slow")


def test_fast_path_reads_no_codes(tmp_path, monkeypatch):
    """Relayable layers never unpack their codes (the point of the fast path)."""
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32)
    model = MergedView.open(base, tiny_models.make_random_adapter(base, tmp_path / "adapter"))
    unpacked = []
    real = type(model.base).read_layer

    def spy(self, name, with_codes=True):
        unpacked.append(with_codes)
        return real(self, name, with_codes)

    monkeypatch.setattr(type(model.base), "read_layer", spy)
    onnx_write.export(model, tmp_path / "out", zero_points="split")
    assert unpacked and not any(unpacked)
