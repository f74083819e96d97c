"""Scale benchmark (issue 7): merge time as a ratio to ``cp`` of the same bytes, and peak RSS.

Generates a LLaMA-7B-shaped 4-bit group-128 GPTQ checkpoint with random codes, scales and zeros
(v1 "gptq" format with g_idx, sharded like real checkpoints, written with the project's own
``CheckpointWriter``), a small byte-level BPE tokenizer and a random QA-LoRA adapter (PEFT pooling,
recording the base fingerprint as trained adapters do), for each layer count asked; then, one
format at a time, runs ``qalora-export merge BASE ADAPTER --to FMT`` in a subprocess and reads its
wall time and peak RSS (``os.wait4`` rusage of that child). ``cp -r`` of the base directory is
timed in the same run, right before, as the reference.

Caches cannot be dropped here (no root): every input is read once (``cat > /dev/null``) before
the timings, so cp and the merges both read from the page cache and write into it (no fsync in
either). Each command is timed twice: until it exits, and until a ``sync`` after it returns (its
output on disk), since a 4 GB ``cp`` may finish inside the page cache's dirty limits or be
throttled by writeback depending on what else the machine writes. The 1-minute load average is
recorded with each row (the machine is shared). Outputs are deleted after each run.

    python benchmarks/bench_scale.py --layers 8 32 --formats gptq onnx gguf --workdir /tmp/qalora-scale
    python benchmarks/bench_scale.py --dry-run --shape llama2-70b   # plan only, nothing written

Prints one JSON line per measurement and a markdown table; generated data is deleted at the end
unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]  # the tests' tiny BPE tokenizer builder (gguf_helpers)

from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter
from qalora_export.checkpoint.adapter_files import save_adapter  # noqa: E402
from qalora_export.checkpoint.gptq_writer import CheckpointWriter, write_configs
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import GPTQConfig  # noqa: E402
from qalora_export.core.packing import pack_codes  # noqa: E402
from qalora_export.checkpoint.shapes import checkpoint_tensors, linear_shapes  # noqa: E402
from qalora_export.plan import SHAPES, plan_merge  # noqa: E402

BITS, GROUP_SIZE = 4, 128
INPUT_SHARD_BYTES = 1 << 30  # real 7B GPTQ checkpoints ship as one file or ~1-4 GB shards


def random_tensor(spec, rng: np.random.Generator) -> torch.Tensor:
    """Random data of the right kind for one checkpoint tensor."""
    name, shape = spec.name, spec.shape
    if name.endswith(".qweight"):
        n = int(np.prod(shape))
        return torch.from_numpy(np.frombuffer(rng.bytes(4 * n), dtype=np.int32).reshape(shape).copy())
    if name.endswith(".qzeros"):
        groups, words = shape
        out = words * 32 // BITS
        stored = torch.from_numpy(rng.integers(6, 9, size=(groups, out)))  # v1 stores zero - 1: true 7..9
        return pack_codes(stored, BITS, dim=1)
    if name.endswith(".scales"):
        return torch.from_numpy(rng.uniform(0.002, 0.02, size=shape).astype(np.float16))
    if name.endswith(".g_idx"):
        return (torch.arange(shape[0]) // GROUP_SIZE).to(torch.int32)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.float16)
    return torch.from_numpy((rng.standard_normal(size=shape, dtype=np.float32) * 0.02).astype(np.float16))


def generate(workdir: Path, shape: str, layers: int, rank: int) -> tuple[Path, Path]:
    """The random base and adapter for ``layers`` layers of ``shape`` under ``workdir``."""
    from gguf_helpers import make_tiny_bpe_tokenizer

    config = dict(SHAPES[shape], num_hidden_layers=layers)
    base, adapter_dir = workdir / f"base-{layers}", workdir / f"adapter-{layers}"
    if base.exists() and adapter_dir.exists():
        return base, adapter_dir
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    rng = np.random.default_rng(layers)
    writer = CheckpointWriter(base, INPUT_SHARD_BYTES)
    for spec in checkpoint_tensors(config, BITS, GROUP_SIZE):
        writer.add_tensor(spec.name, random_tensor(spec, rng))
    writer.finish()
    write_configs(base, config, GPTQConfig(BITS, GROUP_SIZE, desc_act=False, sym=False, checkpoint_format="gptq"))
    make_tiny_bpe_tokenizer(base)

    gen = torch.Generator().manual_seed(layers)
    adapter_layers = {}
    for name, out_f, in_f in linear_shapes(config):
        groups = in_f // GROUP_SIZE
        # s * k * (B @ A) ~ 2 * k * 4 * 0.02^2 with PEFT's k = groups / GROUP_SIZE (<= 0.67 at 7B): a
        # fraction of a code unit at these scales. Wider inputs (70B's down_proj: k = 1.75) get
        # smaller factors, so that the folded zeros stay inside the 4-bit range there too.
        magnitude = 0.02 / max(1.0, groups / GROUP_SIZE)
        adapter_layers[name] = AdapterLayer(lora_A=torch.randn(rank, groups, generator=gen) * magnitude,
                                            lora_B=torch.randn(out_f, rank, generator=gen) * magnitude)
    fingerprint = GPTQCheckpoint(base).fingerprint()
    save_adapter(QALoRAAdapter(layers=adapter_layers, rank=rank, alpha=2.0 * rank, pooling="peft",
                               pool_group_size=GROUP_SIZE, pool_groups="quantization",
                               base_fingerprint=fingerprint), adapter_dir, base_model_path=str(base))
    return base, adapter_dir


# Linux counts a forked child's copy of its parent's pages in the child's ru_maxrss, and this
# process is large (torch, generated data): so each command runs under a small launcher (no
# imports) that forks it and reports the wait4 rusage of that child alone.
LAUNCHER = r"""
import json, os, subprocess, sys, time
t0 = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
seconds = time.perf_counter() - t0
os.sync()  # then until its output is on disk: writeback the command left behind
print(json.dumps({"seconds": seconds, "synced_seconds": time.perf_counter() - t0, "rc": os.waitstatus_to_exitcode(status),
                  "peak_rss_bytes": usage.ru_maxrss * 1024, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}))
