"""The verbs of the command line: each parses nothing, runs one job and prints what it did."""

from __future__ import annotations

import contextlib
import gc
import json
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from qalora_export.cli.terminal import EXIT_OK, EXIT_VERIFY_FAILED, Progress, err, note, print_summary, say


def cmd_quantize(args) -> int:
    from qalora_export.quantization.quantize import quantize_model

    calibration = None
    if args.calibration_file is not None:
        from qalora_export.errors import ConfigError

        try:
            calibration = args.calibration_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--calibration-file {args.calibration_file}: cannot read it as UTF-8 text ({exc})") from exc
    bar = Progress(total=0, desc="quantize")
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
    print_summary(f"quantized {args.model} -> {args.output} in {time.time() - t0:.1f}s", summary.__dict__)
    return EXIT_OK


def cmd_train(args) -> int:
    from qalora_export.training.config import TrainConfig
    from qalora_export.training.distributed import launcher_rank
    from qalora_export.training.metrics_log import default_metrics_path
    from qalora_export.training.train import train_adapter

    config = TrainConfig(rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         max_length=args.max_length, seed=args.seed, held_out=args.held_out,
                         on_overlong=args.on_overlong, integer_zeros=args.integer_zeros,
                         checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                         grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing)
    from tqdm import tqdm

    main_process = launcher_rank() == 0  # under torchrun / accelerate launch only rank 0 reports
    bar = tqdm(total=args.steps, desc="train", unit="step", file=err(), leave=False, disable=not main_process)

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
    print_summary(f"trained QA-LoRA adapter -> {args.output}", summary)
    for split, stats in result.dataset_stats.items():  # never silently: what --max-length cost
        dropped, truncated, empty = (stats.get(k, 0) for k in ("dropped_overlong", "truncated", "dropped_no_response"))
        if dropped or truncated or empty:
            say(f"note: {split}: {dropped} example(s) longer than --max-length {args.max_length} dropped, "
                 f"{truncated} truncated (--on-overlong {args.on_overlong})"
                 + (f", {empty} dropped with no response token left" if empty else ""))
    return EXIT_OK


def _export(fmt_name: str, base: Path, adapter: Optional[Path], output: Path, args) -> dict:
    """Export with the handoff bundle (qalora_export/bundle): the format's files, verify (the runtime
    level unless --no-verify), model card, reference and SHA256SUMS, moved into place together."""
    from qalora_export.bundle.write import export_with_bundle
    from qalora_export.formats import get_format
    from qalora_export.storage.memory import fix_malloc_mmap_threshold

    fix_malloc_mmap_threshold()  # per-layer blocks must not fragment the heap (storage/memory.py)
    fmt = get_format(fmt_name)
    bar = Progress(total=0, desc=f"merge -> {fmt.name}")
    try:
        options = {"overwrite": args.overwrite, **fmt.options_from_args(args, bar)}
        with _cyclic_gc_paused():
            summary = export_with_bundle(fmt_name, base, adapter, output, options, pooling=getattr(args, "pooling", None),
                                         runtime=args.verify, stage=lambda s: note(f"{fmt.name}: {s}..."))
    finally:
        bar.close()
    report = summary.pop("verify")
    summary["verify"] = {"passed": report["passed"], "runtime_level": report.get("runtime") is not None}
    summary["exit_code"] = EXIT_OK if report["passed"] else EXIT_VERIFY_FAILED
    if not report["passed"]:
        from qalora_export.verify import render_markdown

        say(render_markdown(report))
    return summary


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
    code = summary.pop("exit_code")
    print_summary(f"merged {args.adapter} into {args.base} -> {args.output} ({args.to}) in {time.time() - t0:.1f}s",
                  summary)
    if summary.get("exact") is False:
        from qalora_export.formats import all_formats

        exact = "/".join(f.name for f in all_formats() if f.holds_float_zeros)
        say(f"note: {summary.get('zeros_moved')} of {summary.get('zeros_total')} zero-points were rounded to "
            f"integers (largest change {summary.get('max_zero_change', 0):.3f} code units); the artifact is not "
            f"bit-exact to the unmerged model. Use --require-exact to refuse, or export {exact} (float zeros).")
    return code


def cmd_format(fmt: str) -> Callable:
    """The verb ``qalora-export FMT BASE [ADAPTER]`` of a format with a verb of its own."""
    def run(args) -> int:
        t0 = time.time()
        summary = _export(fmt, args.base, args.adapter, args.output, args)
        code = summary.pop("exit_code")
        print_summary(f"exported {args.base}{' + ' + str(args.adapter) if args.adapter else ''} -> {args.output} "
                      f"({fmt}) in {time.time() - t0:.1f}s", summary)
        return code
    return run


