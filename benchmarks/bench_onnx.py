"""Benchmark: our MatMulNBits exports vs fp32 and vs onnxruntime-genai's own int4 builder, in one run.

For one model it writes

- ``fp32``: every projection a float MatMul on the merged weight (``export_float_reference``),
- ours, from the GPTQ base with a QA-LoRA adapter folded in (a random rank-16 adapter unless
  ``--adapter``, so that the folded zero-points are fractional as after real training):
  ``auto`` (the default), ``split``, ``float`` (exact) and ``uint8`` (rounded: the fold does not fit
  integer zero-points; its speed does not depend on the values), at accuracy level 0 and,
  for ``auto`` and ``uint8``, 4 (int8 activations, as the builder's CPU default),
- ours with the lm head requantized (``--lm-head int4|int8``, the fast opt-in; the folded projections
  stay exact): ``auto acc0 int4 head``, ``auto acc4 int4 head``, ``auto acc4 int8 head``,
- ``builder int4``: what a user would run instead, ``python -m onnxruntime_genai.models.builder -m
  FLOAT_DIR -o OUT -p int4 -e cpu`` on the float model (the fixture's float directory, or the same
  random float model the GPTQ base was quantized from) with the same bits and block size
  (``block_size=<group size>``): once with its defaults (symmetric int4, ``accuracy_level=4``, the lm
  head quantized too), asymmetric (``is_symmetric=false``, zero-points like ours) and with the lm head
  left float as in ours (``nodes_to_exclude=/lm_head/MatMul``); ``builder int4 acc0`` is its default
  model with every MatMulNBits at accuracy level 0 (a view of the same files, as verify runs ours),
  ``builder int4 float head acc0`` the same view of its float-head model: the peer at our default's
  exactness (float head, fp32 activations), the like-for-like ratio; ``builder int4 asym float head``
  (and its ``acc0`` view) also stores zero-points, as any model holding a QA-LoRA fold must.

With ``--accuracy`` each of our variants is also run in onnxruntime on the fixed chat prompts
(``qalora_export.verify.fixed_prompts``) against the unmerged PyTorch model with its float head: mean
KL and top-1 agreement, what each speed choice (accuracy level 4, a requantized head) costs.

and measures every variant with onnxruntime-genai (the runtime both target), interleaved: each
round loads each model once and times the prefill of a ``--prompt``-token prompt (tokens/s of
``append_tokens``) and ``--steps`` decode steps (tokens/s of ``generate_next_token``). Medians over
``--repeats`` rounds are printed with ratios to fp32 and to the builder's default int4, and the
1-minute load average before and after (the machine may be shared).

Models: ``--model smollm2`` (the SmolLM2-135M fixture, quantized here to ``--fixture-bits`` /
``--group-size`` by RTN) or ``--model llama7b-stack``: ``--layers`` LLaMA-7B-shaped layers (hidden
4096, intermediate 11008, 32 heads; ``qalora_export/plan.py``'s llama2-7b) with random weights and a
``--vocab``-token vocabulary, so that the layers' weights, not the lm head, dominate.

Usage::

    python benchmarks/bench_onnx.py --model smollm2 --work DIR
    python benchmarks/bench_onnx.py --model llama7b-stack --layers 2 --work DIR
    python benchmarks/bench_onnx.py --base BASE_DIR --float FLOAT_DIR [--adapter ADAPTER_DIR]

The builder needs the ``onnx-ir`` package (``pip install onnx-ir``); without it its rows are
skipped and say so. ``--builder-pythonpath DIR`` adds a directory to its ``PYTHONPATH``.
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
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests")]  # the tests' tiny BPE tokenizer builder (gguf_helpers), for the random model


def genai_speed(model_dir: Path, prompt: list[int], steps: int) -> tuple[float, float]:
    """``(prefill tokens/s, decode tokens/s)`` of one greedy generation by onnxruntime-genai."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps + 1)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))  # runs the prefill
    prefill = len(prompt) / (time.perf_counter() - start)
    start, count = time.perf_counter(), 0
    while not generator.is_done() and count < steps:
        generator.generate_next_token()
        count += 1
    decode = count / (time.perf_counter() - start)
    del generator, model
    return prefill, decode