"""


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS of one command (its own rusage, via the launcher's wait4)."""
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode or result["rc"]:
        raise RuntimeError(f"{' '.join(cmd)} exited {result['rc']}:\n{done.stderr[-4000:]}")
    return result


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)


def run(args) -> list[dict]:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CI="1")  # no progress bar
    rows = []
    for layers in args.layers:
        t0 = time.perf_counter()
        base, adapter = generate(workdir, args.shape, layers, args.rank)
        print(f"# generated {layers} layers in {time.perf_counter() - t0:.0f}s: {dir_bytes(base) / 1e9:.2f} GB",
              file=sys.stderr, flush=True)
        warm(base)
        warm(adapter)
        for fmt in args.formats:
            cp_out = workdir / "cp-out"
            shutil.rmtree(cp_out, ignore_errors=True)
            os.sync()  # both timings start with no dirty pages to write back
            load = os.getloadavg()[0]  # the machine is shared: how busy it was
            cp = measure(["cp", "-r", str(base), str(cp_out)])
            shutil.rmtree(cp_out)
            out = workdir / (f"out-{fmt}.gguf" if fmt == "gguf" else f"out-{fmt}")
            cmd = [sys.executable, "-m", "qalora_export.cli", "merge", str(base), str(adapter), "--to", fmt,
                   "-o", str(out), "--overwrite"]
            if fmt == "onnx":
                cmd += ["--zero-points", "split"]  # exact and onnxruntime's fast path (see docs/onnx.md)
            os.sync()
            res = measure(cmd, env)
            size = dir_bytes(out)
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
            plan = plan_merge(dict(SHAPES[args.shape], num_hidden_layers=layers), fmt, BITS, GROUP_SIZE, args.rank)
            row = {"format": fmt, "shape": args.shape, "layers": layers, "input_bytes": dir_bytes(base),
                   "output_bytes": size, "cp_seconds": cp["seconds"], "seconds": res["seconds"],
                   "ratio_to_cp": res["seconds"] / cp["seconds"], "cp_synced_seconds": cp["synced_seconds"],
                   "synced_seconds": res["synced_seconds"],
                   "synced_ratio_to_cp": res["synced_seconds"] / cp["synced_seconds"],
                   "peak_rss_bytes": res["peak_rss_bytes"], "cp_peak_rss_bytes": cp["peak_rss_bytes"],
                   "user_s": res["user_s"], "sys_s": res["sys_s"], "planned_peak_bytes": plan.estimated_peak_bytes,
                   "load_average_1min": load}
            print(json.dumps(row), flush=True)
            rows.append(row)
        if not args.keep:
            shutil.rmtree(base)
            shutil.rmtree(adapter)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| format | layers | input GB | output GB | cp s | merge s | ratio to cp | cp+sync s | merge+sync s | "
             "ratio synced | user+sys s | peak RSS GB | planned GB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['layers']} | {r['input_bytes'] / 1e9:.2f} | {r['output_bytes'] / 1e9:.2f} | "
                     f"{r['cp_seconds']:.1f} | {r['seconds']:.1f} | {r['ratio_to_cp']:.2f} | "
                     f"{r['cp_synced_seconds']:.1f} | {r['synced_seconds']:.1f} | {r['synced_ratio_to_cp']:.2f} | "
                     f"{r['user_s'] + r['sys_s']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
                     f"{r['planned_peak_bytes'] / 2**30:.2f} | {r['load_average_1min']:.1f} |")
    return "\n".join(lines)


def dry_run(args) -> None:
    config = SHAPES[args.shape]
    print(f"# dry run: {args.shape}, {BITS}-bit group {GROUP_SIZE}, adapter rank {args.rank}; nothing is written")
    lines = ["| format | layers | input GB | output GB | adapter GB | largest linear | shards | estimated peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for fmt in args.formats:
        p = plan_merge(config, fmt, BITS, GROUP_SIZE, args.rank, args.max_shard_bytes)
        print(json.dumps(p.to_json()))
        shards = f"{len(p.shards)} x <= {max(p.shards) / 1e9:.2f} GB" if p.shards else "one file"
        lines.append(f"| {fmt} | {p.layers} | {p.input_bytes / 1e9:.2f} | {p.output_bytes / 1e9:.2f} | "
                     f"{p.adapter_bytes / 1e9:.3f} | {p.largest_linear} | {shards} | {p.estimated_peak_bytes / 2**30:.2f} |")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-7b")
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--formats", nargs="+", choices=("gptq", "onnx", "gguf"), default=["gptq", "onnx", "gguf"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/qalora-scale")
    parser.add_argument("--max-shard-bytes", type=int, default=2 * 1024**3)
    parser.add_argument("--keep", action="store_true", help="keep the generated data (delete it yourself)")
    parser.add_argument("--dry-run", action="store_true", help="plan only: sizes, shards, memory; write nothing")
    args = parser.parse_args()
    if args.dry_run:
        dry_run(args)
        return
    rows = run(args)
    print(table(rows))


if __name__ == "__main__":
    main()
