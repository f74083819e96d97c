"""llama.cpp speed and file size of our Q4_1 GGUF against F16 and F32 GGUFs of the same weights.

    python benchmarks/bench_gguf.py [--base GPTQ_DIR] [--adapter ADAPTER_DIR] [--prompt-tokens 128]
                                    [--decode-tokens 64] [--repeats 3] [--threads 2]

Without ``--base`` it quantizes the SmolLM2-135M-Instruct fixture (RTN, 4-bit, group 32) into a
temporary directory. The three files hold the same effective weights (``W_hat + dW``): the Q4_1
artifact as exported (f16 token embedding, the default, and ``--embeddings q8_0``), and
``weights_dtype="f16"`` / ``"f32"`` references. Prompt speed is one
``eval`` of ``--prompt-tokens`` ids; decode speed is ``--decode-tokens`` single-token ``eval`` calls
after it. Each figure is the median of ``--repeats`` runs, the three formats interleaved, and every
ratio is taken against F16 measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def measure(path: Path, prompt: list[int], n_decode: int, threads: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) of one llama.cpp run."""
    from qalora_export.formats.gguf.runtime import open_model

    with open_model(path, n_ctx=len(prompt) + n_decode + 8, n_threads=threads, logits_all=False,
                    n_batch=max(len(prompt), 8)) as llm:
        llm.eval(prompt[:4])  # warm-up (graph allocation), then a fresh context
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for k in range(n_decode):
            llm.eval([prompt[k % len(prompt)]])
        t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_decode / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 8))
    args = ap.parse_args()

    from qalora_export.formats.gguf import FORMAT as gguf
    from qalora_export.checkpoint.merged_view import MergedView

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        tmp = Path(tmp)
        base = args.base
        if base is None:
            from qalora_export.fixtures.smollm2 import smollm2_gguf_path
            from qalora_export.quantization.quantize import quantize_model
            base = tmp / "smollm2-w4g32"
            quantize_model(smollm2_gguf_path(), base, bits=4, group_size=32, checkpoint_format="gptq_v2")
        model = MergedView.open(base, args.adapter)
        # name -> (weights_dtype, embeddings); "q4_1" is the default export (f16 embeddings)
        variants = {"q4_1": ("q4_1", "f16"), "q4_1+q8_0emb": ("q4_1", "q8_0"), "f16": ("f16", "f16"),
                    "f32": ("f32", "f32")}
        files = {k: tmp / f"model.{k}.gguf" for k in variants}
        export_s = {}
        for kind, path in files.items():
            t0 = time.perf_counter()
            gguf.export(model, path, weights_dtype=variants[kind][0], embeddings=variants[kind][1])
            export_s[kind] = time.perf_counter() - t0
        vocab = int(model.model_config["vocab_size"])
        prompt = [(17 + 7919 * i) % vocab for i in range(args.prompt_tokens)]
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in files}
        for _ in range(args.repeats):
            for kind, path in files.items():
                runs[kind].append(measure(path, prompt, args.decode_tokens, args.threads))
        result = {"base": str(base), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                  "decode_tokens": args.decode_tokens, "repeats": args.repeats, "formats": {}}
        for kind, path in files.items():
            result["formats"][kind] = {
                "bytes": path.stat().st_size,
                "prompt_tok_s": statistics.median(r[0] for r in runs[kind]),
                "decode_tok_s": statistics.median(r[1] for r in runs[kind]),
                "export_s": export_s[kind],
            }
        ref = result["formats"]["f16"]
        for kind, row in result["formats"].items():
            row["size_vs_f16"] = row["bytes"] / ref["bytes"]
            row["prompt_speed_vs_f16"] = row["prompt_tok_s"] / ref["prompt_tok_s"]
            row["decode_speed_vs_f16"] = row["decode_tok_s"] / ref["decode_tok_s"]

    print(f"{'format':13} {'MB':>8} {'size/F16':>9} {'prompt tok/s':>13} {'x F16':>6} {'decode tok/s':>13} {'x F16':>6}")
    for kind, row in result["formats"].items():
        print(f"{kind:13} {row['bytes'] / 1e6:8.1f} {row['size_vs_f16']:9.3f} {row['prompt_tok_s']:13.1f} "
              f"{row['prompt_speed_vs_f16']:6.2f} {row['decode_tok_s']:13.1f} {row['decode_speed_vs_f16']:6.2f}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
