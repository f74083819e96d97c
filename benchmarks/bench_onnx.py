"""Benchmark: MatMulNBits int-N ONNX exports vs an fp32 ONNX export of the same merged weights.

For one merged model (a GPTQ base, optionally with a QA-LoRA adapter folded in) it writes

- ``fp32``: every projection a float MatMul on the effective weight (``export_float_reference``),
- ``float-zp acc0`` / ``float-zp acc4``: MatMulNBits with float zero-points, accuracy level 0 / 4,
- ``uint8-zp acc0`` / ``uint8-zp acc4``: MatMulNBits with packed uint8 zero-points (rounded),
- ``split acc0`` / ``split acc4``: packed uint8 integer zero-points plus the per-group residual
  (exact),

then measures, in one run on this machine's CPU with onnxruntime: file size (model.onnx +
model.onnx.data) and batch-1 decode speed (tokens/s of single-token steps with the KV cache after
a prompt, best of ``--repeats``), and prints each as a ratio against the fp32 export.

Without ``--adapter`` a random QA-LoRA adapter (rank 16, pooled over the quantization groups) is
folded in, so that the zero-points are fractional as after real training; the uint8 variants
are then written with ``allow_rounding`` (their speed does not depend on the values; the
``exact`` column says which variants hold the fold exactly).

Usage::

    python benchmarks/bench_onnx.py --base BASE_DIR [--adapter ADAPTER_DIR] [--work DIR]
    python benchmarks/bench_onnx.py --fixture-bits 4 --group-size 32   # SmolLM2 fixture, quantized here
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def decode_tokens_per_second(model_dir: Path, prompt: list[int], steps: int, repeats: int, threads: int) -> float:
    from qalora_export.formats.onnx.runtime import OrtDecoder

    decoder = OrtDecoder(model_dir, providers=["CPUExecutionProvider"], threads=threads)
    best = 0.0
    for _ in range(repeats + 1):  # the first round warms up (prepacking, allocations)
        out, cache = decoder.step(prompt, decoder.empty_cache())
        token = int(np.argmax(out[-1]))
        start = time.perf_counter()
        for _ in range(steps):
            out, cache = decoder.step([token], cache)
            token = int(np.argmax(out[-1]))
        best = max(best, steps / (time.perf_counter() - start))
    decoder.close()
    return best


def onnx_bytes(model_dir: Path) -> int:
    return sum((model_dir / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))


def random_adapter(base: Path, out: Path, rank: int = 16, seed: int = 0) -> Path:
    """A random QA-LoRA adapter on every quantized layer of ``base`` (fractional folded zeros)."""
    import torch

    from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter
    from qalora_export.checkpoint.adapter_files import save_adapter
    from qalora_export.checkpoint.gptq import GPTQCheckpoint

    if out.exists():
        return out
    ckpt = GPTQCheckpoint(base)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name in ckpt.quantized_modules:
        rec = ckpt.read_layer(name)
        layers[name] = AdapterLayer(lora_A=torch.randn(rank, rec.num_groups, generator=gen) * 0.02,
                                    lora_B=torch.randn(rec.out_features, rank, generator=gen) * 0.02)
    save_adapter(QALoRAAdapter(layers=layers, rank=rank, alpha=2.0 * rank, pooling="peft",
                               pool_group_size=ckpt.config.group_size, pool_groups="quantization",
                               base_fingerprint=ckpt.fingerprint()), out, base_model_path=str(base))
    return out


def fixture_base(work: Path, bits: int, group_size: int) -> Path:
    from qalora_export.fixtures.smollm2 import smollm2_gguf_path
    from qalora_export.quantization.quantize import quantize_model

    base = work / f"smollm2-gptq-b{bits}-g{group_size}"
    if not base.exists():
        quantize_model(smollm2_gguf_path(), base, bits, group_size, "gptq_v2")
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="GPTQ base directory (default: quantize the SmolLM2 fixture)")
    parser.add_argument("--adapter", type=Path, help="QA-LoRA adapter directory to fold in")
    parser.add_argument("--fixture-bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--work", type=Path, help="where exports are written (default: a temp dir, removed)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from qalora_export.formats.onnx import write as onnx_write
    from qalora_export.checkpoint.merged_view import MergedView

    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-")) if own_work else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = args.base or fixture_base(work, args.fixture_bits, args.group_size)
        adapter = args.adapter or random_adapter(base, work / "random-adapter")
        model = MergedView.open(base, adapter)
        prompt = [1] + list(range(100, 115))
        variants = {
            "fp32": lambda out: onnx_write.export_float_reference(model, out, overwrite=True),
            "float-zp acc0": lambda out: onnx_write.export(model, out, overwrite=True),
            "float-zp acc4": lambda out: onnx_write.export(model, out, accuracy_level=4, overwrite=True),
            "uint8-zp acc0": lambda out: onnx_write.export(model, out, zero_points="uint8", overwrite=True,
                                                          allow_rounding=True),
            "uint8-zp acc4": lambda out: onnx_write.export(model, out, zero_points="uint8", accuracy_level=4,
                                                          overwrite=True, allow_rounding=True),
            "split acc0": lambda out: onnx_write.export(model, out, zero_points="split", overwrite=True),
            "split acc4": lambda out: onnx_write.export(model, out, zero_points="split", accuracy_level=4,
                                                       overwrite=True),
        }
        rows = {}
        for name, make in variants.items():
            out = work / name.replace(" ", "_")
            summary = make(out)
            rows[name] = {"bytes": onnx_bytes(out),
                          "tokens_per_s": decode_tokens_per_second(out, prompt, args.steps, args.repeats, args.threads),
                          "exact": summary.get("exact", True)}
        ref = rows["fp32"]
        print(f"model: {base}  bits={model.bits} group_size={model.group_size} adapter={adapter}")
        print(f"cpu: {platform.processor() or platform.machine()}  threads={args.threads or 'default'}  "
              f"steps={args.steps} best of {args.repeats}")
        print(f"{'variant':<15} {'MB':>8} {'size/fp32':>10} {'tok/s':>8} {'speed/fp32':>11} exact")
        for name, row in rows.items():
            row["size_ratio"] = row["bytes"] / ref["bytes"]
            row["speed_ratio"] = row["tokens_per_s"] / ref["tokens_per_s"]
            print(f"{name:<15} {row['bytes'] / 1e6:8.1f} {row['size_ratio']:10.3f} {row['tokens_per_s']:8.1f} "
                  f"{row['speed_ratio']:11.2f} {row['exact']}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
