"""Export with the handoff bundle (docs/design.md §11): the format writes its model files into a
staging directory beside the output, the export is verified there (weight level always, runtime
level unless ``runtime=False``), the bundle is written next to it, and everything moves into place
together (``storage.atomic.atomic_output_group``): an interrupted export leaves nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from qalora_export.bundle import CARD, REFERENCE, SUMS, VERIFY_JSON, bundle_dir
from qalora_export.bundle.card import adapter_facts, base_facts, fold_facts, render_card
from qalora_export.bundle.checksums import write_sums
from qalora_export.bundle.reference import compute_reference, save_reference
from qalora_export.extras import require
from qalora_export.formats import get_format
from qalora_export.formats.protocol import Format
from qalora_export.storage.atomic import atomic_output_group
from qalora_export.verify import DEFAULT_RUNTIME_TIMEOUT_S, fixed_prompts, verify_artifact, write_report


def export_with_bundle(fmt_name: str, base: Path, adapter: Optional[Path], out: Path, options: dict, *,
                       pooling: Optional[str] = None, runtime: bool = True, require_exact: bool = False,
                       runtime_timeout: Optional[float] = DEFAULT_RUNTIME_TIMEOUT_S,
                       stage: Optional[Callable[[str], None]] = None) -> dict:
    """Export ``base`` (+ ``adapter``) as ``fmt_name`` at ``out`` with its bundle.

    Args:
        options: the format's ``export`` keyword arguments (``overwrite`` replaces ``out`` and its bundle).
        runtime: also run verify's runtime level (its floors become the bundle's limits).
        stage: called with "export", "verify", "bundle" as each begins (for the CLI).

    Returns:
        the format's export summary (paths as they end up), plus ``bundle`` (its directory) and
        ``verify`` (the report written to ``verify.json``; ``verify["passed"]``).

    Raises:
        MissingExtraError: the format's writer, or (``runtime``) its runtime, is not installed.
        and what the format's ``export`` raises; nothing is left at ``out`` then.
    """
    from qalora_export.checkpoint.merged_view import MergedView

    fmt = get_format(fmt_name)
    require(fmt.export_requires, f"export to {fmt.name}")
    if runtime:
        require(fmt.runtime_requires, f"verify of the {fmt.name} export in {fmt.runtime.name} (or pass --no-verify)")
    out = Path(out)
    overwrite = bool(options.get("overwrite", False))
    # the base fingerprint is checked in a background thread while the format writes
    model = MergedView.open(base, adapter, pooling=pooling, defer_fingerprint=True)
    with atomic_output_group(out, overwrite) as staging:
        if stage:
            stage("export")
        summary = fmt.export(model, staging / out.name, **{**options, "overwrite": False})
        model_files = _model_files(staging / out.name, summary)
        artifact = staging / out.name if (staging / out.name).is_dir() else model_files[0]
        if stage:
            stage("verify")
        report = verify_artifact(artifact, base, adapter, pooling=pooling, fmt=fmt.name, runtime=runtime,
                                 require_exact=require_exact, runtime_timeout=runtime_timeout)
        report["artifact"] = str(out.parent / artifact.name)
        if stage:
            stage("bundle")
        write_bundle(fmt, model, adapter, artifact, model_files, summary, report)
    moved = _unstaged(summary, staging, out.parent)
    moved["bundle"] = str(bundle_dir(out.parent / artifact.name))
    moved["verify"] = report
    return moved


def write_bundle(fmt: Format, model, adapter_dir: Optional[Path], artifact: Path, model_files: list[Path],
                 summary: dict, report: dict) -> Path:
    """Write the bundle of ``artifact`` (model card, verify report, reference, SHA256SUMS); its directory."""
    bundle = bundle_dir(artifact)
    bundle.mkdir(parents=True, exist_ok=True)
    handoff = fmt.handoff(artifact, report.get("runtime"))
    write_report(report, bundle / VERIFY_JSON)
    if report.get("runtime") is not None:
        # Only with the runtime level: the reference runs the whole unmerged model, which the runtime level
        # does anyway, while --no-verify exports stream one layer at a time (docs/scale.md) and keep no reference.
        prompts = fixed_prompts(model.tokenizer_dir)
        save_reference(compute_reference(model, prompts),
                       {"format": fmt.name, "tokenizer_fingerprint": handoff.tokenizer_fingerprint, "gate": handoff.gate,
                        "near_tie_factor": handoff.near_tie_factor, "runtime": handoff.runtime,
                        "runtime_level_at_export": True},
                       bundle / REFERENCE)
    facts = {"base": base_facts(model), "adapter": adapter_facts(model, adapter_dir), "fold": fold_facts(summary, report)}
    (bundle / CARD).write_text(render_card(fmt, handoff, artifact, facts, report))
    bundle_files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != SUMS)
    write_sums(bundle, list(model_files) + bundle_files, bundle / SUMS)
    return bundle


def _model_files(path: Path, summary: dict) -> list[Path]:
    """The files the export wrote: a directory's files, or the summary's ``files`` (split GGUF), or ``path``."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [Path(f) for f in summary.get("files") or [path]]


def _unstaged(summary: dict, staging: Path, final: Path) -> dict:
    """``summary`` with the staging directory in its paths replaced by where the files now are."""
    def move(value):
        if isinstance(value, str) and value.startswith(str(staging)):
            return str(final) + value[len(str(staging)):]
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {k: move(v) for k, v in summary.items()}
