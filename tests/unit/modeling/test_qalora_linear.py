"""Tests of qalora_export.modeling.qalora_linear: the QA-LoRA linear layer over packed codes, and PEFT parity.

The layer computes ``x @ W_hat.T + bias + s * k * (pool_sum(x) @ A.T) @ B.T`` (docs/design.md §2);
it must equal ``x @ effective_weight.T`` (the fold's reference) and PEFT's own QA-LoRA forward
of the same adapter on the same GPTQ base loaded by transformers + GPTQModel.
"""

from __future__ import annotations

import pytest
import torch

import tiny_models
from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter, pooling_factor
from qalora_export.checkpoint.adapter_files import load_adapter
from qalora_export.core.fold import effective_weight, fold_into_zero_points
from qalora_export.modeling.qalora_linear import QALoRALinear
from qalora_export.core.record import quantize_rtn

NAME = "model.layers.0.mlp.up_proj"


def make_layer(bits: int, group_size: int, act_order: bool, in_: int = 128, out: int = 24, bias: bool = True):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    w = torch.randn(out, in_, generator=gen) * 0.1
    g_idx = (torch.arange(in_) // group_size)[torch.randperm(in_, generator=gen)] if act_order else None
    return quantize_rtn(NAME, w, bits, group_size, g_idx=g_idx,
                        bias=torch.randn(out, generator=gen) if bias else None)


def make_module(layer, pooling: str, rank: int = 4, alpha: float = 8.0, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, layer.num_groups, generator=gen) * 0.3
    b = torch.randn(layer.out_features, rank, generator=gen) * 0.3
    module = QALoRALinear(layer, rank, alpha, pooling, torch.float32)
    module.load_adapter(AdapterLayer(a, b))
    adapter = QALoRAAdapter(layers={layer.name: AdapterLayer(a, b)}, rank=rank, alpha=alpha, pooling=pooling,
                            pool_group_size=layer.group_size, pool_groups="quantization")
    return module, adapter


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("pooling", ["peft", "mean", "sum"])
def test_forward_matches_the_formula(bits, act_order, pooling):
    layer = make_layer(bits, 32, act_order)
    module, adapter = make_module(layer, pooling)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(0))
    # the formula, written out in float64 with an explicit per-group pooling loop
    xd = x.double()
    pooled = torch.stack([xd[..., layer.g_idx == g].sum(-1) for g in range(layer.num_groups)], -1)
    k = pooling_factor(pooling, 128, 32)
    a, b = adapter.layers[NAME].lora_A.double(), adapter.layers[NAME].lora_B.double()
    expected = xd @ layer.dequantize().T + layer.bias.double() + (adapter.scale * k) * (pooled @ a.T) @ b.T
    with torch.no_grad():
        got = module(x)
    assert got.dtype == torch.float32 and got.shape == (3, 5, 24)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # the same as the fold's reference weight, and as the folded layer (the merge)
    eff = effective_weight(layer, adapter)
    assert torch.allclose(expected, xd @ eff.T + layer.bias.double(), rtol=1e-10, atol=1e-12)
    folded, _ = fold_into_zero_points(layer, adapter)
    assert torch.allclose(expected, xd @ folded.dequantize().T + layer.bias.double(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantized_weight_equals_the_record(act_order):
    layer = make_layer(3, 16, act_order)
    layer = layer.with_zeros(layer.zeros + 0.375)  # fractional zeros (a folded layer) work too
    module = QALoRALinear(layer)
    assert torch.equal(module.dequantized_weight(torch.float64), layer.dequantize(torch.float64))
    w32 = module.dequantized_weight(torch.float32)
    assert w32.dtype == torch.float32 and w32.shape == (24, 128)
    assert torch.allclose(w32.double(), layer.dequantize(), rtol=2e-7, atol=1e-7)
    assert module.dequantized_weight().dtype == torch.float32  # compute dtype by default


def test_pool_sum_contiguous_and_act_order():
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    contiguous = QALoRALinear(make_layer(4, 16, False, in_=64))
    assert torch.equal(contiguous.pool_sum(x), x.reshape(2, 4, 16).sum(-1))
    layer = make_layer(4, 16, True, in_=64)
    act = QALoRALinear(layer)
    expected = torch.stack([x[:, layer.g_idx == g].sum(-1) for g in range(4)], -1)
    assert torch.equal(act.pool_sum(x), expected)


def test_no_adapter_layer_is_the_plain_quantized_linear():
    layer = make_layer(4, 32, False)
    module = QALoRALinear(layer)
    assert module.rank == 0 and module.lora_A is None and list(module.parameters()) == []
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert torch.allclose(module(x), torch.nn.functional.linear(x, layer.dequantize(torch.float32), layer.bias),
                              rtol=1e-5, atol=1e-5)


def test_fresh_adapter_starts_at_zero_and_trains_only_the_factors():
    layer = make_layer(4, 32, True)
    base = QALoRALinear(layer)
    module = QALoRALinear(layer, rank=4, alpha=8.0, pooling="peft")
    assert torch.count_nonzero(module.lora_B) == 0 and torch.count_nonzero(module.lora_A) > 0
    assert {n for n, _ in module.named_parameters()} == {"lora_A", "lora_B"}
    x = torch.randn(3, 128)
    with torch.no_grad():
        assert torch.equal(module(x), base(x))  # B = 0: the adapter adds nothing yet
    module(x).square().sum().backward()
    assert module.lora_B.grad is not None and torch.count_nonzero(module.lora_B.grad) > 0
    qweight_before = module.qweight.clone()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    opt.step()
    assert torch.equal(module.qweight, qweight_before)  # the packed base is frozen


def test_bfloat16_compute_stays_close():
    layer = make_layer(4, 32, False)
    module, _ = make_module(layer, "peft")
    bf = QALoRALinear(layer, 4, 8.0, "peft", torch.bfloat16)
    bf.load_adapter(AdapterLayer(module.lora_A.detach(), module.lora_B.detach()))
    x = torch.randn(2, 128)
    with torch.no_grad():
        ref, got = module(x), bf(x)
    assert got.dtype == torch.float32  # returned in the input's dtype
    assert float((ref - got).abs().max()) <= 3e-2 * float(ref.abs().max())


# ----------------------------------------------------------------------------- PEFT parity


@pytest.mark.parametrize("fmt", ["gptq_v2"])
def test_unmerged_forward_equals_peft_qalora_on_gptqmodel(tmp_path, fmt):
    """PEFT's QA-LoRA (``use_qalora``) on the base loaded by transformers + GPTQModel computes
    what build_model computes for the same adapter directory.

    Both sides share the base up to GPTQModel's fp16 dequantization (see test_gptq_golden.py), so
    the adapter's own effect (logits with minus logits without) is compared, as well as the logits.
    """
    pytest.importorskip("gptqmodel")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, GPTQConfig

    from qalora_export.modeling.model import build_model

    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32, checkpoint_format=fmt)
    adapter_dir = tiny_models.make_random_adapter(base, tmp_path / "adapter", pooling="peft",
                                                  pool_groups="consecutive", magnitude=0.3)
    adapter = load_adapter(adapter_dir)
    assert adapter.pooling == "peft"
    ids = torch.randint(4, tiny_models.TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

    with torch._dynamo.config.patch(disable=True), torch.no_grad():  # GPTQModel compiles per shape otherwise
        hf = AutoModelForCausalLM.from_pretrained(str(base), quantization_config=GPTQConfig(
            bits=4, backend="gptq_torch"), dtype=torch.float32)
        theirs_base = hf(ids).logits
        peft_model = peft.PeftModel.from_pretrained(hf, str(adapter_dir))
        assert peft_model.peft_config["default"].use_qalora
        theirs = peft_model(ids).logits
        ours = build_model(base, adapter)(ids).logits
        ours_base = build_model(base)(ids).logits

    effect_ours, effect_theirs = ours - ours_base, theirs - theirs_base
    effect = float(effect_ours.abs().max())
    scale = float(ours.abs().max())
    # measured: effect ~1.7 on logits ~2.2; differences ~1.5e-3 (GPTQModel's fp16 base)
    assert effect > 0.2 * scale, "the adapter must visibly change the logits for this test to mean anything"
    assert float((ours - theirs).abs().max()) <= 4e-3 * scale
    assert float((effect_ours - effect_theirs).abs().max()) <= 4e-3 * scale
