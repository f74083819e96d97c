"""Tests of qalora_export.core.fold: folding a QA-LoRA adapter into the zero-points (docs/design.md §2).

The fold is exact in float64: ``scale * (q - zero') == scale * (q - zero) + dW`` for every weight.
Record-level tests build layers in memory (fast, every bit width / group size / act-order);
file-level tests go through a tiny GPTQ base, ``make_random_adapter`` and :class:`MergedView`.
"""

from __future__ import annotations


import pytest
import torch

import tiny_models
from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter, adapter_delta
from qalora_export.checkpoint.adapter_files import load_adapter
from qalora_export.errors import AdapterError, FoldError
from qalora_export.core.fold import effective_weight, fold_into_zero_points, pooling_group_of_quant_groups
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import GPTQConfig
from qalora_export.checkpoint.gptq_codec import decode_layer, encode_layer
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.record import quantize_rtn

NAME = "model.layers.0.mlp.up_proj"
REL = 1e-12


def make_layer(bits: int, group_size: int, act_order: bool, in_: int = 128, out: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_, generator=gen) * 0.1
    g_idx = (torch.arange(in_) // group_size)[torch.randperm(in_, generator=gen)] if act_order else None
    return quantize_rtn(NAME, w, bits, group_size, g_idx=g_idx)


def make_adapter(layer, pool_group_size: int, pooling: str = "peft", pool_groups: str = "quantization",
                 rank: int = 4, alpha: float = 8.0, seed: int = 1, magnitude: float = 0.05) -> QALoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    L = layer.in_features // pool_group_size
    a = torch.randn(rank, L, generator=gen) * magnitude
    b = torch.randn(layer.out_features, rank, generator=gen) * magnitude
    return QALoRAAdapter(layers={layer.name: AdapterLayer(a, b)}, rank=rank, alpha=alpha, pooling=pooling,
                         pool_group_size=pool_group_size, pool_groups=pool_groups)


def assert_fold_exact(layer, adapter):
    folded, stats = fold_into_zero_points(layer, adapter)
    eff = effective_weight(layer, adapter)
    err = float((folded.dequantize(torch.float64) - eff).abs().max())
    assert err <= REL * float(eff.abs().max()), f"fold error {err:.3g}"
    # the fold moves only the zero-points
    assert folded.codes is layer.codes and folded.scales is layer.scales and torch.equal(folded.g_idx, layer.g_idx)
    assert folded.zeros.dtype == torch.float64
    assert stats.max_abs_shift == pytest.approx(float((layer.zeros - folded.zeros).abs().max()))
    return folded, stats


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [16, 32, 64])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("pooling", ["peft", "mean", "sum"])
def test_fold_equals_effective_weight(bits, group_size, act_order, pooling):
    layer = make_layer(bits, group_size, act_order, seed=bits + group_size)
    adapter = make_adapter(layer, group_size, pooling=pooling)
    folded, stats = assert_fold_exact(layer, adapter)
    assert stats.max_abs_shift > 0 and not stats.integral  # random adapters give fractional zeros
    assert not torch.equal(folded.zeros, layer.zeros)


