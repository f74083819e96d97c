"""Shared setup of the Triton kernel tests: the device they run on, and Triton's CPU interpreter.

Without CUDA the kernels run on CPU tensors through Triton's interpreter. ``TRITON_INTERPRET=1``
is read when a function is decorated with ``@triton.jit`` — triton's own library functions
(``tl.sum``, ``tl.zeros``) are decorated when triton is first imported — so it must be set before
anything in the process imports triton. ``tests/conftest.py`` sets it first thing on machines
without CUDA; :func:`setup` checks that it took effect and otherwise skips with the reason.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup() -> None:
    """Import-skip without triton; make sure the CPU interpreter is active when there is no CUDA."""
    if DEVICE.type == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on "
                        "CPU in this process; run these tests with TRITON_INTERPRET=1 in the environment",
                        allow_module_level=True)
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    if DEVICE.type == "cpu":
        import triton.language as tl

        if type(tl.sum).__name__ != "InterpretedFunction":
            pytest.skip("triton is loaded without its interpreter; set TRITON_INTERPRET=1 before importing it",
                        allow_module_level=True)


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half an ulp at 1.0: the relative error of one rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def rounding_bound(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest error of rounding the float64 values ``ref`` once to ``dtype`` (elementwise).

    Relative ``u`` for normal numbers plus half the subnormal spacing. Triton's CPU interpreter
    converts float32 to bfloat16 by truncation (the GPU rounds to nearest even), so under the
    interpreter one bfloat16 conversion may be off by a whole ulp: ``2u``.
    """
    info = torch.finfo(dtype)
    u = info.eps / 2
    if dtype == torch.bfloat16 and DEVICE.type == "cpu":
        u = info.eps
    return (ref.abs() * u + info.tiny * info.eps / 2) * 1.001


def random_packed_base(bits: int, in_features: int, out_features: int, group_size: int, act_order: bool,
                       seed: int, fractional_zeros: bool = True):
    """Random codes packed GPTQ-style, positive scales, (fractional) float64 zeros, g_idx.

    Returns ``(codes [in, out] int64, qweight, scales f32 [G, out], zeros f64 [G, out], g_idx int64 [in])``
    on :data:`DEVICE`; nothing is zero by construction except by chance.
    """
    from qalora_export.core.packing import pack_codes

    gen = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    codes = torch.randint(0, 1 << bits, (in_features, out_features), generator=gen)
    qweight = pack_codes(codes, bits, dim=0)
    scales = (torch.rand(groups, out_features, generator=gen) + 0.05) * 0.02
    zeros = torch.randint(0, 1 << bits, (groups, out_features), generator=gen).double()
    if fractional_zeros:  # a folded layer's zeros
        zeros = zeros + torch.rand(groups, out_features, generator=gen, dtype=torch.float64) - 0.5
    g_idx = torch.arange(in_features) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    return tuple(t.to(DEVICE) for t in (codes, qweight, scales, zeros, g_idx))