def cmd_verify(args) -> int:
    if args.base is None:
        return _verify_bundle(args)
    from qalora_export.verify import render_markdown, verify_artifact, write_report

    t0 = time.time()
    report = verify_artifact(args.artifact, args.base, args.adapter, pooling=args.pooling, device=args.device,
                             fmt=args.format, require_exact=args.require_exact, runtime=not args.weights_only,
                             progress=lambda stage: note(f"verify: {stage} level..."),
                             runtime_timeout=args.runtime_timeout)
    report["seconds"] = round(time.time() - t0, 1)
    if args.report:
        json_path, md_path = write_report(report, args.report)
        say(f"report: {json_path} and {md_path}")
    if args.junit_xml:
        from qalora_export.bundle.junit import write_junit

        say(f"junit: {write_junit(report, args.junit_xml)}")
    say(render_markdown(report))
    return EXIT_OK if report["passed"] else EXIT_VERIFY_FAILED


def _verify_bundle(args) -> int:
    """``verify ARTIFACT`` without --base: checksums and the runtime against the bundle's reference."""
    from qalora_export.bundle.check import render_bundle_markdown, verify_from_bundle
    from qalora_export.bundle.junit import write_junit
    from qalora_export.errors import ConfigError

    if args.adapter is not None:
        raise ConfigError("--adapter needs --base: pass both to verify against the models, or neither to verify "
                          "against the artifact's handoff bundle")
    t0 = time.time()
    report = verify_from_bundle(args.artifact, args.format)
    report["seconds"] = round(time.time() - t0, 1)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2, default=float) + "\n")
        args.report.with_suffix(".md").write_text(render_bundle_markdown(report))
        say(f"report: {args.report} and {args.report.with_suffix('.md')}")
    if args.junit_xml:
        say(f"junit: {write_junit(report, args.junit_xml)}")
    say(render_bundle_markdown(report))
    return EXIT_OK if report["passed"] else EXIT_VERIFY_FAILED


def cmd_lora(args) -> int:
    """``lora ADAPTER -o DIR [--<format> BASE_ARTIFACT] [--base|--verify BASE]`` (docs/lora.md)."""
    from qalora_export.errors import ConfigError, VerificationError
    from qalora_export.lora_export import export_lora, verify_lora_runtimes

    base = args.verify or args.base
    if args.verify and args.base and args.verify.resolve() != args.base.resolve():
        raise ConfigError(f"--base {args.base} and --verify {args.verify} name different bases; give one")
    attach = getattr(args, "attach", None)
    t0 = time.time()
    try:
        summary = export_lora(args.adapter, args.output, base_dir=base, attach=attach, pooling=args.pooling,
                              dtype=args.dtype, overwrite=args.overwrite)
    except VerificationError as exc:
        note(f"qalora-export lora: verification failed: {exc}")
        return EXIT_VERIFY_FAILED
    print_summary(f"plain LoRA of {args.adapter} -> {args.output} in {time.time() - t0:.1f}s", summary,
                  skip=("weight_check",))
    check = summary["weight_check"]
    say(f"  weight check             {check['layers']} layers, max |dW_plain - dW_qalora| {check['max_abs_error']:.3g} "
        f"(max |dW| {check['max_abs_delta']:.3g}): {'passed' if check['passed'] else 'FAILED'}")
    report = {"export": summary, "passed": check["passed"]}
    if args.verify:
        report["runtime"] = verify_lora_runtimes(args.adapter, args.output, args.verify, attach, pooling=args.pooling,
                                                 timeout=args.runtime_timeout,
                                                 progress=lambda name: note(f"lora: checking in {name}..."))
        report["passed"] = report["passed"] and report["runtime"]["passed"]
        for name, result in report["runtime"].items():
            if isinstance(result, dict):
                say(f"  runtime {name:16s} {'passed' if result.get('passed') else 'FAILED'}"
                    + (f" ({result['error']})" if result.get("error") else ""))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"report: {args.report}")
    return EXIT_OK if report["passed"] else EXIT_VERIFY_FAILED


def cmd_inspect(args) -> int:
    from qalora_export.inspect_artifact import inspect_path

    info = inspect_path(args.path)
    say(json.dumps(info, indent=2, default=str))
    return EXIT_OK


def cmd_demo(args) -> int:
    from qalora_export.demo import format_demo_table, run_demo

    report = run_demo(Path(args.workdir), steps=args.steps, formats=args.formats.split(","),
                      overwrite=True, log=note, held_out_examples=args.held_out_examples)
    say(format_demo_table(report))
    return EXIT_OK if report["passed"] else EXIT_VERIFY_FAILED


def cmd_fetch_fixture(args) -> int:
    from qalora_export.fixtures.smollm2 import smollm2_gguf_path

    say(str(smollm2_gguf_path()))
    if args.llama_cpp_source:
        from qalora_export.fixtures.llama_cpp_source import llama_cpp_source_dir

        say(str(llama_cpp_source_dir()))
    return EXIT_OK
