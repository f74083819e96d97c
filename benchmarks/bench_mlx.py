"""MLX artifact size and mlx-lm decode speed against an fp16 MLX model of the same weights.

    python benchmarks/bench_mlx.py [--base GPTQ_DIR] [--adapter ADAPTER_DIR] [--work DIR]
                                   [--prompt-tokens 64] [--decode-tokens 64] [--repeats 3]

Ours: ``qalora-export mlx BASE ADAPTER`` (default: the SmolLM2 fixture quantized by RTN to 4-bit, group
32, with a random rank-16 adapter folded in), with float32 scales/biases (exact) and with
``--mlx-dtype float16`` (rounded biases). The reference: the same effective weights (MLX's own
``mx.dequantize`` of our fp32 artifact) stored as an unquantized float16 MLX model, the file mlx-lm
would run without quantization. Every model runs in mlx-lm (``stream_generate``, greedy) in its own
child process; figures are medians of ``--repeats`` interleaved rounds, with the 1-minute load average
printed before and after. Ratios are against the fp16 model measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import mlx.core as mx
mx.set_default_device(mx.cpu)
from mlx_lm import load
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler
path, prompt_tokens, decode_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, tokenizer = load(path)
prompt = [int(t) % 1000 + 100 for t in range(prompt_tokens)]
last = None
for last in stream_generate(model, tokenizer, prompt, max_tokens=decode_tokens, sampler=make_sampler(temp=0.0)):
    pass
print(json.dumps({"prompt_tps": last.prompt_tps, "generation_tps": last.generation_tps,
                  "generated": last.generation_tokens}))
"""


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def _fp16_twin(artifact: Path, out: Path) -> None:
    """An unquantized float16 MLX model holding ``mx.dequantize`` of every quantized linear of ``artifact``."""
    import mlx.core as mx

    config = json.loads((artifact / "config.json").read_text())
    quant = config.pop("quantization")
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float16"
    out.mkdir(parents=True)
    weights: dict = {}
    for shard in sorted(artifact.glob("*.safetensors")):
        weights.update(mx.load(str(shard)))
    twin = {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix and f"{prefix}.scales" in weights:
            value = mx.dequantize(value, weights[f"{prefix}.scales"], weights[f"{prefix}.biases"],
                                  group_size=quant["group_size"], bits=quant["bits"])
        twin[name] = value.astype(mx.float16)
    mx.save_safetensors(str(out / "model.safetensors"), twin, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in artifact.iterdir():
        if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(extra, out / extra.name)


def _measure(path: Path, prompt_tokens: int, decode_tokens: int) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(prompt_tokens), str(decode_tokens)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"mlx-lm on {path} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="GPTQ base (default: the SmolLM2 fixture, RTN 4-bit g32)")
    parser.add_argument("--adapter", type=Path, help="QA-LoRA adapter (default: a random rank-16 one)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats import get_format

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-mlx-"))
    work.mkdir(parents=True, exist_ok=True)
    base = args.base
    if base is None:
        from qalora_export.fixtures.smollm2 import smollm2_float_dir
        from qalora_export.quantization.quantize import quantize_model

        base = work / f"base-w{args.bits}g{args.group_size}"
        if not base.exists():
            quantize_model(smollm2_float_dir(), base, bits=args.bits, group_size=args.group_size)
    adapter = args.adapter
    if adapter is None:
        import tiny_models

        adapter = work / "adapter"
        if not adapter.exists():
            tiny_models.make_random_adapter(base, adapter, rank=16, alpha=32.0, magnitude=0.05)

    mlx = get_format("mlx")
    model = MergedView.open(base, adapter)
    models = {"ours fp32 scales (exact)": work / "ours-fp32", "ours fp16 scales (rounded)": work / "ours-fp16"}
    mlx.export(model, models["ours fp32 scales (exact)"], dtype="float32", overwrite=True)
    mlx.export(model, models["ours fp16 scales (rounded)"], dtype="float16", overwrite=True)
    twin = work / "fp16-twin"
    if twin.exists():
        shutil.rmtree(twin)
    _fp16_twin(models["ours fp32 scales (exact)"], twin)
    models["fp16 (same weights)"] = twin

    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, path in models.items():
            runs[name].append(_measure(path, args.prompt_tokens, args.decode_tokens))
    load_after = os.getloadavg()[0]

    ref = runs["fp16 (same weights)"]
    ref_size = _dir_bytes(twin)
    ref_decode = statistics.median(r["generation_tps"] for r in ref)
    ref_prompt = statistics.median(r["prompt_tps"] for r in ref)
    print(f"# MLX, {base.name} + {adapter.name}; prompt {args.prompt_tokens} tokens, decode {args.decode_tokens}, "
          f"medians of {args.repeats}; load average {load_before:.2f} -> {load_after:.2f}")
    print("| model | tensor bytes | size vs fp16 | prompt tok/s | decode tok/s | decode vs fp16 |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for name, path in models.items():
        size = _dir_bytes(path)
        decode = statistics.median(r["generation_tps"] for r in runs[name])
        prompt = statistics.median(r["prompt_tps"] for r in runs[name])
        rows[name] = {"bytes": size, "prompt_tps": prompt, "decode_tps": decode,
                      "size_ratio": size / ref_size, "decode_ratio": decode / ref_decode,
                      "prompt_ratio": prompt / ref_prompt}
        print(f"| {name} | {size:,} | {size / ref_size:.2f}x | {prompt:.1f} | {decode:.1f} | {decode / ref_decode:.2f}x |")
    (work / "bench_mlx.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
