"""llama.cpp speed and size of our exact Q4_1 GGUF against the files llama.cpp's own tools make.

    python benchmarks/bench_gguf.py --convert LLAMA_CPP/convert_hf_to_gguf.py [--model smollm2|llama7b-stack]
                                    [--base GPTQ_DIR --float FLOAT_DIR] [--adapter ADAPTER_DIR]
                                    [--prompt-tokens 128] [--decode-tokens 64] [--repeats 3] [--threads 2]

Ours, from the GPTQ base with a QA-LoRA adapter folded in (a random rank-16 adapter unless
``--adapter``): ``ours q4_1`` (the export's default, f16 token embedding; exact up to fp16 rounding
of each block's m), the fast opt-ins ``ours q4_1 q8_0 emb`` (``--embeddings q8_0``) and ``ours q4_1
q6_k emb`` (``--embeddings q6_k``: the embedding and output head as Q6_K, as llama.cpp stores the head
of its Q4_1 files; hidden sizes that are a multiple of 256), and ``ours f16`` (the same merged weights
in f16, the reference of the "/ ours f16" column). ``--variants`` picks a subset. llama.cpp's, from the float model (the fixture's float directory, or the random
float model the GPTQ base was quantized from): ``convert_hf_to_gguf.py --outtype f16`` (the
converter of the llama-cpp-python sdist, ``vendor/llama.cpp/convert_hf_to_gguf.py`` with
``gguf-py`` beside it, run in a child process) and ``llama_model_quantize`` (llama-cpp-python's
binding, in a child process) of that file to Q4_1, Q4_0 and Q4_K_M with llama.cpp's default
choices (it keeps some tensors, e.g. the output / tied embedding, at higher precision), and
``llama.cpp q4_1 f16 head``: its Q4_1 with the output head and token embedding kept F16
(``--output-tensor-type f16 --token-embedding-type f16``), the peer at our default's head. Theirs
quantize the float model, not the merged weights: compare speed and size, not values.

Each measurement runs llama.cpp in a child process (a crash names the file): prompt speed is one
``eval`` of ``--prompt-tokens`` ids, decode speed ``--decode-tokens`` single-token ``eval`` calls
after it (``OMP_WAIT_POLICY=PASSIVE`` unless set: spinning OpenMP threads collapse on shared cores,
docs/gguf.md). Figures are medians of ``--repeats`` rounds with every file measured once a round
(interleaved); the 1-minute load average before and after is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FTYPES = {"llama.cpp q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "llama.cpp q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "llama.cpp q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "llama.cpp q4_1 f16 head": "LLAMA_FTYPE_MOSTLY_Q4_1"}
# llama.cpp's Q4_1 with the output head and token embedding kept F16 (``llama-quantize
# --output-tensor-type f16 --token-embedding-type f16``): the peer at our default's head precision
F16_HEAD = {"llama.cpp q4_1 f16 head"}


def measure(path: Path, prompt: list[int], n_decode: int, threads: int) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) of one llama.cpp run, in this process (the child's side)."""
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


