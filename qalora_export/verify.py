"""The verification gate (docs/design.md §4): an artifact against the unmerged model, two levels.

1. Weights: every quantized tensor decoded by the format's own reader (``read_weight_rows``) is
   compared with (a) what the merge declared it holds (the exact fold, or its announced rounding)
   — within the format's ``weight_tolerance`` — and (b) the unmerged effective weight
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
from typing import Callable, Optional

import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.checkpoint.tokenizer_check import check_tokenizer_matches
from qalora_export.core.weight_rows import row_blocks
from qalora_export.errors import RuntimeCrashError
from qalora_export.extras import require
from qalora_export.formats import detect_format, get_format
from qalora_export.formats.protocol import Format
from qalora_export.runtimes.isolation import call_isolated

# A runtime check that runs longer than this is taken for a hang (the fixture's GPTQ check, the
# slowest, takes a few minutes on 2 cores); verify --runtime-timeout changes it.
DEFAULT_RUNTIME_TIMEOUT_S = 3600.0

FIXED_PROMPTS = (
    "What is the capital of France?",
    "Convert the sentence to record code.\n\nAnna is 29 years old and lives in Rome.",
    "Write one sentence about the sea.",
    "List three prime numbers.",
)


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


def _declared_rows(fmt: Format, model: MergedView, name: str, meta: dict) -> Callable[[slice], torch.Tensor]:
    """``rows -> float64`` of what the artifact declares it holds for ``name`` (the fold, rounded as
    its metadata says): the format's ``declared_layer`` record, dequantized a block at a time."""
    layer = fmt.declared_layer(model, name, meta)
    return lambda rows: layer.dequantize(torch.float64, rows)


def _max(a: float, b: float) -> float:
    """``max`` that keeps a NaN (as ``tensor.max()`` over the whole layer would)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def weight_report(model: MergedView, fmt: Format, artifact: Path) -> dict:
    """Level 1: decode the artifact and compare with the declared and the unmerged weights.

    Each layer is compared a row block at a time (:mod:`weight_rows`): decoded, declared and
    reference rows are float64 blocks of a few MB, never whole layers (1.9 GB each at 70B).
    """
    meta = fmt.merge_metadata(artifact)
    tolerance = fmt.weight_tolerance
    layers = {}
    passed = True
    seen = set()
    for name, decoded in fmt.read_weight_rows(artifact):
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
        declared_rows = _declared_rows(fmt, model, name, meta)
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
    artifact = Path(artifact)
    target = get_format(fmt) if fmt else detect_format(artifact)
    if runtime:
        require(target.runtime_requires, f"verify of a {target.name} artifact in {target.runtime.name}")
    model = MergedView.open(base_dir, adapter_dir, pooling=pooling)
    if runtime:  # the runtimes tokenize with these: ids beyond the embedding fail deep inside them
        check_tokenizer_matches(model.base)
        if artifact.is_dir():
            check_tokenizer_matches(model.base, artifact)
    if progress:
        progress("weights")
    weights = weight_report(model, target, artifact)
    report = {
        "artifact": str(artifact),
        "format": target.name,
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
                                   {"fmt": target.name, "artifact": artifact, "base_dir": base_dir, "adapter_dir": adapter_dir,
                                    "pooling": pooling, "prompts": prompts, "device": device},
                                   target.runtime, timeout=runtime_timeout)
        except RuntimeCrashError as exc:
            result = {"runtime": target.runtime.name, "passed": False, "error": str(exc), "cause": exc.cause}
        report["runtime"] = result
        passed = passed and bool(result.get("passed"))
    report["passed"] = bool(passed)
    return report


def runtime_level(fmt: str, artifact: str, base_dir: str, adapter_dir: Optional[str], pooling: Optional[str],
                  prompts: list[list[int]], device: str) -> dict:
    """Level 2, as run in verify's child process: the format's ``verify_runtime`` on ``artifact``."""
    model = MergedView.open(base_dir, adapter_dir, pooling=pooling)
    with tempfile.TemporaryDirectory(prefix="qalora-verify-") as workdir:
        return get_format(fmt).verify_runtime(model, Path(artifact), prompts, Path(workdir), device)


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


def _comparisons(runtime: dict) -> list[tuple[str, dict]]:
    """The logit comparisons of a runtime report (dicts with ``mean_kl``), one level of nesting deep
    (e.g. ``as_stored.floor``), with their names."""
    found = []
    for key, value in runtime.items():
        if isinstance(value, dict) and "mean_kl" in value:
            found.append((key, value))
        elif isinstance(value, dict):
            found += [(f"{key}.{k}", v) for k, v in value.items() if isinstance(v, dict) and "mean_kl" in v]
    return found


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
        for name, value in _comparisons(rt):
            figures = " / ".join(_fmt(value.get(k)) for k in ("max_abs_logit_diff", "mean_kl", "top1_agreement"))
            lines.append(f"| runtime | {name}: max abs dlogit / mean KL / top-1 | {figures} | "
                         f"{value.get('passed', '(reference)')} |")
        for name, ok in (rt.get("checks") or {}).items():
            lines.append(f"| runtime | check {name} | | {ok} |")
        rules = [rt.get("rule")] + [v.get("rule") for v in rt.values() if isinstance(v, dict)]
        for rule in filter(None, rules):
            lines.append(f"\nRule: {rule}\n")
    return "\n".join(lines) + "\n"