def accuracy_costs(model, dirs: dict[str, Path]) -> dict[str, dict]:
    """Per variant: mean KL(PyTorch || onnxruntime) and top-1 agreement over the fixed chat prompts,
    against the unmerged model (``build_model(base, adapter)``, float head), onnxruntime at each
    variant's own accuracy level (not verify's level-0 view): what the variant's speed choices cost."""
    import torch

    from qalora_export.formats.onnx.runtime import full_logits
    from qalora_export.modeling.model import build_model
    from qalora_export.runtimes.compare import compare_logits
    from qalora_export.verify import fixed_prompts

    prompts = fixed_prompts(model.tokenizer_dir)
    ref = build_model(model.base, model.adapter)
    with torch.no_grad():
        ref_logits = [ref(torch.tensor([p])).logits[0].to(torch.float64).numpy() for p in prompts]
    costs = {}
    for name, out in dirs.items():
        c = compare_logits(ref_logits, full_logits(out, prompts)).to_json()
        costs[name] = {"mean_kl": c["mean_kl"], "top1_agreement": c["top1_agreement"]}
    return costs


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def onnx_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.iterdir() if p.suffix in (".onnx", ".data"))


def random_adapter(base: Path, out: Path, rank: int = 16, seed: int = 0, shift_rms: float = 0.0) -> Path:
    """A random QA-LoRA adapter on every quantized layer of ``base`` (fractional folded zeros).

    With ``shift_rms`` each layer's ``lora_B`` is scaled so that the zero-point shifts it folds in
    have that root mean square in code units (a fixed 0.02 init moves 7B-wide layers' zeros by
    tens of units, outside any integer zero-point range; trained adapters move them by less than one).
    """
    import torch

    from qalora_export.checkpoint.adapter_files import save_adapter
    from qalora_export.checkpoint.gptq import GPTQCheckpoint
    from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter

    if out.exists():
        return out
    ckpt = GPTQCheckpoint(base)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name in ckpt.quantized_modules:
        rec = ckpt.read_layer(name)
        lora_a = torch.randn(rank, rec.num_groups, generator=gen) * 0.02
        lora_b = torch.randn(rec.out_features, rank, generator=gen) * 0.02
        if shift_rms:
            # peft pooling: dW[o, g] = (alpha / r) * (L / p) * (B @ A)[o, g], shift = dW / scale
            factor = 2.0 * rec.num_groups / rec.group_size
            shift = factor * (lora_b @ lora_a).T / rec.scales.to(torch.float32)  # [G, out]
            lora_b = lora_b * (shift_rms / float(shift.pow(2).mean().sqrt()))
        layers[name] = AdapterLayer(lora_A=lora_a, lora_B=lora_b)
    save_adapter(QALoRAAdapter(layers=layers, rank=rank, alpha=2.0 * rank, pooling="peft",
                               pool_group_size=ckpt.config.group_size, pool_groups="quantization",
                               base_fingerprint=ckpt.fingerprint()), out, base_model_path=str(base))
    return out


def fixture_base(work: Path, bits: int, group_size: int) -> tuple[Path, Path]:
    """``(GPTQ base, float directory)`` of the SmolLM2 fixture."""
    from qalora_export.fixtures.smollm2 import smollm2_float_dir
    from qalora_export.quantization.quantize import quantize_model

    float_dir = smollm2_float_dir()
    base = work / f"smollm2-gptq-b{bits}-g{group_size}"
    if not base.exists():
        quantize_model(float_dir, base, bits, group_size, "gptq_v2")
    return base, float_dir


def stack_base(work: Path, layers: int, vocab: int, bits: int, group_size: int, hidden: int = 4096,
               intermediate: int = 11008, heads: int = 32, tokenizer_from: Path | None = None) -> tuple[Path, Path]:
    """``(GPTQ base, float directory)`` of a random LLaMA-7B-shaped stack of ``layers`` layers.

    The tokenizer is the tests' tiny byte-level BPE (``vocab`` ids, of which it uses up to 320), or
    ``tokenizer_from``'s files (then ``vocab`` is its size: llama.cpp's converter recognises only
    tokenizers it knows).
    """
    import torch
    from gguf_helpers import make_tiny_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from qalora_export.quantization.quantize import quantize_model

    if tokenizer_from is not None:
        vocab = int(json.loads((tokenizer_from / "config.json").read_text())["vocab_size"])
    tag = "" if tokenizer_from is None else f"-tok-{tokenizer_from.parent.name}"
    float_dir = work / f"llama-stack-h{hidden}-l{layers}-v{vocab}{tag}-float"
    if not (float_dir / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                             max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                             rms_norm_eps=1e-5, tie_word_embeddings=False)
        model = LlamaForCausalLM(config).to(torch.float16)  # fp16, as 7B checkpoints are stored
        model.save_pretrained(str(float_dir))
        if tokenizer_from is None:
            make_tiny_bpe_tokenizer(float_dir, vocab_size=min(vocab, 320))
        else:
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
                if (tokenizer_from / name).is_file():
                    shutil.copyfile(tokenizer_from / name, float_dir / name)
        del model
    base = work / f"llama-stack-h{hidden}-l{layers}-v{vocab}{tag}-gptq-b{bits}-g{group_size}"
    if not base.exists():
        quantize_model(float_dir, base, bits, group_size, "gptq_v2")
    return base, float_dir


