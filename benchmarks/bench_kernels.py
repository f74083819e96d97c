"""Benchmark: the fused QA-LoRA kernels against the bf16 GEMM floor, bf16 LoRA and NF4 QLoRA (CUDA only).

The workload of issue 6 / docs/design.md §7: one LLaMA-7B decoder layer's 7 projections (q, k, v, o:
4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 -> 4096), bf16.

- **train**: forward + backward of each projection on ``--tokens`` tokens (default 4096) with the
  input requiring grad (as inside a network), summed over the 7 projections:
  ``bf16 floor`` (frozen bf16 weight: two GEMMs), ``bf16 LoRA r=64``, ``NF4 QLoRA r=64``
  (bitsandbytes, when installed), ``int4 plain PyTorch`` (this project's reference path:
  dequantize with torch ops every step) and ``fused`` (the Triton dequant pass with the adapter
  delta folded in, one GEMM per direction), the latter for each ``--bits`` / ``--group-sizes`` /
  act-order setting asked for.
- **decode**: batch-1 forward of the 7 projections, no grad: ``bf16`` (cuBLAS GEMV), NF4
  (bitsandbytes), plain PyTorch int4, and the fused GEMV kernel.

Every time is the median over ``--repeats`` timed calls (CUDA events) after ``--warmup`` calls,
and is printed as a ratio against the bf16 floor measured in the same run. Peak memory of one
step (``torch.cuda.max_memory_allocated`` above what was allocated before it) is reported too.
Before timing, the script checks the kernels' numbers on this GPU: the dequantized ``W_eff``
against a float64 reference (NaN-filled output, error within bf16 rounding plus float32
arithmetic), the GEMV against a float64 product, and a fused training step's output and
gradients against the reference path; a failed check exits non-zero before anything is timed.

Usage (on a machine with CUDA, torch and triton; bitsandbytes optional)::

    python benchmarks/bench_kernels.py --json results/bench_kernels.json
    python benchmarks/bench_kernels.py --bits 4 3 2 --group-sizes 128 64 32 --act-order both

Without CUDA it prints why and exits with status 1: nothing can be measured on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

LLAMA7B_PROJECTIONS = (  # (name, in_features, out_features)
    ("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
    ("gate_proj", 4096, 11008), ("up_proj", 4096, 11008), ("down_proj", 11008, 4096),
)
LORA_ALPHA = 16.0


# ----------------------------------------------------------------------------------------- timing

def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` on the current CUDA stream, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mb(fn: Callable[[], object]) -> float:
    """Peak memory allocated while ``fn`` runs, above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


# ------------------------------------------------------------------------------------- the layers

def random_record(name: str, in_: int, out: int, bits: int, group_size: int, act_order: bool, seed: int):
    """A random quantized layer (codes, scales, fractional zeros as after a fold) on the CPU."""
    from qalora_export.core.record import QuantizedLinear, contiguous_g_idx

    gen = torch.Generator().manual_seed(seed)
    groups = in_ // group_size
    codes = torch.randint(0, 1 << bits, (out, in_), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(groups, out, generator=gen) + 0.05) * (0.04 / (1 << bits))
    zeros = torch.randint(0, 1 << bits, (groups, out), generator=gen).double() + 0.25
    g_idx = contiguous_g_idx(in_, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(in_, generator=gen)]
    return QuantizedLinear(name, bits, group_size, codes, scales, zeros, g_idx)


def qalora_layers(bits: int, group_size: int, act_order: bool, rank: int, use_kernels: str, device):
    from qalora_export.modeling.qalora_linear import QALoRALinear

    layers = []
    for i, (name, in_, out) in enumerate(LLAMA7B_PROJECTIONS):
        record = random_record(name, in_, out, bits, group_size, act_order, seed=i)
        module = QALoRALinear(record, rank, LORA_ALPHA, "peft", torch.bfloat16, use_kernels=use_kernels)
        with torch.no_grad():
            module.lora_B.normal_(0, 0.02)  # a trained adapter: B non-zero
        layers.append(module.to(device))
    return layers


