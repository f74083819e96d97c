"""The QA-LoRA paper's Table 1, small: SmolLM2-135M-Instruct on the record-code task.

Rows, for each bit width (group size 32, GPTQ bases calibrated on the standard library's
docstrings), all fine-tuned rows with the same steps, data, batch order, rank, alpha, learning
rate schedule and seed:

| row | what is evaluated |
|---|---|
| float base | the float fixture, no fine-tuning (one row for every bit width) |
| GPTQ base | ``quantize --method gptq``, no fine-tuning |
| LoRA, then GPTQ | PEFT LoRA trained on the float model with train.py's loop pieces (BatchStream, lr_lambda, AdamW, train_step), merged in float (``merge_and_unload``), then GPTQ-quantized like the base: the paper's "QLoRA w/ GPTQ" |
| QA-LoRA, float zeros, merged | float-zero QA-LoRA on the GPTQ base, folded into float zero-points (``MergedView``) and evaluated as a float model with the folded weights ``scale * (q - zero')`` — what ONNX (float zero-points) and GGUF (Q4_1 ``m``) hold |
| QA-LoRA, rounded into GPTQ | that adapter folded into the AutoGPTQ checkpoint with its zeros rounded (``merge --to gptq`` without ``--require-exact``), read back by the project's reader |
| QA-LoRA, integer zeros | ``train --integer-zeros``, folded exactly into GPTQ (``--require-exact``), read back by the reader |

One extra row, "LoRA, float (before GPTQ)", shows what the float LoRA reached before quantization.
Metrics: held-out response-token loss (``evaluate.held_out_loss``) and exact match by greedy
generation (``evaluate.exact_match_accuracy`` with the task's checker) on held-out examples whose
answers never occur in training.

Resumable: every artifact (base, adapter, merged model) and every row's result is cached under
``--workdir`` (``rows/*.json``); a rerun skips what exists. On a CPU, use few ``--steps``; the table
printed at the end names the device and the number of steps.

    nohup nice -n 10 python benchmarks/table1.py --bits 4,2 --steps 40 --workdir table1-run > table1.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROWS = (
    "float base",
    "GPTQ base",
    "LoRA, float (before GPTQ)",
    "LoRA, then GPTQ",
    "QA-LoRA, float zeros, merged",
    "QA-LoRA, rounded into GPTQ",
    "QA-LoRA, integer zeros, exact GPTQ",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    tmp.replace(path)


class Table:
    """Settings, data and the cached row results of one run."""

    def __init__(self, args):
        from transformers import AutoTokenizer

        from qalora_export.training.examples import build_dataset
        from qalora_export.fixtures.smollm2 import smollm2_float_dir
        from qalora_export.fixtures.instruct_task import make_splits, write_jsonl
        from qalora_export.training.config import TrainConfig

        self.args = args
        self.work = args.workdir
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.float_dir = smollm2_float_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.float_dir))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        train, self.held_out = make_splits(args.examples, args.held_out, args.seed)
        self.data = self.work / "data" / "train.jsonl"
        self.data.parent.mkdir(exist_ok=True)
        write_jsonl(self.data, train)
        write_jsonl(self.work / "data" / "held_out.jsonl", self.held_out)
        self.held_dataset, _ = build_dataset(self.tokenizer, self.held_out, args.max_length)
        # held_out=0: train on every training example; the table's held-out set is separate.
        self.config = TrainConfig(rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr,
                                  batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                                  held_out=0, warmup_steps=min(5, max(0, args.steps - 1)))
        self.settings = {"steps": args.steps, "examples": args.examples, "held_out": args.held_out,
                         "rank": args.rank, "alpha": args.alpha, "lr": args.lr, "batch_size": args.batch_size,
                         "max_length": args.max_length, "seed": args.seed, "group_size": args.group_size,
                         "calibration": f"{args.calibration_samples}x{args.calibration_seq_len}",
                         "device": self.device.type}
        # Cached rows are only valid for the settings that produced them.
        recorded = self.work / "settings.json"
        if recorded.is_file() and json.loads(recorded.read_text()) != self.settings:
            raise SystemExit(f"{self.work} holds a run with other settings ({recorded.read_text().strip()}); "
                             f"use another --workdir")
        write_json(recorded, self.settings)

    # ------------------------------------------------------------------------------- evaluation

    def evaluate(self, model) -> dict:
        from qalora_export.training.evaluate import exact_match_accuracy, held_out_loss
        from qalora_export.fixtures.instruct_task import check_answer

        model.to(self.device)
        t0 = time.time()
        loss = held_out_loss(model, self.held_dataset, self.tokenizer.pad_token_id, device=self.device,
                             cache_weights=True)
        acc = exact_match_accuracy(model, self.tokenizer, self.held_out, check_answer, max_new_tokens=16,
                                   device=self.device)
        sample = acc.samples[0]
        return {"held_out_loss": loss, "correct": acc.correct, "total": acc.total, "exact_match": acc.accuracy,
                "example": {"expected": sample.expected, "generated": sample.generated},
                "eval_seconds": time.time() - t0}

    def row(self, bits: int, name: str, build) -> dict:
        """The cached result of row ``name`` at ``bits``, computing it with ``build() -> (model, info)``."""
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        path = self.work / "rows" / (f"{slug}.json" if name == "float base" else f"w{bits}-{slug}.json")
        if path.is_file():
            result = json.loads(path.read_text())
        else:
            log(f"{bits}-bit: {name}" if bits else name)
            t0 = time.time()
            model, info = build()
            result = {"row": name, "bits": bits, **info, **self.evaluate(model), "settings": self.settings}
            result["seconds"] = time.time() - t0
            del model
            write_json(path, result)
        log(f"  {f'{bits}-bit ' if bits else ''}{name}: loss {result['held_out_loss']:.3f}, exact match "
            f"{result['correct']}/{result['total']} ({result['example']['generated'].strip()!r} "
            f"for {result['example']['expected']!r})")
        return result

    # ------------------------------------------------------------------------------- artifacts

    def gptq(self, float_dir: Path, out: Path, bits: int) -> Path:
        from qalora_export.quantization.quantize import quantize_model

        if not (out / "config.json").is_file():
            log(f"  GPTQ {bits}-bit g{self.args.group_size}: {float_dir} -> {out}")
            quantize_model(float_dir, out, bits, self.args.group_size, method="gptq",
                           n_samples=self.args.calibration_samples, seq_len=self.args.calibration_seq_len,
                           device=self.device.type, overwrite=True)
        return out

    def qalora_adapter(self, base: Path, integer_zeros: bool) -> Path:
        from dataclasses import replace

        from qalora_export.training.train import train_adapter

        out = base.with_name(base.name + ("-adapter-intzeros" if integer_zeros else "-adapter-floatzeros"))
        if not (out / "adapter_config.json").is_file():
            log(f"  train QA-LoRA ({'integer' if integer_zeros else 'float'} zeros), {self.args.steps} steps -> {out}")
            result = train_adapter(base, self.data, out, replace(self.config, integer_zeros=integer_zeros),
                                   overwrite=True, device=self.device.type)
            write_json(out.with_name(out.name + ".train.json"),
                       {"losses": result.losses, "seconds": result.seconds, "tokens": result.tokens})
        return out

    def lora_float_dir(self) -> Path:
        """The float model with a PEFT LoRA trained on it and merged in float (shared by all bit widths)."""
        out = self.work / "float-lora-merged"
        if (out / "model.safetensors").is_file():
            return out
        model, info = train_float_lora(self.float_dir, self.data, self.config, self.device)
        merged = model.merge_and_unload()
        tmp = self.work / "float-lora-merged.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(str(tmp))
        self.tokenizer.save_pretrained(str(tmp))
        write_json(tmp / "lora_training.json", info)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        return out

    def merged_gptq(self, base: Path, adapter: Path, exact: bool) -> tuple[Path, dict]:
        from qalora_export.formats import get_format
        from qalora_export.checkpoint.merged_view import MergedView

        out = adapter.with_name(adapter.name + "-merged-gptq")
        summary_path = out.with_name(out.name + ".summary.json")
        if not summary_path.is_file():
            summary = get_format("gptq").export(MergedView.open(base, adapter), out, overwrite=True,
                                                   require_exact=exact)
            write_json(summary_path, {k: v for k, v in summary.items() if k != "per_layer"})
        return out, json.loads(summary_path.read_text())


def train_float_lora(float_dir: Path, data: Path, config, device: torch.device):
    """PEFT LoRA (rank, alpha, target modules of ``config``, no dropout) on the float model, trained
    with the QA-LoRA trainer's pieces and settings: same tokenized data, batch stream, AdamW,
    warmup + cosine schedule, gradient clipping and loss (``train.train_step``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qalora_export.training.examples import collate
    from qalora_export.training.prepare import BatchStream, load_tokenizer, prepare_data
    from qalora_export.training.optim import lr_lambda, make_optimizer, train_step

    tokenizer = load_tokenizer(float_dir)
    prepared = prepare_data(tokenizer, data, config)
    torch.manual_seed(config.seed)  # PEFT draws lora_A from the global generator
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                             target_modules=list(config.target_modules), bias="none"))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    stream = BatchStream(len(prepared.train), config.batch_size, config.seed)
    losses = []
    t0 = time.time()
    for step in range(1, config.steps + 1):
        batch = collate([prepared.train[i] for i in stream.next_batch()], prepared.pad_token_id)
        loss, _, _ = train_step(model, {k: v.to(device) for k, v in batch.items()}, optimizer, scheduler, params,
                                config, device)
        losses.append(loss)
        if step == 1 or step % 10 == 0 or step == config.steps:
            log(f"  LoRA step {step}/{config.steps} loss {loss:.4f}")
    model.eval()
    return model, {"losses": losses, "seconds": time.time() - t0,
                   "trainable_parameters": sum(p.numel() for p in params)}


