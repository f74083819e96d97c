"""The ``qalora-export`` command line. The only module that prints or exits.

Exit codes: 0 success; 1 verification failed (the gate); 2 bad input or a refused operation
(a typed :class:`QALoRAExportError`, message on stderr).

The console is quiet by default (:mod:`.console`): our lines, progress bars and tables on the
terminal, third-party output (GPTQModel, transformers, torch.compile, native runtimes) in a log
file whose path is printed at the end; ``-v`` shows it live instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from qalora_export.console import Console, default_log_path, quiet_console
from qalora_export.errors import QALoRAExportError

EXIT_OK, EXIT_VERIFY_FAILED, EXIT_BAD_INPUT = 0, 1, 2

# The terminal while a command runs (set by main); sys.stdout / sys.stderr then lead to the log.
_CONSOLE: Optional[Console] = None


def _out():
    return _CONSOLE.out if _CONSOLE is not None else sys.stdout


def _err():
    return _CONSOLE.err if _CONSOLE is not None else sys.stderr


def _note(msg: str) -> None:
    """A progress or status line of ours (stderr side of the terminal)."""
    print(msg, file=_err(), flush=True)


# --------------------------------------------------------------------------------------- helpers


class _Progress:
    """A tqdm bar fed by name callbacks (or nothing when stderr is not a terminal and CI is set)."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="layer", file=_err(), leave=False,
                        disable=None if not os.environ.get("CI") else True)

    def __call__(self, name: str) -> None:
        self.bar.set_postfix_str(name.rsplit(".", 3)[-3] if "." in name else name, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _layer_count(base_dir: Path) -> int:
    from qalora_export.checkpoint.gptq import GPTQCheckpoint

    return len(GPTQCheckpoint(base_dir).quantized_modules)


def _say(msg: str = "") -> None:
    print(msg, file=_out(), flush=True)


def _print_summary(title: str, summary: dict, skip: Sequence[str] = ("per_layer",)) -> None:
    _say(title)
    for key, value in summary.items():
        if key in skip:
            continue
        if isinstance(value, float):
            value = f"{value:.6g}"
        _say(f"  {key:24s} {value}")


# --------------------------------------------------------------------------------------- verbs


def cmd_quantize(args) -> int:
    from qalora_export.quantization.quantize import quantize_model

    calibration = None
    if args.calibration_file is not None:
        from qalora_export.errors import ConfigError

        try:
            calibration = args.calibration_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--calibration-file {args.calibration_file}: cannot read it as UTF-8 text ({exc})") from exc
    bar = _Progress(total=0, desc="quantize")
    t0 = time.time()
    try:
        summary = quantize_model(args.model, args.output, args.bits, args.group_size, args.checkpoint_format,
                                 overwrite=args.overwrite, progress=bar, method=args.method,
                                 act_order=args.act_order, calibration=calibration,
                                 n_samples=args.calibration_samples, seq_len=args.calibration_seq_len,
                                 damp=args.damp, device=args.device, calibration_dtype=args.calibration_dtype,
                                 group_aware_order=args.group_aware_order, true_sequential=args.true_sequential)
    finally:
        bar.close()
    _print_summary(f"quantized {args.model} -> {args.output} in {time.time() - t0:.1f}s", summary.__dict__)
    return EXIT_OK


def cmd_train(args) -> int:
    from qalora_export.training.train import TrainConfig, train_adapter
    from qalora_export.training.distributed import launcher_rank
    from qalora_export.training.metrics_log import default_metrics_path

    config = TrainConfig(rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         max_length=args.max_length, seed=args.seed, held_out=args.held_out,
                         on_overlong=args.on_overlong, integer_zeros=args.integer_zeros,
                         checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                         grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing)
    from tqdm import tqdm

    main_process = launcher_rank() == 0  # under torchrun / accelerate launch only rank 0 reports
    bar = tqdm(total=args.steps, desc="train", unit="step", file=_err(), leave=False, disable=not main_process)

    def on_step(row: dict) -> None:
        bar.set_postfix_str(f"loss {row['loss']:.4f}, {row['tokens_per_s']:.0f} tok/s", refresh=False)
        bar.update(row["step"] - bar.n)  # a resumed run starts past 0

    metrics = args.metrics_file if args.metrics_file is not None else default_metrics_path(args.output)
    try:
        result = train_adapter(args.base, args.data, args.output, config, overwrite=args.overwrite,
                               on_step=on_step, device=args.device, resume=args.resume, metrics_path=metrics,
                               tensorboard_dir=args.tensorboard)
    finally:
        bar.close()
    if not main_process:
        return EXIT_OK
    summary = {k: v for k, v in result.__dict__.items() if k != "losses"}
    _print_summary(f"trained QA-LoRA adapter -> {args.output}", summary)
    for split, stats in result.dataset_stats.items():  # never silently: what --max-length cost
        dropped, truncated, empty = (stats.get(k, 0) for k in ("dropped_overlong", "truncated", "dropped_no_response"))
        if dropped or truncated or empty:
            _say(f"note: {split}: {dropped} example(s) longer than --max-length {args.max_length} dropped, "
                 f"{truncated} truncated (--on-overlong {args.on_overlong})"
                 + (f", {empty} dropped with no response token left" if empty else ""))
    return EXIT_OK


def _export(fmt: str, base: Path, adapter: Optional[Path], output: Path, args) -> dict:
    from qalora_export.formats import get_converter
    from qalora_export.extras import require
    from qalora_export.checkpoint.merged_view import MergedModel

    converter = get_converter(fmt)
    require(converter.EXPORT_REQUIRES, f"export to {fmt}")
    # every format checks the adapter's base fingerprint in a background thread while it writes
    # (inside its atomic output: a mismatch leaves nothing)
    model = MergedModel.open(base, adapter, pooling=getattr(args, "pooling", None), defer_fingerprint=True)
    options: dict = {"overwrite": args.overwrite}
    if fmt == "gptq":
        options.update(checkpoint_format=args.checkpoint_format, require_exact=args.require_exact,
                       clamp_zeros=args.clamp_zeros, max_shard_bytes=args.max_shard_size)
    elif fmt == "onnx":
        options.update(zero_points=args.zero_points, accuracy_level=args.accuracy_level, dtype=args.dtype)
        if args.allow_rounding:
            options["allow_rounding"] = True
    elif fmt == "gguf":
        options.update(embeddings=args.embeddings, split_max_bytes=args.split_max_size)
    bar = _Progress(total=len(model.quantized_modules), desc=f"merge -> {fmt}")
    try:
        if fmt == "gptq":
            options["progress"] = bar
        with _cyclic_gc_paused():
            return converter.export(model, output, **options)
    finally:
        bar.close()


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: an export's arrays are freed by reference counting,
    and the collector's passes over the many small objects imported (transformers, onnx) took
    3-5% of a 7B export (perf)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def cmd_merge(args) -> int:
    t0 = time.time()
    summary = _export(args.to, args.base, args.adapter, args.output, args)
    _print_summary(f"merged {args.adapter} into {args.base} -> {args.output} ({args.to}) in {time.time() - t0:.1f}s",
                   summary)
    if summary.get("exact") is False:
        _say(f"note: {summary.get('zeros_moved')} of {summary.get('zeros_total')} zero-points were rounded to "
             f"integers (largest change {summary.get('max_zero_change', 0):.3f} code units); the artifact is not "
             f"bit-exact to the unmerged model. Use --require-exact to refuse, or export onnx/gguf (float zeros).")
    return EXIT_OK


def _cmd_format(fmt: str) -> Callable:
    def run(args) -> int:
        t0 = time.time()
        summary = _export(fmt, args.base, args.adapter, args.output, args)
        _print_summary(f"exported {args.base}{' + ' + str(args.adapter) if args.adapter else ''} -> {args.output} "
                       f"({fmt}) in {time.time() - t0:.1f}s", summary)
        return EXIT_OK
    return run


def cmd_verify(args) -> int:
    from qalora_export.verify import render_markdown, verify_artifact, write_report

    t0 = time.time()
    report = verify_artifact(args.artifact, args.base, args.adapter, pooling=args.pooling, device=args.device,
                             fmt=args.format, require_exact=args.require_exact, runtime=not args.weights_only,
                             progress=lambda stage: _note(f"verify: {stage} level..."),
                             runtime_timeout=args.runtime_timeout)
    report["seconds"] = round(time.time() - t0, 1)
    if args.report:
        json_path, md_path = write_report(report, args.report)
        _say(f"report: {json_path} and {md_path}")
    _say(render_markdown(report))
    return EXIT_OK if report["passed"] else EXIT_VERIFY_FAILED


def cmd_inspect(args) -> int:
    from qalora_export.inspect_artifact import inspect_path

    info = inspect_path(args.path)
    _say(json.dumps(info, indent=2, default=str))
    return EXIT_OK


def cmd_demo(args) -> int:
    from qalora_export.demo import format_demo_table, run_demo

    report = run_demo(Path(args.workdir), steps=args.steps, formats=args.formats.split(","),
                      overwrite=True, log=_note, held_out_examples=args.held_out_examples)
    _say(format_demo_table(report))
    return EXIT_OK if report["passed"] else EXIT_VERIFY_FAILED


def cmd_fetch_fixture(args) -> int:
    from qalora_export.fixtures.smollm2 import smollm2_gguf_path

    _say(str(smollm2_gguf_path()))
    return EXIT_OK


# --------------------------------------------------------------------------------------- parser

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _byte_size(text: str) -> int:
    """``5GB`` / ``500MiB`` / ``123456`` -> bytes (argparse type; decimal and binary units)."""
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    unit = value[len(number):]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MiB or a byte count") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be positive")
    return size



