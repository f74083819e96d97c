"""The MLX export's exactness table: every bit width and group size, verified in mlx-lm.

    python benchmarks/mlx_exactness.py [--work DIR] [--fixture]

For each (bits, group size) in 2/3/4/8 x 32/64: a base (a tiny random LLaMA, or with ``--fixture``
the SmolLM2 fixture quantized by RTN) with a random QA-LoRA adapter folded in, exported as MLX with
float32 scales/biases (and 4-bit g32 also with float16), then ``verify_artifact``: the weight level
(our reader vs the unmerged effective weights) and the runtime level (mlx-lm vs the unmerged PyTorch
model). Printed as a markdown table; no timing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

CASES = [(2, 32), (2, 64), (3, 32), (3, 64), (4, 32), (4, 64), (8, 32), (8, 64)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--fixture", action="store_true", help="the SmolLM2 fixture instead of a tiny random model")
    parser.add_argument("--cases", default=",".join(f"{b}/{g}" for b, g in CASES),
                        help="comma-separated bits/group pairs")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models

    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats import get_format
    from qalora_export.verify import verify_artifact

    work = args.work or Path(tempfile.mkdtemp(prefix="mlx-exactness-"))
    work.mkdir(parents=True, exist_ok=True)
    mlx = get_format("mlx")
    cases = [tuple(int(x) for x in c.split("/")) for c in args.cases.split(",")]
    print(f"# MLX exactness ({'SmolLM2 fixture' if args.fixture else 'tiny random LLaMA'}), mlx-lm on the CPU")
    print("| bits | group | scales | exact | weights max rel err | max abs dlogit (rel) | mean KL | top-1 | greedy | passed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bits, gs in cases:
        name = f"w{bits}g{gs}"
        base = work / name
        if not base.exists():
            if args.fixture:
                from qalora_export.fixtures.smollm2 import smollm2_float_dir
                from qalora_export.quantization.quantize import quantize_model

                quantize_model(smollm2_float_dir(), base, bits=bits, group_size=gs)
            else:
                tiny_models.make_tiny_base(base, bits=bits, group_size=gs)
        adapter = work / f"{name}-adapter"
        if not adapter.exists():
            tiny_models.make_random_adapter(base, adapter, rank=8, magnitude=0.05 if args.fixture else 0.3, seed=bits)
        for dtype in ("float32", "float16") if (bits, gs) == (4, 32) else ("float32",):
            out = work / f"{name}-{dtype}.mlx"
            summary = mlx.export(MergedView.open(base, adapter), out, dtype=dtype, overwrite=True)
            report = verify_artifact(out, base, adapter)
            run = report["runtime"]["artifact"]
            greedy = f"{run.get('greedy_exact_match', '?')}/{len(report['runtime'].get('reference_greedy', []))}"
            print(f"| {bits} | {gs} | {dtype} | {summary['exact']} | {report['weights']['max_rel_vs_unmerged']:.2e} "
                  f"| {run['max_abs_logit_diff']:.2e} ({run.get('max_abs_logit_diff_rel', float('nan')):.1e}) "
                  f"| {run['mean_kl']:.1e} | {run['top1_agreement']:.3f} | {greedy} | {report['passed']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
