"""``demo``: the whole path on the SmolLM2-135M-Instruct fixture, with a measured before/after.

quantize (RTN, 4-bit, group 32) -> train a short QA-LoRA run on the record-code task of
``qalora_export/fixtures/instruct_task.py`` -> merge (fold into zero-points) -> export -> verify in the real
runtime -> one table: held-out loss and exact-match accuracy of the quantized base, of base +
adapter (unmerged), and of each merged artifact in its runtime, plus the verify gate's figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import torch

DEMO_BITS = 4
DEMO_GROUP_SIZE = 32
N_TRAIN = 320
N_HELD_OUT = 32
MAX_LENGTH = 96
MAX_NEW_TOKENS = 16


def _evaluate(model, tokenizer, held_out: list[dict], dataset, log: Callable[[str], None], label: str) -> dict:
    t0 = time.time()
    row = _score(model, tokenizer, held_out, dataset)
    _log_row(log, label, row, time.time() - t0)
    return row


def _score(model, tokenizer, held_out: list[dict], dataset) -> dict:
    """Held-out loss and exact-match accuracy of ``model`` (one table row)."""
    from qalora_export.fixtures.instruct_task import check_answer
    from qalora_export.training.evaluate import exact_match_accuracy, held_out_loss

    loss = held_out_loss(model, dataset, tokenizer.pad_token_id)
    acc = exact_match_accuracy(model, tokenizer, held_out, check_answer, max_new_tokens=MAX_NEW_TOKENS)
    sample = acc.samples[0]
    return {"held_out_loss": loss, "exact_match": acc.accuracy, "correct": acc.correct, "total": acc.total,
            "example": {"expected": sample.expected, "generated": sample.generated}}


def _log_row(log: Callable[[str], None], label: str, row: dict, seconds: float) -> None:
    log(f"  {label}: held-out loss {row['held_out_loss']:.3f}, exact match {row['correct']}/{row['total']} "
        f"(e.g. {row['example']['expected']!r} -> {row['example']['generated'].strip()!r}) [{seconds:.0f}s]")


def score_gptq_artifact(artifact: str, tokenizer_dir: str, held_out: list[dict]) -> dict:
    """:func:`_score` of an AutoGPTQ checkpoint loaded by transformers + GPTQModel (run in a child
    process by :func:`run_demo`: a runtime that crashes fails the demo, not the interpreter)."""
    from transformers import AutoTokenizer

    from qalora_export.formats.gptq.runtime import load_gptq_model
    from qalora_export.training.examples import build_dataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    dataset, _ = build_dataset(tokenizer, held_out, MAX_LENGTH)
    return _score(load_gptq_model(Path(artifact)), tokenizer, held_out, dataset)


def run_demo(workdir: Path, steps: int = 40, formats: tuple[str, ...] | list[str] = ("gptq",),
             overwrite: bool = True, log: Optional[Callable[[str], None]] = None, seed: int = 0,
             held_out_examples: int = N_HELD_OUT) -> dict:
    """Run the demo under ``workdir``; returns the report (also written as ``demo_report.json``).

    ``held_out_examples`` sets how many examples each table row is scored on (fewer: a quicker,
    noisier table)."""
    from transformers import AutoTokenizer

    from qalora_export.bundle.write import export_with_bundle
    from qalora_export.checkpoint.adapter_files import load_adapter
    from qalora_export.extras import require
    from qalora_export.fixtures.instruct_task import make_splits, write_jsonl
    from qalora_export.fixtures.smollm2 import smollm2_float_dir, smollm2_gguf_path
    from qalora_export.formats import get_format
    from qalora_export.modeling.model import build_model
    from qalora_export.quantization.quantize import quantize_model
    from qalora_export.training.config import TrainConfig
    from qalora_export.training.examples import build_dataset
    from qalora_export.training.train import train_adapter

    log = log or (lambda msg: None)
    if held_out_examples < 1:
        from qalora_export.errors import ConfigError

        raise ConfigError(f"--held-out-examples {held_out_examples}: the table needs at least 1 example")
    for name in formats:  # every optional runtime is checked before minutes of training
        fmt = get_format(name)
        require(fmt.export_requires + fmt.runtime_requires, f"demo --formats {name}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}
    torch.manual_seed(seed)

    t0 = time.time()
    log(f"[1/6] fixture: {smollm2_gguf_path()}")
    float_dir = smollm2_float_dir()
    base = workdir / "base-w4g32"
    log(f"[2/6] quantize {float_dir} -> {base} (RTN, {DEMO_BITS}-bit, group {DEMO_GROUP_SIZE})")
    qsum = quantize_model(float_dir, base, DEMO_BITS, DEMO_GROUP_SIZE, "gptq_v2", overwrite=overwrite)
    timings["quantize"] = time.time() - t0

    data_dir = workdir / "data"
    data_dir.mkdir(exist_ok=True)
    train_examples, held_out = make_splits(N_TRAIN, held_out_examples, seed)
    write_jsonl(data_dir / "train.jsonl", train_examples)
    write_jsonl(data_dir / "held_out.jsonl", held_out)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    held_dataset, _ = build_dataset(tokenizer, held_out, MAX_LENGTH)

    t0 = time.time()
    log("[3/6] evaluate the quantized base (no adapter)")
    rows = {"quantized base (PyTorch)": _evaluate(build_model(base), tokenizer, held_out, held_dataset, log,
                                                  "quantized base")}
    timings["evaluate_base"] = time.time() - t0

    t0 = time.time()
    adapter_dir = workdir / "adapter"
    log(f"[4/6] train QA-LoRA (integer zeros): {steps} steps on {len(train_examples)} examples -> {adapter_dir}")
    # Integer-zero training: the folded zero-points are integers by construction, so the AutoGPTQ
    # artifact (integer zeros) is bit-exact; a float-zero adapter would have to be rounded into it.
    config = TrainConfig(steps=steps, max_length=MAX_LENGTH, seed=seed, held_out=16, integer_zeros=True)
    last = {"t": time.time()}

    def progress(step: int, loss: float) -> None:
        if step == 1 or step % 10 == 0 or step == steps:
            log(f"  step {step}/{steps} loss {loss:.4f} ({time.time() - last['t']:.1f}s)")
            last["t"] = time.time()

    result = train_adapter(base, data_dir / "train.jsonl", adapter_dir, config, overwrite=overwrite,
                           progress=progress)
    timings["train"] = time.time() - t0
    adapter = load_adapter(adapter_dir)
    t0 = time.time()
    rows["base + QA-LoRA, unmerged (PyTorch)"] = _evaluate(build_model(base, adapter), tokenizer, held_out,
                                                           held_dataset, log, "unmerged")
    timings["evaluate_unmerged"] = time.time() - t0

    artifacts = {}
    for fmt in formats:
        t0 = time.time()
        target = get_format(fmt)
        out = workdir / f"merged-{fmt}{target.output_suffix}"
        log(f"[5/6] merge -> {fmt}: {out}")
        # the export writes the handoff bundle beside the model files and runs verify on it: integer-zero
        # training makes every fold exact, so the gate (require_exact) fails an artifact that rounded
        summary = export_with_bundle(fmt, base, adapter_dir, out, {"overwrite": True}, require_exact=True,
                                     stage=lambda s, _out=out: log(f"[6/6] verify {_out}") if s == "verify" else None)
        report = summary.pop("verify")
        (workdir / f"verify-{fmt}.json").write_text(json.dumps(report, indent=2, default=float))
        artifacts[fmt] = {"path": str(out), "summary": {k: v for k, v in summary.items() if k != "per_layer"},
                          "verify": _verify_digest(report)}
        if fmt == "gptq":  # the table scores the artifact in the base's own runtime (GPTQModel)
            from qalora_export.formats.gptq.runtime import RUNTIME
            from qalora_export.runtimes.isolation import call_isolated

            t1 = time.time()
            row = call_isolated(f"{__name__}:score_gptq_artifact", {"artifact": out, "tokenizer_dir": base, "held_out": held_out}, RUNTIME)
            _log_row(log, "merged gptq", row, time.time() - t1)
            rows["merged AutoGPTQ (transformers + GPTQModel)"] = row
        timings[f"merge_verify_{fmt}"] = time.time() - t0

    timings["total"] = time.time() - t_start
    report = {
        "model": "SmolLM2-135M-Instruct",
        "quantize": qsum.__dict__,
        "train": {k: v for k, v in result.__dict__.items() if k != "losses"},
        "rows": rows,
        "artifacts": artifacts,
        "timings_s": timings,
        "passed": all(a["verify"]["passed"] for a in artifacts.values()),
        "improved": rows["base + QA-LoRA, unmerged (PyTorch)"]["exact_match"] > rows["quantized base (PyTorch)"]["exact_match"],
    }
    (workdir / "demo_report.json").write_text(json.dumps(report, indent=2, default=float))
    return report


def _verify_digest(report: dict) -> dict:
    """The few figures of a verify report that the demo table shows."""
    w = report["weights"]
    rt = report.get("runtime") or {}
    vs_unmerged = rt.get("artifact_vs_unmerged") or rt.get("merged_vs_unmerged") or {}
    floor = rt.get("floor") or {}
    return {
        "passed": report["passed"],
        "weights_max_abs_vs_declared": w["max_abs_vs_declared"],
        "weights_max_abs_vs_unmerged": w["max_abs_vs_unmerged"],
        "exact_merge": (w.get("merge") or {}).get("exact", True),
        "kl_vs_unmerged": vs_unmerged.get("mean_kl"),
        "top1_vs_unmerged": vs_unmerged.get("top1_agreement"),
        "floor_kl": floor.get("mean_kl"),
        "runtime": rt.get("runtime"),
    }


def _fmt_share(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_demo_table(report: dict) -> str:
    """The demo's one table (markdown), plus the verify line for each artifact."""
    lines = [
        f"QA-LoRA demo on {report['model']} ({DEMO_BITS}-bit, group {DEMO_GROUP_SIZE}); "
        f"record-code task, {report['rows']['quantized base (PyTorch)']['total']} held-out examples",
        "",
        "| model | runtime | held-out loss | exact match |",
        "|---|---|---|---|",
    ]
    for name, row in report["rows"].items():
        label, _, runtime = name.partition(" (")
        lines.append(f"| {label} | {runtime.rstrip(')')} | {row['held_out_loss']:.3f} | "
                     f"{row['correct']}/{row['total']} ({100 * row['exact_match']:.0f}%) |")
    lines.append("")
    for fmt, art in report["artifacts"].items():
        v = art["verify"]
        s = art["summary"]
        exact = ("exact fold" if v["exact_merge"] else
                 f"{s.get('zeros_moved')} of {s.get('zeros_total')} zeros rounded (max {s.get('max_zero_change', 0):.2f} codes)")
        kl = "n/a" if v["kl_vs_unmerged"] is None else f"{v['kl_vs_unmerged']:.2e}"
        floor = "n/a" if v["floor_kl"] is None else f"{v['floor_kl']:.1e}"
        lines.append(
            f"verify {fmt}: {'PASSED' if v['passed'] else 'FAILED'} - {exact}; weights vs declared max "
            f"{v['weights_max_abs_vs_declared']:.1e}, vs unmerged max {v['weights_max_abs_vs_unmerged']:.1e}; "
            f"runtime KL vs unmerged {kl} (floor {floor}), top-1 agreement {_fmt_share(v['top1_vs_unmerged'])}")
    t = report["timings_s"]
    lines.append(f"\ntime: total {t['total']:.0f}s (quantize {t['quantize']:.0f}s, train {t['train']:.0f}s); "
                 f"train loss {report['train'].get('train_loss_first', float('nan')):.3f} -> "
                 f"{report['train'].get('train_loss_last', float('nan')):.3f}")
    return "\n".join(lines)
