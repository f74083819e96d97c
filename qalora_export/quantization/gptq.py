"""Hessian-based GPTQ quantization (Frantar et al., arXiv 2210.17323), group-wise and asymmetric.

For one linear layer ``y = x @ W.T`` (``W`` ``[out, in]``) and calibration inputs ``X``
``[n, in]``, GPTQ minimises ``||X W_hat.T - X W.T||`` column by column:

1. ``H = 2 X.T X`` ``[in, in]``; dead columns (``H[i, i] == 0``) are zeroed; ``H += damp *
   mean(diag H) * I``;
2. with act-order, columns are visited by ``diag(H)`` descending (the permutation ``perm``);
   quantization groups are runs of ``group_size`` columns *in visiting order*, so
   ``g_idx[perm[j]] = j // group_size`` (GPTQ's ``desc_act`` without static groups); with
   group-aware order, whole contiguous groups are visited by their largest ``diag(H)`` and the
   columns inside each by ``diag(H)``, so the groups (and ``g_idx``) stay ``i // group_size``;
3. ``U`` = upper Cholesky factor of ``H^-1``; for each column ``j`` (in blocks for speed): at a
   group boundary the group's scale/zero are recomputed by min-max from the *current* (already
   error-updated) weights of the group; ``q_j = quant(w_j)``; ``err = (w_j - dq_j) / U[j, j]``;
   the not yet quantized columns absorb it: ``W[:, j+1:] -= err ⊗ U[j, j+1:]``.

Scale/zero follow :func:`qalora_export.core.record.quantize_rtn`'s convention (grid containing 0, fp16
scale, integer zero in ``[min_zero, 2**bits - 1]``), so the result is the same neutral
:class:`QuantizedLinear` record. :func:`calibration_text` builds offline calibration text from the
standard library's docstrings.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Iterator, Optional

import torch

from qalora_export.core.record import QuantizedLinear, check_quant_args
from qalora_export.errors import ConfigError

DEFAULT_DAMP = 0.01
CALIBRATION_MODULES = (
    "argparse", "bisect", "collections", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "enum", "fractions", "functools", "heapq", "inspect", "itertools", "json", "logging", "math",
    "os", "pathlib", "pprint", "random", "re", "shutil", "statistics", "string", "tempfile", "textwrap",
    "typing", "unittest", "urllib.parse", "zipfile",
)


def stdlib_docstrings(modules: tuple[str, ...] = CALIBRATION_MODULES) -> list[str]:
    """Docstrings of standard-library ``modules`` and of their public classes and functions (those
    longer than 40 characters), in a fixed order; modules this Python lacks are skipped."""
    parts: list[str] = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a stripped-down Python; the others suffice
            continue
        doc = inspect.getdoc(module)
        if doc:
            parts.append(doc)
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            member = getattr(module, attr, None)
            if inspect.isclass(member) or inspect.isfunction(member) or inspect.isbuiltin(member):
                doc = inspect.getdoc(member)
                if doc and len(doc) > 40:
                    parts.append(doc)
    return parts


def calibration_text(modules: tuple[str, ...] = CALIBRATION_MODULES) -> str:
    """Docstrings of standard-library modules and their public members (offline, deterministic for
    one Python version), joined by blank lines."""
    return "\n\n".join(stdlib_docstrings(modules))


def _group_params(w: torch.Tensor, maxq: int, min_zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero per row of ``w`` ``[out, gs]`` (float64), as quantize_rtn."""
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(torch.float16).to(torch.float64)
    scale = torch.where((scale > 0) & torch.isfinite(scale), scale, torch.full_like(scale, 2.0 ** -14))
    zero = torch.round(-lo / scale).clamp(min_zero, maxq)
    return scale, zero


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X.T X / n`` float64 ``[in, in]`` from inputs ``x`` ``[..., in]`` (the 1/n keeps the damping
    relative; it does not change the minimiser)."""
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    return 2.0 * (x.T @ x) / max(x.shape[0], 1)


@contextlib.contextmanager
def _single_threaded_on_cpu(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the column loop on CPU: its thousands of small ``[out]``-sized ops
    gain nothing from threads, and on busy cores every op waits for its partner thread (one
    1536 x 576 layer: 10 s with 2 threads vs 0.15 s with 1 on 2 loaded cores; results identical)."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(name: str, weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int,
                  act_order: bool = False, damp: float = DEFAULT_DAMP, min_zero: int = 0,
                  bias: Optional[torch.Tensor] = None, block_size: int = 128,
                  group_aware_order: bool = False) -> QuantizedLinear:
    """Quantize ``weight`` ``[out, in]`` with GPTQ given the Hessian ``H`` ``[in, in]`` (module docstring).

    Args:
        bits: 2, 3, 4 or 8. group_size: divides ``in``.
        act_order: visit columns by decreasing ``diag(H)``; records the resulting ``g_idx``.
        damp: fraction of ``mean(diag(H))`` added to the diagonal.
        min_zero: smallest zero-point (1 for the v1 "gptq" format).
        group_aware_order: visit whole quantization groups by decreasing largest ``diag(H)``, the
            columns inside each by decreasing ``diag(H)`` (GPTQModel's ``act_group_aware``). The
            groups stay the contiguous ``i // group_size`` ones: no ``g_idx`` permutation, so the
            checkpoint is a plain (non act-order) one. Excludes ``act_order``.

    Runs on ``H``'s device (single-threaded on CPU); the record is returned on the CPU.
    """
    if act_order and group_aware_order:
        raise ConfigError("--act-order and --group-aware-order are two column orders; choose one")
    with _single_threaded_on_cpu(H.device):
        return _gptq_quantize(name, weight, H, bits, group_size, act_order, damp, min_zero, bias, block_size,
                              group_aware_order)


def _visiting_order(diag: torch.Tensor, group_size: int, act_order: bool,
                    group_aware: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``perm`` ``[in]`` (position -> column) and ``slot`` ``[G]`` (visited group -> the group index
    its scale/zero are stored under). Act-order makes new groups of consecutive visited columns
    (``slot`` is the identity and ``g_idx`` follows ``perm``); group-aware order permutes whole
    groups, so each visited group is an original one."""
    n = diag.numel()
    n_groups = n // group_size
    identity = torch.arange(n_groups, device=diag.device)
    if act_order:
        return torch.argsort(diag, descending=True, stable=True), identity
    if group_aware:
        per_group = diag.view(n_groups, group_size)
        inside = torch.argsort(per_group, dim=1, descending=True, stable=True)  # [G, gs]
        order = torch.argsort(per_group.amax(dim=1), descending=True, stable=True)  # [G]
        perm = (inside + identity.unsqueeze(1) * group_size)[order].reshape(-1)
        return perm, order
    return torch.arange(n, device=diag.device), identity


def _gptq_quantize(name: str, weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int,
                   act_order: bool, damp: float, min_zero: int, bias: Optional[torch.Tensor],
                   block_size: int, group_aware: bool) -> QuantizedLinear:
    out_features, in_features = weight.shape
    check_quant_args(name, in_features, bits, group_size)
    if H.shape != (in_features, in_features):
        raise ConfigError(f"{name}: Hessian is {tuple(H.shape)}, expected ({in_features}, {in_features})")
    if not 0 < damp < 1:
        raise ConfigError(f"--damp {damp} must be in (0, 1)")
    maxq = (1 << bits) - 1
    device = H.device  # the solve runs where the Hessian is (CPU or CUDA); the record is returned on CPU
    W = weight.detach().to(device=device, dtype=torch.float64).clone()
    H = H.detach().to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm, slot = _visiting_order(torch.diag(H), group_size, act_order, group_aware)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(in_features, dtype=torch.float64, device=device)
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor of H^-1

    n_groups = in_features // group_size
    Q = torch.zeros_like(W)
    scales = torch.empty(n_groups, out_features, dtype=torch.float64, device=device)
    zeros = torch.empty(n_groups, out_features, dtype=torch.float64, device=device)
    slots = slot.tolist()
    block = max(group_size, (block_size // group_size) * group_size)  # groups never straddle blocks
    for b0 in range(0, in_features, block):
        b1 = min(b0 + block, in_features)
        W1 = W[:, b0:b1].clone()
        U1 = U[b0:b1, b0:b1]
        err1 = torch.zeros_like(W1)
        for j in range(b1 - b0):
            col = b0 + j
            g = slots[col // group_size]
            if col % group_size == 0:
                scales[g], zeros[g] = _group_params(W1[:, j:j + group_size], maxq, min_zero)
            s, z = scales[g], zeros[g]
            w = W1[:, j]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            Q[:, col] = q
            err = (w - s * (q - z)) / U1[j, j]
            W1[:, j:] -= err.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            err1[:, j] = err
        W[:, b1:] -= err1 @ U[b0:b1, b1:]

    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    g_idx = torch.empty(in_features, dtype=torch.int64, device=device)
    g_idx[perm] = slot[torch.arange(in_features, device=device) // group_size]
    return QuantizedLinear(name=name, bits=bits, group_size=group_size, codes=codes.to(torch.uint8).cpu(),
                           scales=scales.to(torch.float32).cpu(), zeros=zeros.cpu(), g_idx=g_idx.cpu(),
                           bias=None if bias is None else bias.detach().to(torch.float32).cpu())


def calibration_batch(tokenizer, text: str, n_samples: int, seq_len: int) -> torch.Tensor:
    """Token ids ``[n, seq_len]``: consecutive windows of the tokenized ``text`` (fewer than
    ``n_samples`` when the text is short; ConfigError when it has not one window)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(n_samples, len(ids) // seq_len)
    if n < 1:
        raise ConfigError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of --calibration-seq-len "
            f"{seq_len}; give a longer --calibration-file or a shorter window"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)
