"""The GGUF export's fast path writes the same bytes as the unpack -> pack path it replaces.

Q4_1 blocks are built from GPTQ's packed words (``gguf.block_code_bytes`` +
``gguf_spec.pack_q4_1_from_packed``) instead of from unpacked uint8 codes (``pack_q4_1``). Both
are compared on random data (2/3/4-bit, group sizes 32..128, q/k row permutations), and whole
exports (v1 and v2 checkpoints) with an export forced through the original path, byte for byte.
"""

from __future__ import annotations

import gguf_helpers
import numpy as np
import pytest
import tiny_models
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.packing import pack_codes
from qalora_export.core.record import QuantizedLinear, contiguous_g_idx
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import encode as gguf_encode
from qalora_export.formats.gguf import plan as gguf_plan
from qalora_export.formats.gguf import spec as spec


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_from_packed_equals_pack_q4_1(bits):
    rng = np.random.default_rng(bits)
    for rows, nb in ((1, 1), (5, 3), (17, 8)):
        codes = rng.integers(0, min(1 << bits, spec.Q4_1_MAX_CODE + 1), size=(rows, nb * spec.QK4_1)).astype(np.uint8)
        d = rng.standard_normal((rows, nb)).astype(np.float16)
        m = rng.standard_normal((rows, nb)).astype(np.float16)
        per_byte = 8 // bits
        # codes packed LSB-first, per_byte to a byte: the layout of GPTQ words' bytes
        packed = np.zeros((rows, nb * spec.QK4_1 // per_byte), np.uint8)
        for k in range(per_byte):
            packed |= (codes[:, k::per_byte] << (bits * k)).astype(np.uint8)
        got = spec.pack_q4_1_from_packed(packed.reshape(rows, nb, -1), bits, d, m)
        np.testing.assert_array_equal(got, spec.pack_q4_1(codes, d, m))


def _layer(bits: int, group_size: int, groups: int, out: int, seed: int) -> tuple[QuantizedLinear, np.ndarray]:
    """A random folded record and its GPTQ ``qweight``."""
    rng = np.random.default_rng(seed)
    k = group_size * groups
    codes = torch.from_numpy(rng.integers(0, 1 << bits, size=(out, k)).astype(np.uint8))
    zeros = rng.integers(0, 1 << bits, (groups, out)) + rng.normal(0, 0.7, (groups, out))
    layer = QuantizedLinear(
        name="layer", bits=bits, group_size=group_size, codes=codes,
        scales=torch.from_numpy(rng.uniform(1e-3, 1e-1, (groups, out)).astype(np.float16).astype(np.float32)),
        zeros=torch.from_numpy(zeros), g_idx=contiguous_g_idx(k, group_size))
    return layer, pack_codes(codes.T, bits, dim=0).numpy()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("row_block_bytes", [None, 1, 3000])
def test_encode_from_qweight_equals_encode_from_codes(bits, group_size, permuted, row_block_bytes, monkeypatch):
    """``row_block_bytes``: the layer built in one block (None), a row at a time (1), or in uneven
    blocks of 93 / 46 / 31 / 23 rows (3000)."""
    if row_block_bytes is not None:
        monkeypatch.setattr(gguf_encode, "Q4_1_ROW_BLOCK_BYTES", row_block_bytes)
    for groups, out, heads in ((1, 32, 1), (3, 64, 4), (2, 96, 3)):
        layer, qweight = _layer(bits, group_size, groups, out, seed=bits * 100 + group_size + out)
        perm = spec.qk_row_permutation(out, heads) if permuted else None
        slow, slow_stats = gguf_encode.encode_q4_1(layer, perm)
        placeholder = layer.with_zeros(layer.zeros)
        placeholder.codes = torch.zeros((1, 1), dtype=torch.uint8).expand(out, layer.in_features)  # never read
        fast, fast_stats = gguf_encode.encode_q4_1(placeholder, perm, qweight)
        np.testing.assert_array_equal(fast, slow)
        assert fast_stats == slow_stats


def _slow_path(monkeypatch, model: MergedView) -> None:
    """Route ``model``'s export through the original path: the record with its codes unpacked
    (``read_layer``), then ``pack_q4_1``."""
    real_encode = gguf_encode.encode_q4_1

    def encode_from_codes(layer, row_perm=None, qweight=None):
        return real_encode(model.read_layer(layer.name)[0], row_perm)

    monkeypatch.setattr(gguf_plan, "encode_q4_1", encode_from_codes)


@pytest.mark.parametrize("bits,group_size,fmt", [
    (2, 32, "gptq_v2"), (2, 64, "gptq"), (3, 32, "gptq"), (3, 128, "gptq_v2"), (4, 32, "gptq_v2"),
    (4, 64, "gptq"), (4, 128, "gptq_v2"),
])
def test_fast_export_is_byte_identical_to_the_unpacking_path(tmp_path, monkeypatch, bits, group_size, fmt):
    base = gguf_helpers.make_bpe_base(tmp_path / "base", bits=bits, group_size=group_size, checkpoint_format=fmt,
                                      hidden=128, intermediate=256, seed=bits + group_size)
    adapter = tiny_models.make_random_adapter(base, tmp_path / "adapter", rank=4, seed=group_size)
    monkeypatch.setattr(gguf_encode, "Q4_1_ROW_BLOCK_BYTES", 5000)  # several uneven row blocks a layer
    fast = G.export(MergedView.open(base, adapter), tmp_path / "fast.gguf")
    with monkeypatch.context() as patched:
        slow_model = MergedView.open(base, adapter)
        _slow_path(patched, slow_model)
        slow = G.export(slow_model, tmp_path / "slow.gguf")
    assert fast["quantized_tensors"] == slow["quantized_tensors"] == 14
    assert fast["max_m_rounding"] == slow["max_m_rounding"] > 0
    assert (tmp_path / "fast.gguf").read_bytes() == (tmp_path / "slow.gguf").read_bytes()


def test_fast_path_reads_no_codes(tmp_path, monkeypatch):
    """The export never unpacks a layer's codes through read_layer (the point of the fast path)."""
    base = gguf_helpers.make_bpe_base(tmp_path / "base", bits=4, group_size=32)
    model = MergedView.open(base, tiny_models.make_random_adapter(base, tmp_path / "adapter"))
    unpacked = []
    real = type(model.base).read_layer

    def spy(self, name, with_codes=True):
        unpacked.append(with_codes)
        return real(self, name, with_codes)

    monkeypatch.setattr(type(model.base), "read_layer", spy)
    G.export(model, tmp_path / "out.gguf")
    assert unpacked and not any(unpacked)