def run_builder(float_dir: Path, out: Path, block_size: int, extra: list[str], pythonpath: str) -> str:
    """onnxruntime-genai's builder in a child process; '' or why it did not run."""
    if (out / "genai_config.json").is_file():
        return ""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(float_dir), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(out.parent / "builder-cache"),
           "--extra_options", f"block_size={block_size}", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        return (proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout) else "failed"
    return ""


def _ratio(row: dict, other: dict | None, phase: str) -> str:
    key = f"{phase}_tokens_per_s"
    return f"{row[key] / other[key]:.2f}" if other else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("smollm2", "llama7b-stack"), default="smollm2")
    parser.add_argument("--base", type=Path, help="GPTQ base directory (with --float: instead of --model)")
    parser.add_argument("--float", dest="float_dir", type=Path, help="the float model the builder converts")
    parser.add_argument("--adapter", type=Path, help="QA-LoRA adapter directory to fold in")
    parser.add_argument("--fixture-bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2, help="llama7b-stack: layers")
    parser.add_argument("--vocab", type=int, default=8192, help="llama7b-stack: vocabulary size")
    parser.add_argument("--hidden", type=int, default=4096, help="llama7b-stack: hidden size (smaller: smoke tests)")
    parser.add_argument("--intermediate", type=int, default=11008, help="llama7b-stack: intermediate size")
    parser.add_argument("--heads", type=int, default=32, help="llama7b-stack: attention heads")
    parser.add_argument("--work", type=Path, help="where models are written (default: a temp dir, removed)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--no-builder", action="store_true", help="skip onnxruntime-genai's builder")
    parser.add_argument("--builder-pythonpath", default="", help="added to the builder's PYTHONPATH (onnx-ir)")
    parser.add_argument("--variants", nargs="*", help="only these variants (names as printed)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--accuracy", action="store_true",
                        help="also measure our variants against the unmerged PyTorch model (mean KL, top-1)")
    args = parser.parse_args(argv)

    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats.onnx import write as onnx_write

    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="bench-onnx-")) if own_work else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.base:
            base, float_dir = args.base, args.float_dir
        elif args.model == "smollm2":
            base, float_dir = fixture_base(work, args.fixture_bits, args.group_size)
        else:
            base, float_dir = stack_base(work, args.layers, args.vocab, args.fixture_bits, args.group_size,
                                         args.hidden, args.intermediate, args.heads)
        adapter = args.adapter or random_adapter(base, work / f"{base.name}-random-adapter",
                                                 shift_rms=0.0 if args.model == "smollm2" else 0.3)
        model = MergedView.open(base, adapter)
        ours = {
            "fp32": lambda out: onnx_write.export_float_reference(model, out, overwrite=True),
            "auto acc0": lambda out: onnx_write.export(model, out, overwrite=True),
            "split acc0": lambda out: onnx_write.export(model, out, zero_points="split", overwrite=True),
            "float acc0": lambda out: onnx_write.export(model, out, zero_points="float", overwrite=True),
            "uint8 acc0": lambda out: onnx_write.export(model, out, zero_points="uint8", overwrite=True,
                                                        allow_rounding=True),
            "auto acc4": lambda out: onnx_write.export(model, out, accuracy_level=4, overwrite=True),
            "uint8 acc4": lambda out: onnx_write.export(model, out, zero_points="uint8", accuracy_level=4,
                                                        overwrite=True, allow_rounding=True),
            # the fast opt-in: the lm head requantized (--lm-head), the folded projections still exact
            "auto acc0 int4 head": lambda out: onnx_write.export(model, out, lm_head="int4", overwrite=True),
            "auto acc4 int4 head": lambda out: onnx_write.export(model, out, accuracy_level=4, lm_head="int4",
                                                                 overwrite=True),
            "auto acc4 int8 head": lambda out: onnx_write.export(model, out, accuracy_level=4, lm_head="int8",
                                                                 overwrite=True),
        }
        # asym: zero-points like ours (its int4 tied-embedding Gather does not load asymmetric, so the
        # embedding is not shared there); float head: the lm head left float, as in ours
        builders = {"builder int4": [], "builder int4 asym": ["is_symmetric=false", "shared_embeddings=false"],
                    "builder int4 float head": ["shared_embeddings=false", "nodes_to_exclude=/lm_head/MatMul"],
                    "builder int4 asym float head": ["is_symmetric=false", "shared_embeddings=false",
                                                     "nodes_to_exclude=/lm_head/MatMul"]}
        # the builder's models with every MatMulNBits at accuracy level 0 (same weights; a view)
        views = {"builder int4 acc0": "builder int4", "builder int4 float head acc0": "builder int4 float head",
                 "builder int4 asym float head acc0": "builder int4 asym float head"}
        wanted = set(args.variants or [*ours, *builders, *views])
        dirs, exact, notes = {}, {}, {}
        for name, make in ours.items():
            if name not in wanted:
                continue
            out = work / f"{base.name}-{name.replace(' ', '_')}"
            summary = make(out)
            dirs[name], exact[name] = out, str(summary.get("exact", True)).lower()
            if summary.get("lm_head"):
                exact[name] = f"projections {exact[name]}; lm head {summary['lm_head']['kind']} (not exact)"
        for name, extra in builders.items():
            needed = name in wanted or any(v in wanted and src == name for v, src in views.items())
            if not needed or args.no_builder or float_dir is None:
                continue
            out = work / f"{base.name}-{name.replace(' ', '_')}"
            why = run_builder(float_dir, out, model.group_size, extra, args.builder_pythonpath)
            if why:
                notes[name] = why
            else:
                dirs[name], exact[name] = out, "n/a (quantizes the float model)"
        for name, source in views.items():
            if name in wanted and source in dirs:
                from qalora_export.formats.onnx.runtime import at_accuracy_level

                dirs[name] = at_accuracy_level(dirs[source], 0, work / f"{base.name}-{name.replace(' ', '_')}")
                exact[name] = exact[source]
        for name in [n for n in dirs if n not in wanted]:  # built only as a view's source
            del dirs[name]

        vocab = int(model.model_config["vocab_size"])
        rng = np.random.default_rng(0)
        prompt = [1] + [int(t) for t in rng.integers(4, vocab, size=args.prompt - 1)]
        load_before = os.getloadavg()[0]
        for name, out in list(dirs.items()):  # warms the page cache and genai; a model genai refuses is noted
            try:
                genai_speed(out, prompt, 2)
            except RuntimeError as exc:
                notes[name] = f"onnxruntime-genai cannot load it: {str(exc).splitlines()[0][:300]}"
                del dirs[name]
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in dirs}
        for _ in range(args.repeats):
            for name, out in dirs.items():  # interleaved: machine load drifts over every variant alike
                runs[name].append(genai_speed(out, prompt, args.steps))
        load_after = os.getloadavg()[0]

        rows = {}
        for name, timings in runs.items():
            rows[name] = {"bytes": onnx_bytes(dirs[name]), "exact": exact[name],
                          "prefill_tokens_per_s": statistics.median(t[0] for t in timings),
                          "decode_tokens_per_s": statistics.median(t[1] for t in timings),
                          "decode_runs": [round(t[1], 2) for t in timings]}
        if args.accuracy:
            for name, cost in accuracy_costs(model, {n: dirs[n] for n in ours if n in dirs}).items():
                rows[name].update(cost)
        ref = rows.get("fp32")
        peer, head = rows.get("builder int4"), rows.get("builder int4 float head")
        peer0, head0 = rows.get("builder int4 acc0"), rows.get("builder int4 float head acc0")
        asym0 = rows.get("builder int4 asym float head acc0")  # stores zero-points, as a fold must
        print(f"model: {base}  bits={model.bits} group_size={model.group_size} adapter={adapter}")
        print(f"runtime: onnxruntime-genai, prompt {len(prompt)} tokens, {args.steps} decode steps, median of "
              f"{args.repeats} interleaved rounds; load average {load_before:.2f} -> {load_after:.2f} "
              f"on {os.cpu_count()} CPUs")
        print("| variant | MB | prefill tok/s | decode tok/s | decode / fp32 | prefill / builder int4 "
              "| decode / builder int4 (acc 4) | decode / builder int4 acc 0 | decode / builder float head "
              "| decode / builder float head acc 0 | decode / builder asym float head acc 0 | mean KL vs unmerged "
              "| top-1 vs unmerged | exact |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, row in rows.items():
            print(f"| {name} | {row['bytes'] / 1e6:.1f} | {row['prefill_tokens_per_s']:.1f} | "
                  f"{row['decode_tokens_per_s']:.1f} | {_ratio(row, ref, 'decode')} | {_ratio(row, peer, 'prefill')} | "
                  f"{_ratio(row, peer, 'decode')} | {_ratio(row, peer0, 'decode')} | {_ratio(row, head, 'decode')} | "
                  f"{_ratio(row, head0, 'decode')} | {_ratio(row, asym0, 'decode')} | "
                  f"{_fmt(row.get('mean_kl'), '.1e')} | "
                  f"{_fmt(row.get('top1_agreement'), '.3f')} | {row['exact']} |")
        for name, why in notes.items():
            print(f"{name}: not run ({why})")
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "notes": notes, "load": [load_before, load_after]},
                                            indent=2) + "\n")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
