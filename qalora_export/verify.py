"""The verification gate (DESIGN.md §4): an artifact against the unmerged model, two levels.

1. Weights: every quantized tensor decoded by the format's own reader (``read_weights``) is
   compared with (a) what the merge declared it holds (the exact fold, or its announced rounding)
   — within the format's ``WEIGHT_TOLERANCE`` — and (b) the unmerged effective weight
   ``W_hat + dW``, reported per layer.
2. Runtime: the format's ``verify_runtime`` loads the artifact in its real runtime and compares
   logits and greedy continuations with the unmerged PyTorch model, judged against a noise floor
   measured in the same run. It runs in a child process (``runtimes.isolation``): a runtime that
   crashes or hangs is a failed check naming the runtime, the signal and the likely fix, and the
   report is still written.

The report is one JSON object (plus a markdown rendering); ``passed`` is False on any failure
and the CLI then exits non-zero. A tolerance failure is a failure, never a warning.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from qalora_export.errors import ConfigError, RuntimeCrashError
from qalora_export.extras import require
from qalora_export.checkpoint.merged_view import MergedModel
from qalora_export.runtimes.isolation import call_isolated
from qalora_export.checkpoint.tokenizer_check import check_tokenizer_matches
from qalora_export.core.weight_rows import WeightRows, row_blocks

# A runtime check that runs longer than this is taken for a hang (the fixture's GPTQ check, the
# slowest, takes a few minutes on 2 cores); verify --runtime-timeout changes it.
DEFAULT_RUNTIME_TIMEOUT_S = 3600.0

FIXED_PROMPTS = (
    "What is the capital of France?",
    "Convert the sentence to record code.\n\nAnna is 29 years old and lives in Rome.",
    "Write one sentence about the sea.",
    "List three prime numbers.",
)


def detect_format(path: Path) -> str:
    """``gptq`` for a checkpoint directory, ``onnx`` for a directory with model.onnx, ``gguf`` for a file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx"
    if path.is_dir() and (path / "config.json").is_file():
        return "gptq"
    raise ConfigError(f"cannot tell the format of {path}: expected a GPTQ checkpoint directory, "
                      f"an ONNX directory with model.onnx, or a .gguf file")


def fixed_prompts(tokenizer_dir: Path, max_tokens: int = 48) -> list[list[int]]:
    """The fixed verification prompts as token ids (chat template when the tokenizer has one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = []
    for text in FIXED_PROMPTS:
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok(text)["input_ids"]
        out.append(list(ids)[:max_tokens])
    return out


def _decoded_layers(converter, artifact: Path) -> Iterator[tuple[str, WeightRows]]:
    """The artifact's layers as :class:`WeightRows` (decoded a row block at a time when the
    converter's reader can: ``read_weight_rows``)."""
    if hasattr(converter, "read_weight_rows"):
        yield from converter.read_weight_rows(artifact)
    else:
        for name, weight in converter.read_weights(artifact):
            yield name, WeightRows.of(weight)


def _declared_rows(converter, model: MergedModel, name: str, meta: dict) -> Callable[[slice], torch.Tensor]:
    """``rows -> float64`` of what the artifact declares it holds for ``name`` (the fold, rounded as
    its metadata says): the converter's ``declared_layer`` record, dequantized a block at a time."""
    if hasattr(converter, "declared_layer"):
        layer = converter.declared_layer(model, name, meta)
    elif hasattr(converter, "declared_weight"):
        whole = converter.declared_weight(model, name, meta)
        return lambda rows: whole[rows]
    else:
        layer = model.read_layer(name)[0]
    return lambda rows: layer.dequantize(torch.float64, rows)