class LoRALinear(torch.nn.Module):
    """Frozen base (bf16 weight or a bitsandbytes module) plus a bf16 LoRA of rank r (r = 0: frozen floor)."""

    def __init__(self, base: Callable[[torch.Tensor], torch.Tensor], in_: int, out: int, rank: int, device):
        super().__init__()
        self.base = base
        self.rank = rank
        if rank:
            self.lora_A = torch.nn.Parameter(torch.randn(rank, in_, device=device, dtype=torch.bfloat16) / in_ ** 0.5)
            self.lora_B = torch.nn.Parameter(torch.randn(out, rank, device=device, dtype=torch.bfloat16) * 0.02)

    def forward(self, x):
        y = self.base(x)
        if self.rank:
            y = y + (x @ self.lora_A.T) @ self.lora_B.T * (LORA_ALPHA / self.rank)
        return y


def bf16_layers(rank: int, device):
    layers = []
    for name, in_, out in LLAMA7B_PROJECTIONS:
        w = torch.randn(out, in_, device=device, dtype=torch.bfloat16) * 0.02
        layers.append(LoRALinear(lambda x, w=w: torch.nn.functional.linear(x, w), in_, out, rank, device))
    return layers


def nf4_layers(rank: int, device):
    import bitsandbytes as bnb

    layers = []
    for name, in_, out in LLAMA7B_PROJECTIONS:
        lin = bnb.nn.Linear4bit(in_, out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(torch.randn(out, in_, dtype=torch.bfloat16) * 0.02, requires_grad=False,
                                       quant_type="nf4")
        lin = lin.to(device)
        layers.append(LoRALinear(lin, in_, out, rank, device))
    return layers


# ---------------------------------------------------------------------------------------- workloads

def train_step(layers, inputs, grads) -> Callable[[], None]:
    """Forward + backward of each projection; the input requires grad, as inside a network."""
    def step():
        for layer, x, gy in zip(layers, inputs, grads):
            y = layer(x)
            y.backward(gy)
    return step


def decode_step(layers, tokens) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            for layer, x in zip(layers, tokens):
                layer(x)
    return step


def clear_grads(layers, inputs):
    for x in inputs:
        x.grad = None
    for layer in layers:
        for p in layer.parameters():
            p.grad = None


# ------------------------------------------------------------------------------------------ checks

def check_kernels(device, bits: int, group_size: int, act_order: bool,
                  shape: tuple[int, int] = LLAMA7B_PROJECTIONS[6][1:], tokens: int = 256) -> dict:
    """The kernels' numbers on this GPU, against float64 references; raises SystemExit on a failure.

    ``shape`` is ``(in, out)``, by default down_proj's (the longest reduction).
    """
    from qalora_export.modeling.kernels.fused_linear import PackedBase, adapter_delta
    from qalora_export.modeling.kernels.triton_dequant import dequantize_effective_weight
    from qalora_export.modeling.kernels.triton_gemv import gemv_effective_weight
    from qalora_export.modeling.qalora_linear import QALoRALinear

    u_bf16, u_f32 = 2.0 ** -8, 2.0 ** -24
    if device.type == "cpu":  # Triton's interpreter (tests only) truncates float32 to bfloat16
        u_bf16 = 2.0 ** -7
    report = {}
    in_, out = shape
    record = random_record("check", in_, out, bits, group_size, act_order, seed=99)
    module = QALoRALinear(record, 64, LORA_ALPHA, "peft", torch.bfloat16, use_kernels="always")
    with torch.no_grad():
        module.lora_B.normal_(0, 0.02)
    module = module.to(device)
    factor = module.k * module.scaling
    delta = adapter_delta(module.lora_A, module.lora_B, factor, torch.float32).detach()
    base = PackedBase.of(module)
    # W_eff, every element written, within one bf16 rounding plus float32 arithmetic
    g = module.g_idx
    scale, zero = module.scales.double()[g], module.zeros.double()[g]
    codes = record.codes.T.to(device).double()
    ref = scale * (codes - zero) + delta.double().T[g]
    out_t = torch.full((in_, out), float("nan"), dtype=torch.bfloat16, device=device)
    dequantize_effective_weight(base.qweight, base.scales, base.zeros, g, bits, in_, delta, torch.bfloat16,
                                out=out_t)
    w_err = 4 * u_f32 * (scale * (codes + zero.abs()) + delta.double().abs().T[g])  # float32 arithmetic
    bound = u_bf16 * ref.abs() * 1.001 + w_err
    ratio = float(((out_t.double() - ref).abs() / (bound + 1e-30)).max())
    report["dequant_worst_error_over_bound"] = ratio
    if torch.isnan(out_t).any() or ratio > 1.0:
        raise SystemExit(f"kernel check failed: W_eff error up to {ratio:.3g}x the bf16 rounding bound "
                         f"(or unwritten elements)")
    # GEMV against the float64 product with the bf16 weight the kernel would have produced
    x = torch.randn(in_, device=device, dtype=torch.bfloat16)
    y = gemv_effective_weight(x, base.qweight, base.scales, base.zeros, g, bits, in_, delta)
    y_ref = x.double() @ ref
    mag = x.double().abs() @ ref.abs()
    gemv_bound = u_bf16 * y_ref.abs() * 1.001 + (in_ + 4) * u_f32 * mag + x.double().abs() @ w_err
    gemv_ratio = float(((y.double() - y_ref).abs() / (gemv_bound + 1e-30)).max())
    report["gemv_worst_error_over_bound"] = gemv_ratio
    if gemv_ratio > 1.0:
        raise SystemExit(f"kernel check failed: GEMV error up to {gemv_ratio:.3g}x its bound")
    # one fused training step vs the reference path, both float32
    fused = QALoRALinear(record, 64, LORA_ALPHA, "peft", torch.float32, use_kernels="always")
    with torch.no_grad():
        fused.lora_B.copy_(module.lora_B)
        fused.lora_A.copy_(module.lora_A)
    fused = fused.to(device)
    ref_mod = QALoRALinear(record, 64, LORA_ALPHA, "peft", torch.float32, use_kernels="never").to(device)
    with torch.no_grad():
        ref_mod.lora_A.copy_(fused.lora_A)
        ref_mod.lora_B.copy_(fused.lora_B)
    torch.backends.cuda.matmul.allow_tf32 = False
    xs = torch.randn(tokens, in_, device=device)
    gy = torch.randn(tokens, out, device=device)
    results = []
    for mod in (fused, ref_mod):
        xg = xs.clone().requires_grad_(True)
        yy = mod(xg)
        yy.backward(gy)
        results.append([yy.detach(), xg.grad, mod.lora_A.grad, mod.lora_B.grad])
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(*results))
    report["train_step_float32_worst_relative_error"] = worst
    if worst > 1e-4:
        raise SystemExit(f"kernel check failed: fused float32 step differs from the reference by {worst:.3g} "
                         f"(relative to the largest value)")
    return report


