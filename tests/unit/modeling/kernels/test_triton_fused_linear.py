"""The fused QA-LoRA linear (qalora_export.modeling.kernels.fused_linear) against the reference layer's autograd.

The same :class:`QALoRALinear` is run twice: ``use_kernels="never"`` (the PyTorch reference,
differentiated by torch.autograd) and ``use_kernels="always"`` (the Triton dequant pass with the
adapter delta folded in, and the hand-written backward ``dx = gy @ W_eff``,
``dL/dM = gy.T @ pool_sum(x)``). Outputs and the gradients of ``x``, ``lora_A`` and ``lora_B``
must agree: to float64 rounding in float64, to float32 rounding in float32. On CPU the kernels run
in Triton's interpreter, at small shapes (``in = 64``, ``out = 21``: not a multiple of any tile).
"""

from __future__ import annotations

import copy

import pytest
import torch

import kernel_testing as kt

kt.setup()

from qalora_export.core.adapter import AdapterLayer  # noqa: E402
from qalora_export.errors import ConfigError  # noqa: E402
from qalora_export.modeling.kernels import kernels_selected, set_use_kernels  # noqa: E402
from qalora_export.modeling.kernels import fused_linear  # noqa: E402
from qalora_export.modeling.qalora_linear import QALoRALinear  # noqa: E402
from qalora_export.core.record import quantize_rtn  # noqa: E402

IN, OUT, GS, RANK = 64, 21, 16, 3