def _max(a: float, b: float) -> float:
    """``max`` that keeps a NaN (as ``tensor.max()`` over the whole layer would)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def weight_report(model: MergedModel, converter, artifact: Path) -> dict:
    """Level 1: decode the artifact and compare with the declared and the unmerged weights.

    Each layer is compared a row block at a time (:mod:`weight_rows`): decoded, declared and
    reference rows are float64 blocks of a few MB, never whole layers (1.9 GB each at 70B).
    """
    meta = converter.merge_metadata(artifact) if hasattr(converter, "merge_metadata") else {}
    tolerance = converter.WEIGHT_TOLERANCE
    layers = {}
    passed = True
    seen = set()
    for name, decoded in _decoded_layers(converter, artifact):
        seen.add(name)
        if name not in model.quantized_modules:
            layers[name] = {"passed": False, "error": "not a quantized layer of the base"}
            passed = False
            continue
        shape = model.layer_shape(name)
        if tuple(decoded.shape) != shape:
            layers[name] = {"passed": False, "error": f"shape {tuple(decoded.shape)} != {shape}"}
            passed = False
            continue
        reference_rows = model.reference_weight_rows(name)
        declared_rows = _declared_rows(converter, model, name, meta)
        w_max = err_declared = err_unmerged = 0.0
        for start, stop in row_blocks(*shape):
            rows = slice(start, stop)
            block, reference = decoded.rows(start, stop).to(torch.float64), reference_rows(rows)
            w_max = _max(w_max, float(reference.abs().max()))
            err_declared = _max(err_declared, float((block - declared_rows(rows)).abs().max()))
            err_unmerged = _max(err_unmerged, float((block - reference).abs().max()))
            del block, reference
        scale = w_max or 1.0
        allowed = tolerance(model, name) if callable(tolerance) else tolerance * scale
        ok = err_declared <= allowed
        passed &= ok
        layers[name] = {"max_abs_vs_declared": err_declared, "allowed": allowed,
                        "max_abs_vs_unmerged": err_unmerged, "rel_vs_unmerged": err_unmerged / scale,
                        "passed": ok}
    missing = sorted(set(model.quantized_modules) - seen)
    if missing:
        passed = False
    worst = max(layers.values(), key=lambda r: r.get("rel_vs_unmerged", float("inf")), default={})
    return {
        "passed": passed,
        "layers_checked": len(layers),
        "missing_layers": missing,
        "max_abs_vs_declared": max((r.get("max_abs_vs_declared", float("inf")) for r in layers.values()), default=0.0),
        "max_abs_vs_unmerged": max((r.get("max_abs_vs_unmerged", float("inf")) for r in layers.values()), default=0.0),
        "max_rel_vs_unmerged": worst.get("rel_vs_unmerged", 0.0),
        "merge": meta,
        "per_layer": layers,
    }


def verify_artifact(artifact: Path, base_dir: Path, adapter_dir: Optional[Path] = None,
                    pooling: Optional[str] = None, device: str = "cpu", fmt: Optional[str] = None,
                    require_exact: bool = False, runtime: bool = True,
                    progress: Optional[Callable[[str], None]] = None,
                    runtime_timeout: Optional[float] = DEFAULT_RUNTIME_TIMEOUT_S) -> dict:
    """Run the gate on ``artifact``; returns the report (``report["passed"]``).

    The runtime level runs in a child process that is stopped after ``runtime_timeout`` seconds
    (None: no limit); a crash or a hang there fails the report (``report["runtime"]["error"]``).

    Raises:
        MissingExtraError: ``runtime`` is asked and the format's runtime is not installed.
    """
    from qalora_export.formats import get_converter

    artifact = Path(artifact)
    fmt = fmt or detect_format(artifact)
    converter = get_converter(fmt)
    if runtime:
        require(converter.RUNTIME_REQUIRES, f"verify of a {fmt} artifact in {converter.RUNTIME.name}")
    model = MergedModel.open(base_dir, adapter_dir, pooling=pooling)
    if runtime:  # the runtimes tokenize with these: ids beyond the embedding fail deep inside them
        check_tokenizer_matches(model.base)
        if artifact.is_dir():
            check_tokenizer_matches(model.base, artifact)
    if progress:
        progress("weights")
    weights = weight_report(model, converter, artifact)
    report = {
        "artifact": str(artifact),
        "format": fmt,
        "base": str(base_dir),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "device": device,
        "weights": weights,
    }
    passed = weights["passed"]
    merge = weights.get("merge") or {}
    if require_exact and (merge.get("exact") is False):
        report["require_exact"] = {"passed": False,
                                   "reason": f"the merge rounded {merge.get('zeros_moved')} zero-points"}
        passed = False
    if runtime:
        if progress:
            progress("runtime")
        prompts = fixed_prompts(model.tokenizer_dir)
        try:
            result = call_isolated(f"{__name__}:runtime_level",
                                   {"fmt": fmt, "artifact": artifact, "base_dir": base_dir, "adapter_dir": adapter_dir,
                                    "pooling": pooling, "prompts": prompts, "device": device},
                                   converter.RUNTIME, timeout=runtime_timeout)
        except RuntimeCrashError as exc:
            result = {"runtime": converter.RUNTIME.name, "passed": False, "error": str(exc), "cause": exc.cause}
        report["runtime"] = result
        passed = passed and bool(result.get("passed"))
    report["passed"] = bool(passed)
    return report


def runtime_level(fmt: str, artifact: str, base_dir: str, adapter_dir: Optional[str], pooling: Optional[str],
                  prompts: list[list[int]], device: str) -> dict:
    """Level 2, as run in verify's child process: the format's ``verify_runtime`` on ``artifact``."""
    from qalora_export.formats import get_converter

    converter = get_converter(fmt)
    model = MergedModel.open(base_dir, adapter_dir, pooling=pooling)
    with tempfile.TemporaryDirectory(prefix="qalora-verify-") as workdir:
        kwargs = {"device": device} if fmt == "gptq" else {}
        return converter.verify_runtime(model, Path(artifact), prompts, Path(workdir), **kwargs)


def write_report(report: dict, path: Path) -> tuple[Path, Path]:
    """Write ``report`` as JSON at ``path`` and as markdown next to it (``.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    md = path.with_suffix(".md")
    md.write_text(render_markdown(report))
    return path, md


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "n/a" if value is None else str(value)


def render_markdown(report: dict) -> str:
    """A short human summary of a verify report."""
    w = report["weights"]
    lines = [
        f"# verify: {report['artifact']} ({report['format']})",
        "",
        f"**{'PASSED' if report['passed'] else 'FAILED'}** — base `{report['base']}`, adapter `{report['adapter']}`",
        "",
        "| level | check | value | passed |",
        "|---|---|---|---|",
        f"| weights | max abs vs declared merge ({w['layers_checked']} layers) | {w['max_abs_vs_declared']:.3e} | {w['passed']} |",
        f"| weights | max abs vs unmerged (W_hat + dW) | {w['max_abs_vs_unmerged']:.3e} | (reported) |",
    ]
    rt = report.get("runtime")
    if rt:
        lines.append(f"| runtime | {rt.get('runtime', report['format'])} | | {rt.get('passed')} |")
        if rt.get("error"):
            lines.append(f"\nRuntime error ({rt.get('cause')}): {rt['error']}\n")
        for key, value in rt.items():
            if isinstance(value, dict) and "mean_kl" in value:
                figures = " / ".join(_fmt(value.get(k)) for k in ("max_abs_logit_diff", "mean_kl", "top1_agreement"))
                lines.append(f"| runtime | {key}: max abs dlogit / mean KL / top-1 | {figures} | "
                             f"{value.get('passed', '(reference)')} |")
        for name, ok in (rt.get("checks") or {}).items():
            lines.append(f"| runtime | check {name} | | {ok} |")
        if rt.get("rule"):
            lines.append(f"\nRule: {rt['rule']}\n")
    return "\n".join(lines) + "\n"