def folded_float_model(base: Path, adapter: Path):
    """A float ``*ForCausalLM`` whose projections hold the folded float-zero weights
    ``scale * (q - zero')`` (float64 fold, then float32), i.e. the merged model as a format with float
    zero-points holds it; other tensors as stored in the base (fp16)."""
    from transformers import AutoModelForCausalLM

    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.modeling.model import hf_config_from

    merged = MergedView.open(base, adapter)
    config = hf_config_from(merged.model_config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: merged.read_tensor(name).to(torch.float32) for name in merged.other_tensor_names()}
    for name in merged.quantized_modules:
        layer, _ = merged.read_layer(name)
        state[f"{name}.weight"] = layer.dequantize(torch.float32)
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"folded model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return model


def run(args) -> dict:
    from qalora_export.modeling.model import build_model

    table = Table(args)
    log(f"settings: {table.settings}")
    results: dict = {}
    float_row = table.row(0, "float base", lambda: (_float_model(table.float_dir), {}))
    for bits in [int(b) for b in args.bits.split(",")]:
        rows = results.setdefault(bits, {"float base": float_row})
        base = table.gptq(table.float_dir, table.work / f"base-w{bits}g{args.group_size}", bits)
        rows["GPTQ base"] = table.row(bits, "GPTQ base", lambda: (build_model(base), {}))

        lora_dir = table.lora_float_dir()
        rows["LoRA, float (before GPTQ)"] = table.row(bits, "LoRA, float (before GPTQ)",
                                                      lambda: (_float_model(lora_dir), {}))
        lora_q = table.gptq(lora_dir, table.work / f"lora-merged-w{bits}g{args.group_size}", bits)
        rows["LoRA, then GPTQ"] = table.row(bits, "LoRA, then GPTQ", lambda: (build_model(lora_q), {}))

        float_zero = table.qalora_adapter(base, integer_zeros=False)
        rows["QA-LoRA, float zeros, merged"] = table.row(
            bits, "QA-LoRA, float zeros, merged", lambda: (folded_float_model(base, float_zero), {}))

        def rounded():
            out, summary = table.merged_gptq(base, float_zero, exact=False)
            return build_model(out), {"merge": summary}

        rows["QA-LoRA, rounded into GPTQ"] = table.row(bits, "QA-LoRA, rounded into GPTQ", rounded)

        int_zero = table.qalora_adapter(base, integer_zeros=True)

        def exact():
            out, summary = table.merged_gptq(base, int_zero, exact=True)
            return build_model(out), {"merge": summary}

        rows["QA-LoRA, integer zeros, exact GPTQ"] = table.row(bits, "QA-LoRA, integer zeros, exact GPTQ", exact)
    print(format_table(results, table.settings))
    write_json(args.workdir / "table1.json", {"settings": table.settings,
                                              "rows": {str(b): r for b, r in results.items()}})
    return results


def _float_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def format_table(results: dict, settings: dict) -> str:
    bits_list = sorted(results, reverse=True)
    head = " | ".join(f"{b}-bit loss | {b}-bit exact match" for b in bits_list)
    lines = [f"SmolLM2-135M-Instruct, record-code task, group size {settings['group_size']}, "
             f"{settings['device'].upper()}, {settings['steps']} steps, {settings['examples']} training / "
             f"{settings['held_out']} held-out examples",
             "", f"| row | {head} |", "|---|" + "---|---|" * len(bits_list)]
    for name in ROWS:
        cells = []
        for b in bits_list:
            r = results[b].get(name)
            cells.append("—" if r is None else f"{r['held_out_loss']:.3f}")
            cells.append("—" if r is None else f"{r['correct']}/{r['total']} ({100 * r['exact_match']:.0f}%)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="4,2", help="comma-separated bit widths (2, 3, 4, 8)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of every fine-tuned row")
    parser.add_argument("--examples", type=int, default=320, help="training examples")
    parser.add_argument("--held-out", type=int, default=32, help="held-out examples")
    parser.add_argument("--workdir", type=Path, default=Path("table1-run"))
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--calibration-seq-len", type=int, default=256)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
