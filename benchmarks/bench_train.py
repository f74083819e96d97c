"""Training throughput and peak memory: QA-LoRA on a packed INT4 base against PEFT LoRA on the float model.

Two workloads, each trained by both methods in the same run with the same loop (train.py's
``train_step``: AdamW, warmup + cosine schedule, gradient clipping, ``evaluate.response_loss``):

- **fixture**: SmolLM2-135M-Instruct on the record-code task (``qalora_export/fixtures/instruct_task.py``),
  ``--fixture-batch`` examples per step padded to the longest (at most 96 tokens), loss on the
  responses only, as ``train`` runs it. QA-LoRA on a 4-bit group-32 RTN base.
- **stack**: a LLaMA-7B-shaped decoder stack with random weights (hidden 4096, intermediate
  11008, 32 heads, ``--layers`` decoder layers, ``--vocab`` tokens), random token windows,
  ``--tokens`` tokens per step (``--seq-len`` per sequence), loss on every position.
  QA-LoRA on a 4-bit group-128 RTN base.

Variants: ``qalora`` (this project's ``build_model`` + fresh adapters, rank ``--rank`` on the 7
projections; on CUDA bf16 compute and the Triton kernels when installed), ``qalora-intzeros``
(``--integer-zeros`` mode, PyTorch path) and ``lora`` (PEFT LoRA, same rank and targets, on the
float model: bf16 weights on CUDA, float32 on CPU where bf16 matmuls are slow). Every variant runs
in its own subprocess so that its peak memory is its own: ``torch.cuda.max_memory_allocated`` on
CUDA, the child's peak RSS on CPU. Throughput is tokens (attention-mask ones) per second over
``--steps`` timed steps after ``--warmup`` untimed ones; ratios are against ``lora`` in the same run.

    python benchmarks/bench_train.py                      # CUDA: fixture + 2-layer 7B stack, 4096 tokens/step
    python benchmarks/bench_train.py --layers 1 --tokens 256 --seq-len 128 --steps 3   # CPU-sized

Random base weights are fine for speed; they say nothing about quality.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()
VARIANTS = ("qalora", "qalora-intzeros", "lora")
LLAMA7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)


def device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------ building the models


def make_stack(out: Path, layers: int, vocab: int, shape: dict, bits: int, group_size: int) -> tuple[Path, Path]:
    """A random float LLaMA stack (bf16 safetensors) and its RTN GPTQ base; cached under ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qalora_export.quantization.quantize import quantize_model

    float_dir, base_dir = out / "float", out / f"base-w{bits}g{group_size}"
    if not (float_dir / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(**shape, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.02)
        model.save_pretrained(str(float_dir))
        _write_tokenizer(float_dir, vocab)
    if not (base_dir / "config.json").is_file():
        quantize_model(float_dir, base_dir, bits, group_size, overwrite=True)
    return float_dir, base_dir


def _write_tokenizer(out: Path, vocab: int) -> None:
    """A WordLevel tokenizer over ``t0 .. t{vocab-1}`` (build_model and train need tokenizer files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(out))


def fixture_dirs(out: Path) -> tuple[Path, Path]:
    from qalora_export.fixtures.smollm2 import smollm2_float_dir
    from qalora_export.quantization.quantize import quantize_model

    float_dir = smollm2_float_dir()
    base = out / "smollm2-w4g32"
    if not (base / "config.json").is_file():
        quantize_model(float_dir, base, 4, 32, overwrite=True)
    return float_dir, base


# ------------------------------------------------------------------------------ one variant (child)


def build_variant(variant: str, float_dir: Path, base_dir: Path, rank: int, device: torch.device):
    from qalora_export.modeling.model import build_model, qalora_modules
    from qalora_export.training.optim import init_adapters

    if variant.startswith("qalora"):
        int_range = None
        if variant == "qalora-intzeros":
            from qalora_export.checkpoint.gptq import GPTQCheckpoint
            from qalora_export.checkpoint.gptq_config import zero_range

            cfg = GPTQCheckpoint(base_dir).config
            int_range = zero_range(cfg.bits, cfg.checkpoint_format)
        model = build_model(base_dir, train_rank=rank, train_alpha=2.0 * rank,
                            compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                            integer_zero_range=int_range)
        init_adapters(model, 0)
        params = [p for m in qalora_modules(model).values() for p in (m.lora_A, m.lora_B)]
        return model.to(device), params
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qalora_export.modeling.model import TARGET_MODULES

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=list(TARGET_MODULES), bias="none"))
    return model.to(device), [p for p in model.parameters() if p.requires_grad]


def batches(workload: str, float_dir: Path, args, steps: int):
    """``steps`` collated batches (int64 ``[B, T]`` input_ids / attention_mask / labels)."""
    from qalora_export.training.examples import collate

    if workload == "fixture":
        from qalora_export.fixtures.instruct_task import make_splits, write_jsonl
        from qalora_export.training.prepare import BatchStream, load_tokenizer, prepare_data
        from qalora_export.training.config import TrainConfig

        data = Path(args.workdir) / "fixture-train.jsonl"
        write_jsonl(data, make_splits(320, 0, 0)[0])
        config = TrainConfig(max_length=96, held_out=0, batch_size=args.fixture_batch)
        prepared = prepare_data(load_tokenizer(float_dir), data, config)
        stream = BatchStream(len(prepared.train), config.batch_size, 0)
        return [collate([prepared.train[i] for i in stream.next_batch()], prepared.pad_token_id)
                for _ in range(steps)]
    gen = torch.Generator().manual_seed(0)
    rows = max(1, args.tokens // args.seq_len)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, args.vocab, (rows, args.seq_len), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def measure(args) -> dict:
    """Train one variant for warmup + timed steps; tokens/s and peak memory."""
    from qalora_export.training.config import TrainConfig
    from qalora_export.training.optim import lr_lambda, make_optimizer, train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(device_name())
    float_dir, base_dir = Path(args.float_dir), Path(args.base_dir)
    model, params = build_variant(args.variant, float_dir, base_dir, args.rank, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(steps=args.warmup + args.steps, lr=1e-4, warmup_steps=0)
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    data = batches(args.workload, float_dir, args, args.warmup + args.steps)
    tokens, losses, start = 0, [], None
    for step, batch in enumerate(data):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss, _, _ = train_step(model, {k: v.to(device) for k, v in batch.items()}, optimizer, scheduler, params,
                                config, device)
        losses.append(loss)
        if step >= args.warmup:
            tokens += int(batch["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"workload": args.workload, "variant": args.variant, "device": device.type, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "peak_bytes": peak,
            "peak_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
            "trainable_parameters": sum(p.numel() for p in params), "losses": losses}


# ------------------------------------------------------------------------------ the run (parent)


def run_child(args, workload: str, variant: str, float_dir: Path, base_dir: Path) -> dict:
    cmd = [sys.executable, str(HERE), "--child", "--workload", workload, "--variant", variant,
           "--float-dir", str(float_dir), "--base-dir", str(base_dir), "--rank", str(args.rank),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--tokens", str(args.tokens),
           "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--fixture-batch", str(args.fixture_batch),
           "--workdir", str(args.workdir), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{workload}/{variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def format_results(results: list[dict]) -> str:
    lines = ["| workload | variant | tokens/s | vs lora | peak memory (GiB) | vs lora | trainable params |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ref = next((x for x in results if x["workload"] == r["workload"] and x["variant"] == "lora"), None)
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "—"
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "—"
        lines.append(f"| {r['workload']} | {r['variant']} | {r['tokens_per_s']:.1f} | {speed} | "
                     f"{r['peak_bytes'] / 2**30:.2f} | {mem} | {r['trainable_parameters']:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="fixture,stack", help="comma-separated: fixture, stack")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated among {VARIANTS}")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 7B-shaped stack")
    parser.add_argument("--tokens", type=int, default=4096, help="stack: tokens per training step")
    parser.add_argument("--seq-len", type=int, default=2048, help="stack: tokens per sequence")
    parser.add_argument("--vocab", type=int, default=32000, help="stack: vocabulary size")
    parser.add_argument("--hidden", type=int, default=LLAMA7B["hidden_size"], help="stack: hidden size")
    parser.add_argument("--intermediate", type=int, default=LLAMA7B["intermediate_size"])
    parser.add_argument("--heads", type=int, default=LLAMA7B["num_attention_heads"])
    parser.add_argument("--group-size", type=int, default=128, help="stack: quantization group size")
    parser.add_argument("--fixture-batch", type=int, default=8, help="fixture: examples per step")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--workdir", type=Path, default=Path("bench-train"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU: torch intra-op threads (0: torch's default); 1 is steadier on busy cores")
    # internal: one variant in this process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--float-dir", help=argparse.SUPPRESS)
    parser.add_argument("--base-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)), flush=True)
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                 num_key_value_heads=args.heads)
    results = []
    for workload in args.workloads.split(","):
        if workload == "fixture":
            float_dir, base_dir = fixture_dirs(args.workdir)
            label = "SmolLM2-135M fixture, 4-bit g32"
        elif workload == "stack":
            stack = args.workdir / f"stack-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
            float_dir, base_dir = make_stack(stack, args.layers, args.vocab, shape, 4, args.group_size)
            label = (f"LLaMA-7B-shaped stack: {args.layers} layers, hidden {args.hidden}, intermediate "
                     f"{args.intermediate}, 4-bit g{args.group_size}, {args.tokens} tokens/step")
        else:
            raise SystemExit(f"--workloads: unknown {workload!r}; choose fixture, stack")
        print(f"{label} ({device_name()}, rank {args.rank}, {args.steps} timed steps after {args.warmup}, "
              f"torch threads {args.threads or torch.get_num_threads()})", flush=True)
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"--variants: unknown {variant!r}; choose among {VARIANTS}")
            r = run_child(args, workload, variant, float_dir, base_dir)
            print(f"  {variant}: {r['tokens_per_s']:.1f} tokens/s, peak {r['peak_bytes'] / 2**30:.2f} GiB "
                  f"({r['peak_kind']})", flush=True)
            results.append(r)
    print()
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
