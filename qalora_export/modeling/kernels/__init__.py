"""Fused low-bit GPU kernels for the QA-LoRA layer (Triton), and when to use them.

The kernels (docs/design.md §7):

- :mod:`.triton_dequant` — one pass over the packed GPTQ codes that writes the *effective* weight
  ``W_eff[o, i] = scale[g(i), o] * (q[o, i] - zero[g(i), o]) + M[o, g(i)]`` with the adapter's delta
  ``M = s * k * (B @ A)`` (``[out, G]``) folded in, so a training step is one GEMM per direction;
- :mod:`.fused_linear` — the autograd Function built on it (forward ``x @ W_eff.T``, backward
  ``gy @ W_eff`` plus the adapter gradient through ``dL/dM = gy.T @ pool_sum(x)``);
- :mod:`.triton_gemv` — batch-1 decode: a GEMV that dequantizes the packed codes on the fly.

Importing this package is cheap: it never imports triton (the kernel modules do, and only the
layer's CUDA path imports them, lazily). The PyTorch path in :mod:`qalora_export.modeling.qalora_linear`
stays the reference and the one CI runs; the kernels are tested against it on CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, see ``tests/unit/modeling/kernels/``).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from qalora_export.errors import ConfigError

KERNEL_MODES = ("auto", "never", "always")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def check_kernel_mode(mode: str) -> str:
    """Validate a ``use_kernels`` value."""
    if mode not in KERNEL_MODES:
        raise ConfigError(f"use_kernels={mode!r} is not one of {KERNEL_MODES}: 'auto' uses the Triton kernels "
                          f"when the layer's tensors are on CUDA and triton is installed, 'never' keeps the "
                          f"PyTorch reference path, 'always' demands the kernels")
    return mode


def kernels_selected(mode: str, *tensors: torch.Tensor) -> bool:
    """Whether a layer in kernel mode ``mode`` runs the Triton path for these tensors.

    ``auto``: every tensor is on CUDA and triton is importable. ``never``: no. ``always``: yes
    (on CPU tensors that works only under ``TRITON_INTERPRET=1``, which is how the tests run it);
    raises :class:`ConfigError` when triton is not installed.
    """
    check_kernel_mode(mode)
    if mode == "never":
        return False
    if mode == "always":
        if not triton_available():
            raise ConfigError("use_kernels='always' needs the 'triton' package, which is not installed; "
                              "install it (it ships with CUDA builds of PyTorch) or use use_kernels='auto'")
        return True
    return all(t.is_cuda for t in tensors) and triton_available()


def set_use_kernels(model: torch.nn.Module, mode: str) -> int:
    """Set ``use_kernels`` on every QA-LoRA layer of ``model``; returns how many layers were set."""
    from qalora_export.modeling.qalora_linear import QALoRALinear

    check_kernel_mode(mode)
    count = 0
    for module in model.modules():
        if isinstance(module, QALoRALinear):
            module.use_kernels = mode
            count += 1
    return count


__all__ = ["KERNEL_MODES", "check_kernel_mode", "kernels_selected", "set_use_kernels", "triton_available"]