def measure_in_child(path: Path, prompt: list[int], n_decode: int, threads: int) -> tuple[float, float]:
    """:func:`measure` in a fresh interpreter (llama.cpp never runs in the benchmark's process)."""
    out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--prompt-ids", json.dumps(prompt),
                          "--decode-tokens", str(n_decode), "--threads", str(threads)],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp run on {path} failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def convert_float(convert: Path, float_dir: Path, out: Path) -> None:
    """llama.cpp's ``convert_hf_to_gguf.py --outtype f16`` with its own ``gguf-py`` (child process)."""
    if out.is_file():
        return
    paths = [str(convert.parent / "gguf-py"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run([sys.executable, str(convert), str(float_dir), "--outfile", str(out), "--outtype", "f16"],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed: {proc.stderr[-3000:]}")


def quantize_in_child(src: Path, dst: Path, ftype: str, f16_head: bool = False) -> None:
    """``llama_model_quantize(src, dst, ftype)`` through llama-cpp-python, in a child process; with
    ``f16_head`` the output head and token embedding stay F16 (llama.cpp's own override options)."""
    if dst.is_file():
        return
    keep = ("p.output_tensor_type = llama_cpp.GGML_TYPE_F16\n"
            "p.token_embedding_type = llama_cpp.GGML_TYPE_F16\n") if f16_head else ""
    code = ("import ctypes, sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype = llama_cpp.{ftype}\n" + keep +
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not dst.is_file():
        raise RuntimeError(f"llama_model_quantize {ftype} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("smollm2", "llama7b-stack"), default="smollm2")
    ap.add_argument("--base", type=Path)
    ap.add_argument("--float", dest="float_dir", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py (gguf-py beside it)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--work", type=Path, help="where files are written (default: a temp dir, removed)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 2, 8))
    ap.add_argument("--variants", nargs="*", help="only these files (names as printed)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the child's side of measure_in_child
    ap.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, json.loads(args.prompt_ids), args.decode_tokens, args.threads)))
        return 0

    sys.path.insert(0, str(HERE))
    import bench_onnx  # the shared model builders (fixture base, random 7B-shaped stack, random adapter)

    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats.gguf import FORMAT as gguf

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.base:
            base, float_dir = args.base, args.float_dir
        elif args.model == "smollm2":
            base, float_dir = bench_onnx.fixture_base(work, 4, 32)
        else:
            from qalora_export.fixtures.smollm2 import smollm2_float_dir

            # llama.cpp's converter needs a tokenizer it recognises: SmolLM2's (vocabulary 49152)
            tokenizer = smollm2_float_dir() if args.convert else None
            base, float_dir = bench_onnx.stack_base(work, args.layers, args.vocab, 4, 32, args.hidden,
                                                    args.intermediate, args.heads, tokenizer_from=tokenizer)
        adapter = args.adapter or bench_onnx.random_adapter(base, work / f"{base.name}-random-adapter")
        model = MergedView.open(base, adapter)
        files, notes, exact = {}, {}, {}
        hidden = int(model.model_config["hidden_size"])
        ours = [("ours q4_1", "q4_1", "f16"), ("ours q4_1 q8_0 emb", "q4_1", "q8_0"),
                ("ours q4_1 q6_k emb", "q4_1", "q6_k"), ("ours f16", "f16", "f16")]
        wanted = set(args.variants or [n for n, _, _ in ours] + ["llama.cpp f16", *FTYPES])
        for name, dtype, embeddings in ours:
            if name not in wanted:
                continue
            if embeddings == "q6_k" and hidden % 256:  # Q6_K rows are 256-value blocks (llama.cpp then uses q8_0)
                notes[name] = f"hidden size {hidden} is not a multiple of 256 (Q6_K's block)"
                continue
            files[name] = work / f"{base.name}-{dtype}-{embeddings}.gguf"
            t0 = time.perf_counter()
            summary = gguf.export(model, files[name], weights_dtype=dtype, embeddings=embeddings, overwrite=True)
            seconds = time.perf_counter() - t0
            exact[name] = (f"fold exact up to fp16 m (max |dm| {summary.get('max_m_rounding', 0.0):.1e})"
                           if dtype == "q4_1" else "merged weights in f16")
            if embeddings in ("q8_0", "q6_k"):
                exact[name] += f"; embedding/head requantized to {embeddings} (not exact)"
            exact[name] += f"; export {seconds:.0f} s"
        if args.convert and float_dir is not None:
            theirs = work / f"{float_dir.name}-llama.cpp-f16.gguf"
            try:
                convert_float(args.convert, float_dir, theirs)
                if "llama.cpp f16" in wanted:
                    files["llama.cpp f16"], exact["llama.cpp f16"] = theirs, "n/a"
                for name, ftype in FTYPES.items():
                    if name not in wanted:
                        continue
                    dst = work / f"{float_dir.name}-{name.replace(' ', '-')}.gguf"
                    quantize_in_child(theirs, dst, ftype, f16_head=name in F16_HEAD)
                    files[name], exact[name] = dst, "n/a (quantizes the float model)"
            except RuntimeError as exc:
                notes["llama.cpp"] = str(exc).splitlines()[-1][:300]
        vocab = int(model.model_config["vocab_size"])
        prompt = [(17 + 7919 * i) % vocab for i in range(args.prompt_tokens)]
        load_before = os.getloadavg()[0]
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in files}
        for _ in range(args.repeats):
            for kind, path in files.items():  # interleaved
                runs[kind].append(measure_in_child(path, prompt, args.decode_tokens, args.threads))
        load_after = os.getloadavg()[0]
        rows = {}
        for kind, path in files.items():
            rows[kind] = {"bytes": path.stat().st_size, "exact": exact[kind],
                          "prompt_tok_s": statistics.median(r[0] for r in runs[kind]),
                          "decode_tok_s": statistics.median(r[1] for r in runs[kind])}
    ref, peer, same_head = rows.get("ours f16"), rows.get("llama.cpp q4_1"), rows.get("llama.cpp q4_1 f16 head")
    print(f"model: {base} adapter={adapter}; llama.cpp in a child process, {args.threads} threads, prompt "
          f"{args.prompt_tokens}, decode {args.decode_tokens}, median of {args.repeats} interleaved rounds; "
          f"load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs")
    print("| file | MB | prompt tok/s | decode tok/s | decode / ours f16 | prompt / llama.cpp q4_1 "
          "| decode / llama.cpp q4_1 | decode / llama.cpp q4_1 f16 head | exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, row in rows.items():
        vs_peer = (f"{row['prompt_tok_s'] / peer['prompt_tok_s']:.2f} | "
                   f"{row['decode_tok_s'] / peer['decode_tok_s']:.2f}" if peer else "- | -")
        vs_ref = f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}" if ref else "-"
        vs_same = f"{row['decode_tok_s'] / same_head['decode_tok_s']:.2f}" if same_head else "-"
        print(f"| {kind} | {row['bytes'] / 1e6:.1f} | {row['prompt_tok_s']:.1f} | {row['decode_tok_s']:.1f} | "
              f"{vs_ref} | {vs_peer} | {vs_same} | {row['exact']} |")
    for name, why in notes.items():
        print(f"{name}: not run ({why})")
    if args.json:
        record = {"rows": rows, "notes": notes, "load": [load_before, load_after]}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
