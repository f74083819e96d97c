"""The argument parser: one sub-command per verb; each format adds its own export options."""

from __future__ import annotations

import argparse
from pathlib import Path

from qalora_export.checkpoint.adapter_files import POOLINGS
from qalora_export.cli import verbs
from qalora_export.formats import DEFAULT_FORMAT, all_formats
from qalora_export.formats.protocol import Format


def _add_export_options(p: argparse.ArgumentParser, formats: list[Format]) -> None:
    """``-o``, ``--pooling``, ``--overwrite`` and the export options of ``formats``."""
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output path: " + "; ".join(f"{f.artifact} for {f.name}" for f in formats))
    p.add_argument("--pooling", choices=POOLINGS,
                   help="pooling convention of an adapter that does not record it (official QA-LoRA: mean; "
                        "the paper's Algorithm 1: sum); PEFT and qalora-export adapters record it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run verify's runtime level on the export (default; its result and floors go into the "
                        "handoff bundle); --no-verify runs the weight level only")
    for fmt in formats:
        fmt.add_options(p)


def _fraction_or_count(text: str) -> float | int:
    """``--held-out``: "20" is a count, "0.1" a fraction (type=float made every count a fraction)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction nor a count") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qalora-export",
        description="QA-LoRA on group-quantized LLMs: quantize, train, fold the adapter into the zero-points, "
                    f"export ({', '.join(f.name for f in all_formats())}) and verify in the real runtimes.")
    sub = parser.add_subparsers(dest="command", required=True)
    # -v / --log-file on every verb (after its name, where users type them)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party output (GPTQModel, transformers, torch, runtimes) live instead of "
                             "capturing it in the log file")
    common.add_argument("--log-file", type=Path, default=None, metavar="PATH",
                        help="where captured third-party output goes (default: a new file under the temporary "
                             "directory, or <workdir>/demo.log for demo; its path is printed at the end)")

    def verb(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = verb("quantize", help="float model (HF dir or .gguf) -> AutoGPTQ checkpoint (min-max RTN)")
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"), default="gptq_v2",
                   help="gptq_v2 (default) stores true zero-points; gptq (v1) stores zero-1, for older runtimes")
    p.add_argument("--method", choices=("rtn", "gptq"), default="rtn",
                   help="rtn: min-max round-to-nearest (no data); gptq: Hessian-based GPTQ on calibration text")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal (desc_act)")
    p.add_argument("--group-aware-order", action="store_true",
                   help="gptq: visit whole groups by their largest Hessian diagonal, columns inside by theirs "
                        "(GPTQModel's act_group_aware); groups stay contiguous, no g_idx permutation")
    p.add_argument("--true-sequential", action="store_true",
                   help="gptq: inside each decoder layer, calibrate q/k/v, then o, then gate/up, then down on the "
                        "outputs of the already quantized ones (one calibration pass per set)")
    p.add_argument("--calibration-file", type=Path, default=None,
                   help="gptq: UTF-8 text to calibrate on (default: the Python standard library's docstrings, offline)")
    p.add_argument("--calibration-samples", type=int, default=128, help="gptq: calibration windows")
    p.add_argument("--calibration-seq-len", type=int, default=512, help="gptq: tokens per calibration window")
    p.add_argument("--damp", type=float, default=0.01, help="gptq: damping, fraction of the Hessian's mean diagonal")
    p.add_argument("--device", default="cpu",
                   help="gptq: cpu or cuda[:N]; holds the current decoder layer, the calibration activations and Hessians")
    p.add_argument("--calibration-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="gptq: storage dtype of calibration activations between layers (default float32; the "
                        "16-bit ones halve that memory and measurably hurt quality)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=verbs.cmd_quantize)

    p = verb("train", help="train a QA-LoRA adapter on a quantized base "
                                     "(data-parallel under torchrun / accelerate launch)")
    p.add_argument("base", type=Path)
    p.add_argument("--data", type=Path, required=True, help="JSONL: instruction/input/output or chat messages")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--held-out", type=_fraction_or_count, default=0.1,
                   help="fraction (<1, e.g. 0.1) or count (an integer, e.g. 20) of examples held out")
    p.add_argument("--on-overlong", choices=("drop", "truncate"), default="drop",
                   help="what to do with examples longer than --max-length (always counted and reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="cpu or cuda (bf16 autocast); under torchrun each process takes cuda:LOCAL_RANK")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="write a resumable checkpoint (adapter, optimizer, scheduler, RNG, data position) "
                        "every N steps into <output>.checkpoints (0: none)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="keep the newest K checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in <output>.checkpoints (same base, data, settings)")
    p.add_argument("--integer-zeros", action="store_true",
                   help="round the zero shift (straight-through) in training so the adapter folds into "
                        "integral, in-range GPTQ zeros (merge --to gptq --require-exact then succeeds)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="split each process's share of --batch-size (the global batch) into N micro-batches")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute decoder-layer activations in the backward pass (less memory, same result)")
    p.add_argument("--metrics-file", type=Path, default=None,
                   help="JSONL with one row per step, written while training (default <output>.metrics.jsonl)")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="also write TensorBoard scalars to DIR (needs `pip install tensorboard`)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=verbs.cmd_train)

    formats = all_formats()
    p = verb("merge", help="fold an adapter into the zero-points and export")
    p.add_argument("base", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("--to", choices=[f.name for f in formats], default=DEFAULT_FORMAT,
                   help="; ".join(f"{f.name}: {f.help}" for f in formats))
    _add_export_options(p, formats)
    p.set_defaults(func=verbs.cmd_merge)

    for fmt in (f for f in formats if f.has_verb):
        p = verb(fmt.name, help=f"export {fmt.help} (merging an adapter if given)")
        p.add_argument("base", type=Path, help="quantized base, or an already merged GPTQ checkpoint")
        p.add_argument("adapter", type=Path, nargs="?")
        _add_export_options(p, [fmt])
        p.set_defaults(func=verbs.cmd_format(fmt.name))

    p = verb("lora", help="export a QA-LoRA adapter as a plain LoRA (PEFT folder; --gguf: llama.cpp LoRA) that "
                          "runtimes apply unmerged to the unchanged base (docs/lora.md)")
    p.add_argument("adapter", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory (PEFT layout)")
    attach = [f"--{f.name}" for f in formats if f.writes_lora and f.output_suffix]
    if attach:
        p.add_argument(*attach, dest="attach", type=Path, metavar="BASE_ARTIFACT",
                       help="also write the LoRA for this base artifact's runtime (a .gguf made by `gguf BASE`: "
                            "adapter.gguf for llama.cpp --lora)")
    p.add_argument("--base", type=Path, help="the GPTQ base the adapter was trained on (its g_idx; checked)")
    p.add_argument("--verify", type=Path, metavar="BASE",
                   help="GPTQ base: also run the LoRA in PEFT on it (and in llama.cpp with the attached file) "
                        "against the unmerged model; exit 1 on failure")
    p.add_argument("--pooling", choices=POOLINGS, help="pooling convention of an adapter that does not record it")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage type of the factors")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--runtime-timeout", type=float, default=3600.0, metavar="SECONDS")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=verbs.cmd_lora)

    p = verb("verify", help="check an artifact against the unmerged model (exit 1 on failure)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--base", type=Path,
                   help="the quantized base; without it the artifact is checked against its handoff bundle "
                        "(checksums, and the runtime against the stored reference)")
    p.add_argument("--adapter", type=Path)
    p.add_argument("--pooling", choices=POOLINGS)
    p.add_argument("--format", choices=[f.name for f in formats], help="default: detected from the path")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--report", type=Path, help="write the JSON report here (and markdown next to it)")
    p.add_argument("--junit-xml", type=Path, metavar="PATH",
                   help="also write one JUnit testcase per check (failures carry the value and the limit)")
    p.add_argument("--require-exact", action="store_true", help="fail when the merge rounded zero-points")
    p.add_argument("--weights-only", action="store_true", help="skip the runtime level")
    p.add_argument("--runtime-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="stop the runtime check after SECONDS and fail it as a hang (default 3600)")
    p.set_defaults(func=verbs.cmd_verify)

    p = verb("inspect", help="describe a checkpoint, adapter, ONNX or GGUF artifact")
    p.add_argument("path", type=Path)
    p.set_defaults(func=verbs.cmd_inspect)

    p = verb("demo", help="the whole path on the SmolLM2-135M fixture, with a before/after table")
    p.add_argument("--workdir", type=Path, default=Path("qalora-demo"))
    p.add_argument("--steps", type=int, default=40,
                   help="training steps (integer-zero training learns the task in ~30-40)")
    p.add_argument("--formats", default="gptq", help="comma-separated export formats to merge and verify")
    p.add_argument("--held-out-examples", type=int, default=32,
                   help="held-out examples each table row is scored on (fewer: quicker, noisier)")
    p.set_defaults(func=verbs.cmd_demo)

    p = verb("fetch-fixture", help="fetch the SmolLM2 fixture into the cache and print its path")
    p.add_argument("--llama-cpp-source", action="store_true",
                   help="also fetch llama.cpp's converter, vocab files and chat templates (the "
                        "llama-cpp-python sdist, about 75 MB; the model-family tests use them) and print their path")
    p.set_defaults(func=verbs.cmd_fetch_fixture)
    return parser