def make_pair(bits: int, act_order: bool, dtype: torch.dtype, pooling: str = "peft", rank: int = RANK,
              seed: int = 0):
    """(reference module, kernel module): identical layers, random non-zero adapter, fractional zeros."""
    gen = torch.Generator().manual_seed(seed + bits)
    g_idx = (torch.arange(IN) // GS)[torch.randperm(IN, generator=gen)] if act_order else None
    layer = quantize_rtn("model.layers.0.mlp.up_proj", torch.randn(OUT, IN, generator=gen) * 0.1, bits, GS,
                         g_idx=g_idx, bias=torch.randn(OUT, generator=gen))
    layer = layer.with_zeros(layer.zeros + torch.rand(layer.zeros.shape, generator=gen, dtype=torch.float64) - 0.5)
    ref = QALoRALinear(layer, rank, 2.0 * max(rank, 1), pooling, dtype, use_kernels="never")
    if rank:
        ref.load_adapter(AdapterLayer(torch.randn(rank, IN // GS, generator=gen) * 0.5,
                                      torch.randn(OUT, rank, generator=gen) * 0.5))
    if dtype == torch.float64:
        ref = ref.to(torch.float64)  # adapter factors and scales in float64 too
    ref = ref.to(kt.DEVICE)
    fused = copy.deepcopy(ref)
    fused.use_kernels = "always"
    return ref, fused


def run(module, x, gy):
    """Output and the gradients of x and of the adapter factors for the loss ``sum(y * gy)``."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    grads = [x.grad] + ([module.lora_A.grad, module.lora_B.grad] if module.rank else [])
    return [y.detach()] + grads


def assert_all_close(got, want, rtol, what):
    for name, g, w in zip(["y", "dx", "dA", "dB"], got, want):
        assert g is not None and g.dtype == w.dtype and g.shape == w.shape, (what, name)
        err = float((g.double() - w.double()).abs().max())
        scale = float(w.double().abs().max())
        assert err <= rtol * scale, f"{what} {name}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_float64_forward_and_gradients_match_reference(bits, act_order):
    ref, fused = make_pair(bits, act_order, torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, IN, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    gy = torch.randn(2, 3, OUT, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    assert_all_close(run(fused, x, gy), run(ref, x, gy), 1e-12, f"{bits}-bit act_order={act_order}")


@pytest.mark.parametrize("pooling", ["mean", "sum"])
@pytest.mark.parametrize("bits,act_order", [(4, False), (3, True)])
def test_float32_forward_and_gradients_match_reference(bits, act_order, pooling):
    ref, fused = make_pair(bits, act_order, torch.float32, pooling)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, IN, generator=gen).to(kt.DEVICE)
    gy = torch.randn(5, OUT, generator=gen).to(kt.DEVICE)
    assert_all_close(run(fused, x, gy), run(ref, x, gy), 2e-6, f"{bits}-bit {pooling}")


def test_bfloat16_compute_is_within_bfloat16_rounding_of_float64():
    """bf16 weight and GEMMs: against the float64 reference, errors of a few bf16 ulps of the largest value."""
    ref64, _ = make_pair(4, True, torch.float64)
    _, fused = make_pair(4, True, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, IN, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    gy = torch.randn(7, OUT, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    want = run(ref64, x, gy)
    got = run(fused, x.to(torch.bfloat16), gy.to(torch.bfloat16))
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert_all_close([g.double() for g in got], want, 2.0 ** -6, "bf16")


def test_keep_weight_frozen_factor_and_no_input_grad():
    """``keep_weight`` gives the same gradients; only the factors that require grad get one."""
    ref, fused = make_pair(2, True, torch.float64)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, IN, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    gy = torch.randn(4, OUT, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    want = run(ref, x, gy)
    base = fused_linear.PackedBase.of(fused)
    factor = fused.k * fused.scaling
    a = fused.lora_A.detach().clone().requires_grad_(True)
    b = fused.lora_B.detach().clone().requires_grad_(True)
    xk = x.clone().requires_grad_(True)
    y = fused_linear.fused_qalora_linear(xk, base, a, b, factor, fused.bias, torch.float64, keep_weight=True)
    y.backward(gy)
    assert_all_close([y.detach(), xk.grad, a.grad, b.grad], want, 1e-12, "keep_weight")
    # A frozen, x a plain input: only dB
    b.grad = None
    y = fused_linear.fused_qalora_linear(x, base, a.detach(), b, factor, fused.bias, torch.float64)
    y.backward(gy)
    assert torch.allclose(b.grad, want[3], rtol=1e-12, atol=1e-14)


def test_no_adapter_layer():
    ref, fused = make_pair(3, False, torch.float64, rank=0)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, IN, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    gy = torch.randn(3, OUT, generator=gen, dtype=torch.float64).to(kt.DEVICE)
    assert_all_close(run(fused, x, gy), run(ref, x, gy), 1e-12, "rank 0")


def test_autocast_does_not_change_the_fused_dtypes():
    """Under bf16 autocast (as ``train`` runs on CUDA) the float32 fused layer computes exactly as without it."""
    _, fused = make_pair(4, False, torch.float32)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, IN, generator=gen).to(kt.DEVICE)
    gy = torch.randn(3, OUT, generator=gen).to(kt.DEVICE)
    want = run(fused, x, gy)
    with torch.autocast(kt.DEVICE.type, dtype=torch.bfloat16):
        got = run(fused, x, gy)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_token_without_grad_takes_the_decode_kernel(dtype, monkeypatch):
    ref, fused = make_pair(4, True, dtype)
    calls = []
    from qalora_export.modeling.kernels import triton_gemv

    original = triton_gemv.gemv_effective_weight
    monkeypatch.setattr(triton_gemv, "gemv_effective_weight", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(1, 1, IN, generator=torch.Generator().manual_seed(8), dtype=dtype).to(kt.DEVICE)
    with torch.no_grad():
        got, want = fused(x), ref(x)
    assert calls == [1] and got.shape == (1, 1, OUT) and got.dtype == dtype
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float((got - want).abs().max()) <= rtol * float(want.abs().max())


def test_kernel_selection():
    cpu = torch.zeros(1)
    assert kernels_selected("auto", cpu) is False  # CPU tensors: the reference path
    assert kernels_selected("never", cpu) is False
    assert kernels_selected("always", cpu) is True
    with pytest.raises(ConfigError, match="use_kernels='sometimes'"):
        kernels_selected("sometimes", cpu)
    ref, fused = make_pair(4, False, torch.float32)
    with pytest.raises(ConfigError, match="use_kernels="):
        QALoRALinear.__init__(QALoRALinear.__new__(QALoRALinear), quantize_rtn("l", torch.randn(4, 32), 4, 16),
                              use_kernels="yes")
    model = torch.nn.Sequential(ref, fused)
    assert set_use_kernels(model, "never") == 2 and fused.use_kernels == "never"


def test_always_without_triton_is_a_clear_error(monkeypatch):
    from qalora_export.modeling import kernels

    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(ConfigError, match="needs the 'triton' package"):
        kernels.kernels_selected("always", torch.zeros(1))
    assert kernels.kernels_selected("auto", torch.zeros(1)) is False