@pytest.mark.parametrize("pool_multiple", [2, 4])
def test_pooling_group_a_multiple_of_the_quantization_group_folds(pool_multiple):
    layer = make_layer(4, 16, False)  # g16 base
    adapter = make_adapter(layer, 16 * pool_multiple, pool_groups="consecutive")  # A [r, in / (16 m)]
    assert adapter.layers[NAME].pooled_features == 128 // (16 * pool_multiple)
    a_g = pooling_group_of_quant_groups(layer, adapter)
    assert a_g.tolist() == [g // pool_multiple for g in range(layer.num_groups)]
    folded, _ = assert_fold_exact(layer, adapter)
    # quantization groups inside one pooling group shift by the same weight delta
    shift_w = (layer.zeros - folded.zeros) * layer.scales.double()
    for g in range(layer.num_groups):
        assert torch.allclose(shift_w[g], shift_w[(g // pool_multiple) * pool_multiple], rtol=1e-9, atol=0)  # cancellation in z - z'


def test_pool_64_on_g32_base_folds():
    layer = make_layer(4, 32, False)
    adapter = make_adapter(layer, 64, pool_groups="consecutive")
    assert tuple(adapter.layers[NAME].lora_A.shape) == (4, 2)
    assert_fold_exact(layer, adapter)


def test_pool_smaller_than_quantization_group_raises():
    layer = make_layer(4, 32, False)
    adapter = make_adapter(layer, 16, pool_groups="consecutive")  # pooling 16 on g32
    with pytest.raises(FoldError, match=r"quantization group 0 spans pooling groups 0..1.*pooling group size 16 "
                                        r"is smaller than, or not a multiple of, the quantization group size 32"):
        fold_into_zero_points(layer, adapter)


def test_pool_not_a_multiple_raises():
    layer = make_layer(4, 32, False, in_=96)
    adapter = make_adapter(layer, 48, pool_groups="consecutive")  # groups [0,32) [32,64): 48 cuts group 1
    with pytest.raises(FoldError, match="quantization group 1 spans pooling groups 0..1"):
        fold_into_zero_points(layer, adapter)


def test_consecutive_pooling_on_act_order_base_raises():
    layer = make_layer(4, 32, True)
    adapter = make_adapter(layer, 32, pool_groups="consecutive")  # a PEFT adapter on a desc_act base
    with pytest.raises(FoldError, match=r"the base is act-order \(desc_act\)"):
        fold_into_zero_points(layer, adapter)
    # the same factors pooled over the base's quantization groups fold exactly
    assert_fold_exact(layer, make_adapter(layer, 32, pool_groups="quantization"))


def test_one_pooling_group_over_all_columns_folds_even_on_act_order():
    layer = make_layer(3, 32, True)
    adapter = make_adapter(layer, 128, pool_groups="consecutive")  # L = 1: delta constant per row
    assert pooling_group_of_quant_groups(layer, adapter).tolist() == [0, 0, 0, 0]
    assert_fold_exact(layer, adapter)


def test_quantization_pooling_with_wrong_group_count_raises():
    layer = make_layer(4, 32, True)
    adapter = make_adapter(layer, 64, pool_groups="quantization")
    with pytest.raises(FoldError, match="pools over the base's quantization groups but has 2 pooled features for 4 groups"):
        fold_into_zero_points(layer, adapter)


def test_pooling_conventions_differ_by_the_documented_factors():
    layer = make_layer(4, 32, False)
    p, L = 32, 4
    deltas = {}
    for pooling in ("mean", "sum", "peft"):
        adapter = make_adapter(layer, p, pooling=pooling)  # same factors, different convention
        deltas[pooling] = adapter_delta(adapter, NAME, 128)[:, layer.g_idx]  # [out, in]
        # effective_weight adds exactly that delta (up to cancellation in (W + dW) - W)
        added = effective_weight(layer, adapter) - layer.dequantize()
        assert torch.allclose(added, deltas[pooling], rtol=1e-9, atol=0)
    # k = 1/p (mean), 1 (sum), L/p (peft)
    assert torch.allclose(deltas["sum"], deltas["mean"] * p, rtol=1e-14, atol=0)
    assert torch.allclose(deltas["peft"], deltas["mean"] * L, rtol=1e-14, atol=0)
    assert torch.allclose(deltas["peft"], deltas["sum"] * L / p, rtol=1e-14, atol=0)
    # and the weight delta is s * k * (B @ A) broadcast over each group
    adapter = make_adapter(layer, p, pooling="sum")
    ba = adapter.layers[NAME].lora_B.double() @ adapter.layers[NAME].lora_A.double()
    assert torch.allclose(deltas["sum"], (adapter.scale * ba)[:, layer.g_idx], rtol=1e-14, atol=0)


def test_layer_without_adapter_is_unchanged_and_inputs_are_not_modified():
    layer = make_layer(4, 32, True)
    other = QALoRAAdapter(layers={}, rank=4, alpha=8.0, pooling="peft", pool_group_size=32)
    same, stats = fold_into_zero_points(layer, other)
    assert same is layer and stats.max_abs_shift == 0.0 and stats.integral
    assert torch.equal(effective_weight(layer, None), layer.dequantize())
    adapter = make_adapter(layer, 32)
    before = [t.clone() for t in (layer.codes, layer.scales, layer.zeros, layer.g_idx,
                                  adapter.layers[NAME].lora_A, adapter.layers[NAME].lora_B)]
    fold_into_zero_points(layer, adapter)
    effective_weight(layer, adapter)
    after = (layer.codes, layer.scales, layer.zeros, layer.g_idx, adapter.layers[NAME].lora_A, adapter.layers[NAME].lora_B)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_adapter_from_another_model_raises():
    layer = make_layer(4, 32, False)
    adapter = make_adapter(layer, 32)
    adapter.layers[NAME] = AdapterLayer(adapter.layers[NAME].lora_A, torch.zeros(7, 4))
    with pytest.raises(FoldError, match="lora_B has 7 output rows but the layer has 24"):
        fold_into_zero_points(layer, adapter)
    wrong_in = make_layer(4, 32, False, in_=96)
    with pytest.raises(AdapterError, match="4 pooled features, so its pooling group size is 24, but the adapter records 32"):
        fold_into_zero_points(wrong_in, make_adapter(layer, 32))


def test_zero_scale_and_overflow_raise():
    layer = make_layer(4, 32, False)
    scales = layer.scales.clone()
    scales[1, 2] = 0.0
    from dataclasses import replace
    with pytest.raises(FoldError, match="a scale is zero"):
        fold_into_zero_points(replace(layer, scales=scales), make_adapter(layer, 32))
    huge = make_adapter(layer, 32, magnitude=1e200)
    with pytest.raises(FoldError, match="not finite"):
        fold_into_zero_points(layer, huge)


# ----------------------------------------------------------------------------- through files


@pytest.mark.parametrize("bits, group_size, act_order, fmt", [
    (2, 16, False, "gptq_v2"),
    (3, 32, True, "gptq"),
    (4, 64, False, "gptq"),
    (4, 32, True, "gptq_v2"),
])
def test_integral_shift_adapter_folds_to_integral_zeros_bit_exact(tmp_path, bits, group_size, act_order, fmt):
    # hidden == intermediate so that every layer has the same number of groups (= the rank)
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=bits, group_size=group_size, act_order=act_order,
                                      checkpoint_format=fmt, hidden=64, intermediate=64)
    G = 64 // group_size
    adapter_dir = tiny_models.make_random_adapter(base, tmp_path / "adapter", rank=G, alpha=2.0 * G,
                                                  integral_shift=True)
    merged = MergedView.open(base, adapter_dir)
    cfg = GPTQConfig(bits, group_size, act_order, False, fmt)
    moved = 0
    for name in merged.quantized_modules:
        base_layer = merged.base.read_layer(name)
        folded, stats = merged.read_layer(name)
        assert stats.integral and torch.equal(folded.zeros, torch.round(folded.zeros))
        moved += int((folded.zeros != base_layer.zeros).sum())
        eff = merged.reference_weight(name)
        assert torch.equal(folded.dequantize(torch.float64), eff)  # exact, not approximately
        encoded = encode_layer(folded, fmt)
        original = encode_layer(base_layer, fmt)
        for suffix in ("qweight", "scales", "g_idx"):  # the integer weights never change
            assert torch.equal(encoded[suffix], original[suffix])
            assert torch.equal(encoded[suffix], merged.base.read_tensor(f"{name}.{suffix}"))
        back = decode_layer(name, encoded, cfg)
        assert torch.equal(back.zeros, folded.zeros)
        assert torch.equal(back.dequantize(torch.float64), eff)
    assert moved > 0  # the adapter did move zero-points


def test_merged_model_checks_adapter_against_base(tmp_path):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32)
    other = tiny_models.make_tiny_base(tmp_path / "other", bits=4, group_size=32, seed=5)
    adapter_dir = tiny_models.make_random_adapter(base, tmp_path / "adapter")
    MergedView.open(base, adapter_dir)  # its own base: fine
    with pytest.raises(AdapterError, match="trained on a base with fingerprint sha256:.*different quantized base"):
        MergedView.open(other, adapter_dir)
    adapter = load_adapter(adapter_dir)
    adapter.layers["model.layers.7.mlp.up_proj"] = adapter.layers["model.layers.0.mlp.up_proj"]
    with pytest.raises(AdapterError, match=r"adapts 1 module\(s\) the base does not quantize \(first: model.layers.7"):
        MergedView(GPTQCheckpoint(base), adapter)
    plain = MergedView.open(base)
    layer, stats = plain.read_layer("model.layers.0.mlp.up_proj")
    assert stats.max_abs_shift == 0.0 and torch.equal(layer.zeros, plain.base.read_layer(layer.name).zeros)


def test_merged_random_adapter_is_exact_in_float64(tmp_path):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=3, group_size=32, act_order=True)
    adapter_dir = tiny_models.make_random_adapter(base, tmp_path / "adapter", magnitude=0.2)
    merged = MergedView.open(base, adapter_dir)
    for name in merged.quantized_modules:
        folded, stats = merged.read_layer(name)
        eff = merged.reference_weight(name)
        assert float((folded.dequantize() - eff).abs().max()) <= REL * float(eff.abs().max())
        assert not stats.integral