# --------------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per training step (default 4096)")
    parser.add_argument("--rank", type=int, default=64, help="adapter rank for LoRA, QLoRA and QA-LoRA")
    parser.add_argument("--bits", type=int, nargs="+", default=[4], help="fused rows: bit widths (2 3 4 8)")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[128], help="fused rows: group sizes")
    parser.add_argument("--act-order", choices=["no", "yes", "both"], default="no", help="fused rows: g_idx")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-plain", action="store_true", help="skip the (slow) plain-PyTorch int4 rows")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here, so nothing can be measured (the kernels are GPU kernels; "
              "their numbers are tested on CPU by tests/unit/modeling/kernels/ through Triton's interpreter). "
              "Run this script on a machine with a CUDA GPU, torch and triton.", file=sys.stderr)
        return 1
    from qalora_export.modeling.kernels import triton_available

    if not triton_available():
        print("bench_kernels: triton is not installed; it ships with CUDA builds of PyTorch "
              "(pip install triton)", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    torch.manual_seed(0)
    acts = [a == "yes" for a in (["no", "yes"] if args.act_order == "both" else [args.act_order])]

    checks = {f"{b}bit_g{gs}{'_act' if act else ''}": check_kernels(device, b, gs, act)
              for b in args.bits for gs in args.group_sizes for act in acts}

    def inputs(tokens, grad):
        xs = [torch.randn(tokens, in_, device=device, dtype=torch.bfloat16, requires_grad=grad)
              for _, in_, _ in LLAMA7B_PROJECTIONS]
        gys = [torch.randn(tokens, out, device=device, dtype=torch.bfloat16) for _, _, out in LLAMA7B_PROJECTIONS]
        return xs, gys

    variants = [("bf16 floor (frozen base, matmuls only)", lambda: bf16_layers(0, device)),
                (f"bf16 LoRA r={args.rank}", lambda: bf16_layers(args.rank, device))]
    try:
        import bitsandbytes  # noqa: F401

        variants.append((f"NF4 QLoRA r={args.rank} (bitsandbytes {bitsandbytes.__version__})",
                         lambda: nf4_layers(args.rank, device)))
    except ImportError:
        print("bench_kernels: bitsandbytes not installed; the NF4 row is skipped", file=sys.stderr)
    if not args.skip_plain:
        variants.append((f"int4 g128 plain PyTorch r={args.rank}",
                         lambda: qalora_layers(4, 128, False, args.rank, "never", device)))
    for b in args.bits:
        for gs in args.group_sizes:
            for act in acts:
                variants.append((f"fused int{b} g{gs}{' act-order' if act else ''} r={args.rank}",
                                 lambda b=b, gs=gs, act=act: qalora_layers(b, gs, act, args.rank, "always", device)))

    rows = []
    for label, build in variants:
        layers = build()
        xs, gys = inputs(args.tokens, True)
        step = train_step(layers, xs, gys)
        train_ms = time_ms(lambda: (clear_grads(layers, xs), step()), args.warmup, args.repeats)
        clear_grads(layers, xs)
        train_peak = peak_mb(step)
        tokens = [torch.randn(1, in_, device=device, dtype=torch.bfloat16) for _, in_, _ in LLAMA7B_PROJECTIONS]
        decode_ms = time_ms(decode_step(layers, tokens), args.warmup, args.repeats * 5)
        weights_mb = torch.cuda.memory_allocated() / 2 ** 20
        rows.append({"variant": label, "train_ms": train_ms, "train_step_peak_mib": train_peak,
                     "decode_ms": decode_ms, "allocated_mib_with_inputs": weights_mb})
        del layers, xs, gys, step, tokens
        torch.cuda.empty_cache()

    floor_train, floor_decode = rows[0]["train_ms"], rows[0]["decode_ms"]
    for row in rows:
        row["train_ratio_to_floor"] = row["train_ms"] / floor_train
        row["decode_ratio_to_bf16"] = row["decode_ms"] / floor_decode
    print(f"# one LLaMA-7B layer's 7 projections, bf16, {args.tokens} tokens fwd+bwd; batch-1 decode")
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    print("| variant | train ms | / floor | step peak MiB | decode ms | / bf16 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['train_ms']:.3f} | {row['train_ratio_to_floor']:.2f} | "
              f"{row['train_step_peak_mib']:.0f} | {row['decode_ms']:.4f} | {row['decode_ratio_to_bf16']:.2f} |")
    if args.json:
        import triton

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "tokens": args.tokens, "rank": args.rank,
            "warmup": args.warmup, "repeats": args.repeats, "kernel_checks": checks, "rows": rows,
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
