"""Q6_K for the token embedding / output head (``--embeddings q6_k``): the encoder against gguf-py's
and ggml's decoders and ggml's own quantizer, and llama.cpp running a file with a Q6_K head."""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf_helpers
import numpy as np
import pytest
import tiny_models

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import FormatLimitError
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import ggml_ref, kquant, spec
from qalora_export.formats.gguf import read as gguf_read
from qalora_export.formats.gguf import verify as gguf_verify
from qalora_export.formats.gguf.handoff import handoff

PROMPTS = [[1, 40, 77, 100, 200, 30, 31, 250], [10, 20, 30, 40, 50, 60, 70, 80, 90, 300, 5]]


def _q6_k():
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType.Q6_K


def _gguf_py_decode(blocks: np.ndarray) -> np.ndarray:
    from gguf import quants

    return quants.dequantize(blocks, _q6_k()).astype(np.float64)


# -------------------------------------------------------------------------------- the encoder


def test_layout_constants_match_gguf_py():
    from gguf import GGML_QUANT_SIZES

    assert (kquant.QK_K, kquant.Q6_K_BLOCK_BYTES) == GGML_QUANT_SIZES[_q6_k()] == (256, 210)
    assert kquant.Q6_K_OFFSETS == {"ql": 0, "qh": 128, "scales": 192, "d": 208}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pack_round_trips_through_gguf_py_and_our_decoder(seed):
    """Random codes, scales and d packed, then decoded by gguf-py: d * scale * (q - 32) exactly."""
    rng = np.random.default_rng(seed)
    nb = 37
    codes = rng.integers(0, 64, size=(nb, 256)).astype(np.uint8)
    scales = rng.integers(-128, 128, size=(nb, 16)).astype(np.int8)
    d = rng.standard_normal(nb).astype(np.float16)
    blocks = kquant.pack_q6_k(codes, scales, d)
    assert blocks.shape == (nb, 210) and blocks.dtype == np.uint8
    back = kquant.unpack_q6_k(blocks)
    np.testing.assert_array_equal(back[0], codes)
    np.testing.assert_array_equal(back[1], scales)
    np.testing.assert_array_equal(back[2].view(np.uint16), d.view(np.uint16))
    expected = (d.astype(np.float64)[:, None, None] * scales.astype(np.float64)[..., None]
                * (codes.astype(np.float64).reshape(nb, 16, 16) - 32)).reshape(nb, 256)
    np.testing.assert_array_equal(_gguf_py_decode(blocks), expected.astype(np.float32))
    np.testing.assert_array_equal(kquant.dequantize_q6_k(blocks), expected)


@pytest.mark.parametrize("shape,dist", [((7, 256), "normal"), ((33, 512), "laplace"), ((129, 768), "t3"),
                                         ((1, 1024), "normal")])
def test_quantize_round_trip_on_random_tables(shape, dist):
    """Odd row counts; the decoded table is close to the input (6-bit codes per 16-value scale)."""
    rng = np.random.default_rng(shape[0])
    x = {"normal": rng.standard_normal, "laplace": rng.laplace,
         "t3": lambda size: rng.standard_t(3, size=size)}[dist](size=shape).astype(np.float32) * 0.05
    blocks = kquant.quantize_q6_k(x)
    assert blocks.shape == (shape[0], shape[1] // 256 * 210)
    ours, theirs = kquant.dequantize_q6_k(blocks), _gguf_py_decode(blocks)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 + 1e-7 * np.abs(theirs).max())
    rel_rmse = np.sqrt(np.mean((theirs - x) ** 2) / np.mean(x.astype(np.float64) ** 2))
    assert rel_rmse < 0.03, rel_rmse  # ~ (range / 63) / sqrt(12) per sub-block


def test_zeros_constant_rows_and_tiny_values():
    x = np.zeros((3, 512), dtype=np.float32)
    x[1] = 0.25
    x[2, :16] = 1e-30  # subnormal scales: d rounds to 0 in fp16, which must stay finite
    x[2, 300] = -3.0
    out = _gguf_py_decode(kquant.quantize_q6_k(x))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_allclose(out[1], 0.25, rtol=2e-3)
    assert abs(out[2, 300] + 3.0) < 3.0 / 64


