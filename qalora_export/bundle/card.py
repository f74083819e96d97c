"""The model card, ``README.md`` of the handoff bundle: what the artifact is, what went into it,
what verified it, and how to run and re-check it. Format-specific text comes from the format's
``handoff`` member (docs/design.md §10), never from branching on its name here.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats.protocol import Format, Handoff

# export summary keys that describe the fold, whichever format wrote them
FOLD_KEYS = ("exact", "zeros_moved", "zeros_total", "max_zero_change", "max_fold_shift", "max_m_rounding",
             "max_d_rounding", "zero_points", "clamped", "lm_head")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def base_facts(model: "MergedView") -> dict:
    """Path, fingerprint, bits, group size and quantizer of the base."""
    qcfg = dict(model.base.model_config.get("quantization_config") or {})
    return {"path": str(model.base.directory), "fingerprint": model.base.fingerprint(), "bits": model.bits,
            "group_size": model.group_size,
            "quantizer": {k: qcfg[k] for k in ("quant_method", "checkpoint_format", "desc_act", "sym", "meta",
                                                "quantizer") if k in qcfg}}


def adapter_facts(model: "MergedView", adapter_dir: Optional[Path]) -> Optional[dict]:
    """Rank, alpha, pooling and what the trainer recorded (steps, data sha256), or None without an adapter."""
    adapter = model.adapter
    if adapter is None:
        return None
    training = dict(adapter.extra.get("training") or {})
    return {"path": str(adapter_dir) if adapter_dir else None, "rank": adapter.rank, "alpha": adapter.alpha,
            "pooling": adapter.pooling, "pool_group_size": adapter.pool_group_size,
            "pool_groups": adapter.pool_groups, "base_fingerprint": adapter.base_fingerprint,
            "integer_zeros": bool(adapter.extra.get("integer_zeros", False)),
            "steps": training.get("steps"), "data_file": training.get("data_file"),
            "data_sha256": training.get("data_sha256")}


def fold_facts(summary: dict, verify_report: dict) -> dict:
    """The fold as the export and the merge metadata record it."""
    facts = {k: summary[k] for k in FOLD_KEYS if k in summary}
    merge = (verify_report.get("weights") or {}).get("merge") or {}
    return {**{k: v for k, v in merge.items() if k in FOLD_KEYS or k in ("merged", "rounded")}, **facts}


def render_card(fmt: "Format", handoff: "Handoff", artifact: Path, facts: dict, verify_report: dict) -> str:
    """The card's markdown. ``facts``: ``{"base", "adapter", "fold"}`` from the functions above."""
    name = Path(artifact).name
    runtime = verify_report.get("runtime")
    verified = ("weight level and runtime level" if runtime is not None else
                "weight level only (exported with --no-verify: the runtime level did not run)")
    lines = [
        f"# {name}: {fmt.help}",
        "",
        f"A QA-LoRA adapter folded into the zero-points of a group-quantized base, exported by "
        f"qalora-export {_version('qalora-export')} as `{fmt.name}` and verified at export "
        f"({verified}): **{'PASSED' if verify_report.get('passed') else 'FAILED'}** (verify.md).",
        "",
        "## Base", "", "```json", json.dumps(facts["base"], indent=2, default=str), "```", "",
        "## Adapter", "",
        "No adapter: the base exported as is." if facts["adapter"] is None else
        "```json\n" + json.dumps(facts["adapter"], indent=2, default=str) + "\n```",
        "",
        "## The fold", "", "```json", json.dumps(facts["fold"], indent=2, default=str), "```", "",
        "## Format limits", "", *[f"- {line}" for line in handoff.limits], "",
        "## Versions", "",
        f"- qalora-export {_version('qalora-export')}, torch {_version('torch')}, "
        f"transformers {_version('transformers')}",
        f"- runtime: {handoff.runtime}",
        "",
        "## Run it", "", handoff.snippet, "",
        "## Re-check it (no base, no adapter, no training stack)", "",
        *([] if runtime is not None else [
            "Exported with --no-verify: there is no reference.safetensors, so only the checksums can be "
            "re-checked here; export with --verify (the default of merge) to ship a reference.", ""]),
        "```bash",
        f"{handoff.install}",
        f"qalora-export verify {name} --junit-xml results.xml",
        "```", "",
        "This checks SHA256SUMS, runs the artifact in its runtime on the prompts stored in "
        "reference.safetensors and compares with the unmerged model's stored logits, with these limits "
        "(floors measured at export where the runtime level uses one):", "",
        "```json", json.dumps(handoff.gate, indent=2), "```", "",
    ]
    return "\n".join(lines)