def _add_export_options(p: argparse.ArgumentParser, fmt: Optional[str]) -> None:
    p.add_argument("-o", "--output", type=Path, required=True, help="output path (directory; a .gguf file for gguf)")
    p.add_argument("--pooling", choices=("peft", "mean", "sum"),
                   help="pooling convention of an adapter that does not record it (official QA-LoRA: mean; "
                        "the paper's Algorithm 1: sum); PEFT and qalora-export adapters record it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    if fmt in (None, "gptq"):
        p.add_argument("--checkpoint-format", choices=("gptq", "gptq_v2"),
                       help="gptq: v1 (stores zero-1); gptq_v2: true zeros. Default: the base's")
        p.add_argument("--require-exact", action="store_true",
                       help="refuse to round fractional folded zero-points (GPTQ stores integers)")
        p.add_argument("--clamp-zeros", action="store_true",
                       help="clamp folded zeros outside the format's range instead of refusing (reported)")
        p.add_argument("--max-shard-size", type=_byte_size, default="2GiB", metavar="SIZE",
                       help="largest safetensors shard of the GPTQ output, e.g. 5GB, 500MiB or bytes "
                            "(default 2GiB; a bigger single tensor gets a shard of its own)")
    if fmt in (None, "onnx"):
        p.add_argument("--zero-points", choices=("float", "split", "uint8"), default="float",
                       help="float: exact, onnxruntime's slow CPU path; split: exact, uint8 integer part plus a "
                            "per-group correction (fast path); uint8: needs integral zeros (or --allow-rounding)")
        p.add_argument("--accuracy-level", type=int, choices=range(0, 5), default=0,
                       help="MatMulNBits accuracy_level (4 = int8 activations, faster, not exact)")
        p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="activation/scale dtype")
        p.add_argument("--allow-rounding", action="store_true",
                       help="with --zero-points uint8: round fractional zeros (reported)")
    if fmt in (None, "gguf"):
        p.add_argument("--embeddings", choices=("f16", "f32", "q8_0"), default="f16",
                       help="type of the token-embedding tensor in the GGUF")
        p.add_argument("--split-max-size", type=_byte_size, default=None, metavar="SIZE",
                       help="split the GGUF into files of at most SIZE of tensors (e.g. 2GB), named "
                            "<name>-00001-of-0000N.gguf like llama.cpp's gguf-split; llama.cpp loads the first")


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
                    "export (AutoGPTQ, ONNX MatMulNBits, GGUF) and verify in the real runtimes.")
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
    p.set_defaults(func=cmd_quantize)

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
    p.set_defaults(func=cmd_train)

    p = verb("merge", help="fold an adapter into the zero-points and export")
    p.add_argument("base", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("--to", choices=("gptq", "onnx", "gguf"), default="gptq")
    _add_export_options(p, None)
    p.set_defaults(func=cmd_merge)

    for fmt, help_text in (("onnx", "export ONNX with com.microsoft.MatMulNBits (merging an adapter if given)"),
                           ("gguf", "export a llama.cpp GGUF with Q4_1 blocks (merging an adapter if given)")):
        p = verb(fmt, help=help_text)
        p.add_argument("base", type=Path, help="quantized base, or an already merged GPTQ checkpoint")
        p.add_argument("adapter", type=Path, nargs="?")
        _add_export_options(p, fmt)
        p.set_defaults(func=_cmd_format(fmt))

    p = verb("verify", help="check an artifact against the unmerged model (exit 1 on failure)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--adapter", type=Path)
    p.add_argument("--pooling", choices=("peft", "mean", "sum"))
    p.add_argument("--format", choices=("gptq", "onnx", "gguf"), help="default: detected from the path")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--report", type=Path, help="write the JSON report here (and markdown next to it)")
    p.add_argument("--require-exact", action="store_true", help="fail when the merge rounded zero-points")
    p.add_argument("--weights-only", action="store_true", help="skip the runtime level")
    p.add_argument("--runtime-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="stop the runtime check after SECONDS and fail it as a hang (default 3600)")
    p.set_defaults(func=cmd_verify)

    p = verb("inspect", help="describe a checkpoint, adapter, ONNX or GGUF artifact")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_inspect)

    p = verb("demo", help="the whole path on the SmolLM2-135M fixture, with a before/after table")
    p.add_argument("--workdir", type=Path, default=Path("qalora-demo"))
    p.add_argument("--steps", type=int, default=40,
                   help="training steps (integer-zero training learns the task in ~30-40)")
    p.add_argument("--formats", default="gptq", help="comma-separated export formats to merge and verify")
    p.add_argument("--held-out-examples", type=int, default=32,
                   help="held-out examples each table row is scored on (fewer: quicker, noisier)")
    p.set_defaults(func=cmd_demo)

    p = verb("fetch-fixture", help="fetch the SmolLM2 fixture into the cache and print its path")
    p.set_defaults(func=cmd_fetch_fixture)
    return parser


def _log_path(args) -> Path:
    if args.log_file is not None:
        return args.log_file
    if args.command == "demo":
        return Path(args.workdir) / "demo.log"
    return default_log_path(args.command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    global _CONSOLE
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    with quiet_console(_log_path(args), verbose=args.verbose) as console:
        _CONSOLE = console
        try:
            return _run(args)
        finally:
            _CONSOLE = None
            log = console.log_path
            if log is not None and log.is_file() and log.stat().st_size > 0:
                print(f"log: {log} (third-party messages; -v shows them live)", file=console.err, flush=True)


def _run(args) -> int:
    try:
        return args.func(args)
    except QALoRAExportError as exc:
        _note(f"qalora-export {args.command}: error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _note("interrupted; no partial output was left")
        return 130


if __name__ == "__main__":
    sys.exit(main())