def test_refuses_bad_shapes_and_non_finite():
    with pytest.raises(ValueError, match="multiple of 256"):
        kquant.quantize_q6_k(np.zeros((2, 576), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        kquant.quantize_q6_k(np.full((1, 256), np.nan, np.float32))
    assert "q8_0" in kquant.q6_k_constraint("token_embd", 576)
    assert kquant.q6_k_constraint("token_embd", 4096) is None


def test_ggml_decodes_our_blocks_bit_identically():
    """ggml's own dequantize_row_q6_K (libggml-base, what llama.cpp runs) reads our blocks as we do."""
    x = np.random.default_rng(5).standard_normal((19, 512)).astype(np.float32)
    blocks = kquant.quantize_q6_k(x)
    np.testing.assert_array_equal(ggml_ref.ggml_dequantize(blocks, "Q6_K"),
                                  kquant.dequantize_q6_k(blocks).astype(np.float32))


@pytest.mark.parametrize("dist", ["normal", "laplace", "t3"])
def test_error_no_worse_than_llama_cpp_quantizer(dist):
    """Our scale search against ggml's quantize_row_q6_K_ref on the same table (RMSE, same decoder)."""
    rng = np.random.default_rng(11)
    x = {"normal": rng.standard_normal, "laplace": rng.laplace,
         "t3": lambda size: rng.standard_t(3, size=size)}[dist](size=(101, 1024)).astype(np.float32)
    ours = _gguf_py_decode(kquant.quantize_q6_k(x))
    theirs = _gguf_py_decode(ggml_ref.ggml_quantize(x, "Q6_K"))
    rmse_ours, rmse_theirs = (float(np.sqrt(np.mean((w - x) ** 2))) for w in (ours, theirs))
    # measured 0.93-0.95x ggml's on these distributions and on SmolLM2's embedding (docs/gguf.md)
    assert rmse_ours <= 0.98 * rmse_theirs, (rmse_ours, rmse_theirs)


# ------------------------------------------------------------------------- the export, llama.cpp


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    # hidden 256: a Q6_K row is whole 256-value blocks
    return gguf_helpers.make_bpe_base(tmp_path_factory.mktemp("q6k") / "base", hidden=256, intermediate=512,
                                      heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def merged(base, tmp_path_factory) -> MergedView:
    adapter = tiny_models.make_random_adapter(base, tmp_path_factory.mktemp("q6k-ad") / "adapter")
    return MergedView.open(base, adapter)


def test_export_writes_q6_k_head_and_embedding(merged, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "m.gguf"
    summary = G.export(merged, out, embeddings="q6_k")
    assert summary["embeddings"] == "q6_k" and summary["bytes"] == out.stat().st_size
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types[spec.TOKEN_EMBD_TENSOR] == types[spec.OUTPUT_TENSOR] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == "Q4_1"
    assert gguf_read.read_file_types(out) == ("q4_1", "q6_k")
    # the stored head is our encoder's output for the checkpoint's float table
    reader = GGUFReader(str(out))
    head = next(t for t in reader.tensors if t.name == spec.OUTPUT_TENSOR)
    table = merged.read_tensor("lm_head.weight").float().numpy()
    np.testing.assert_array_equal(np.asarray(head.data).reshape(table.shape[0], -1), kquant.quantize_q6_k(table))
    # the projections are untouched: the same Q4_1 weights as the default export
    default = tmp_path / "default.gguf"
    G.export(merged, default)
    ours = dict(G.read_weights(out))
    for name, w in G.read_weights(default):
        assert (ours[name] == w).all(), name


def test_llama_cpp_runs_it_and_verify_judges_it_against_a_q6_k_floor(merged, tmp_path):
    out = tmp_path / "m.gguf"
    G.export(merged, out, embeddings="q6_k")
    result = gguf_verify.verify_runtime(merged, out, PROMPTS, tmp_path / "work", n_new=4)
    assert result["embeddings"] == "q6_k"
    assert result["passed"], result["rule"]
    # the floor is the base exported with the same (Q6_K) head, in llama.cpp
    assert 0 < result["floor"]["mean_kl"] and result["artifact"]["mean_kl"] <= result["allowed_mean_kl"]
    assert result["artifact"]["top1_agreement"] > 0.8
    # the bundle's limits say the head was requantized
    limits = " ".join(handoff(out, result).limits)
    assert "Q6_K" in limits and "not exact" in limits


def test_tied_model_stores_token_embd_as_q6_k(tmp_path):
    from gguf import GGUFReader

    base = gguf_helpers.make_bpe_base(tmp_path / "tied", hidden=256, intermediate=512, heads=4, kv_heads=2,
                                      tie_embeddings=True)
    out = tmp_path / "tied.gguf"
    G.export(MergedView.open(base, None), out, embeddings="q6_k")
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(out)).tensors}
    assert types[spec.TOKEN_EMBD_TENSOR] == "Q6_K" and spec.OUTPUT_TENSOR not in types
    from qalora_export.formats.gguf.runtime import run_logits

    logits = run_logits(out, PROMPTS[:1])
    assert logits[0].shape == (len(PROMPTS[0]), gguf_helpers.BPE_VOCAB) and np.isfinite(logits[0]).all()


def test_hidden_size_not_a_multiple_of_256_is_refused_naming_q8_0(tmp_path):
    base = gguf_helpers.make_bpe_base(tmp_path / "b64")  # hidden 64
    with pytest.raises(FormatLimitError, match="q8_0"):
        G.export(MergedView.open(base, None), tmp_path / "x.gguf", embeddings="q6_k")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_option():
    parser = argparse.ArgumentParser()
    G.add_options(parser)
    args = parser.parse_args(["--embeddings", "q6_k"])
    assert G.options_from_args(args, print)["embeddings"] == "q6_k"
    assert parser.parse_args([]).embeddings == "f16"  # the default stays the checkpoint's own values
