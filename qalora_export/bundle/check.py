"""``verify ARTIFACT`` without ``--base``/``--adapter`` (docs/design.md §11): the artifact's bundle
checked with the runtime alone. Checks, each reported (and failed) on its own:

1. ``checksums``: every file of ``SHA256SUMS`` (model and bundle files) present and unchanged;
2. ``reference``: ``reference.safetensors`` present, readable, made for this format;
3. ``tokenizer``: the artifact's tokenizer fingerprint equals the reference's (prompt ids mean
   nothing under another tokenizer);
4. ``runtime <metric>``: the artifact run in its runtime (the format's ``runtime_outputs``, in a child
   process) on the stored prompts, compared with the stored logits and greedy tokens
   (``runtimes.reference``) within the limits the bundle recorded at export.

The weight level needs the base and is always listed as skipped; a check that cannot run because an
earlier one failed is listed as skipped too, with the reason, as is what the format says its runtime
check does not cover for this artifact (``Handoff.not_rechecked``, e.g. an ONNX model's accuracy
level 4). Imports no model, trainer, PEFT or
GPTQModel code (the gptq format's runtime is GPTQModel itself).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from qalora_export.bundle import REFERENCE, SUMS, bundle_dir
from qalora_export.bundle.checksums import check_sums
from qalora_export.bundle.reference import load_reference
from qalora_export.errors import ConfigError, QALoRAExportError, RuntimeCrashError
from qalora_export.extras import require
from qalora_export.formats import detect_format, get_format
from qalora_export.runtimes.reference import judge, measure

WEIGHTS_SKIPPED = "weight level: needs the base and the adapter (verify ARTIFACT --base BASE --adapter ADAPTER)"


def verify_from_bundle(artifact: Path, fmt: Optional[str] = None) -> dict:
    """Check ``artifact`` against its bundle; the report (``report["passed"]``, ``checks``, ``skipped``).

    Raises:
        ConfigError: ``artifact`` has no bundle directory at all.
        MissingExtraError: the format's runtime is not installed.
    """
    artifact = Path(artifact)
    target = get_format(fmt) if fmt else detect_format(artifact)
    bundle = bundle_dir(artifact)
    if not bundle.is_dir():
        raise ConfigError(f"{artifact} has no handoff bundle ({bundle} does not exist): verify it against its models "
                          f"with --base BASE [--adapter ADAPTER], or re-export it to write the bundle")
    require(target.runtime_requires, f"verify of a {target.name} artifact in {target.runtime.name}")
    checks: list[dict] = []
    skipped = [WEIGHTS_SKIPPED]
    checks.append(_checksums(bundle))
    reference, ref_check = _reference(bundle, target.name)
    checks.append(ref_check)
    figures = None
    if reference is None:
        skipped.append(f"runtime comparison: {ref_check['reason']}")
    else:
        tok_check = _tokenizer(target, artifact, reference)
        checks.append(tok_check)
        if not tok_check["passed"]:
            skipped.append(f"runtime comparison: {tok_check['reason']}")
        else:
            figures, runtime_checks = _runtime(target, artifact, reference)
            checks.extend(runtime_checks)
            skipped.extend(_not_rechecked(target, artifact))
    return {"artifact": str(artifact), "format": target.name, "mode": "reference", "bundle": str(bundle),
            "runtime": target.runtime.name, "checks": checks, "skipped": skipped, "figures": figures,
            "passed": bool(checks) and all(c["passed"] for c in checks)}


def _not_rechecked(target, artifact: Path) -> list[str]:
    """What the format says its runtime check does not cover for this artifact (``Handoff.not_rechecked``)."""
    try:
        return list(target.handoff(artifact, None).not_rechecked)
    except Exception as exc:  # noqa: BLE001 - a damaged model file has failed the checks already; say so, go on
        return [f"what the runtime check covers could not be read from {artifact} ({type(exc).__name__}: {exc})"]


def _checksums(bundle: Path) -> dict:
    sums = bundle / SUMS
    if not sums.is_file():
        return {"name": "checksums", "passed": False, "reason": f"{sums} is missing: nothing says which files belong "
                                                               f"to the artifact; re-export it"}
    try:
        result = check_sums(bundle, sums)
    except ConfigError as exc:
        return {"name": "checksums", "passed": False, "reason": str(exc)}
    reason = "; ".join(filter(None, [
        f"changed: {', '.join(result['mismatched'])}" if result["mismatched"] else "",
        f"missing: {', '.join(result['missing'])}" if result["missing"] else ""]))
    check = {"name": "checksums", "passed": result["passed"], "value": f"{result['files']} files", **result}
    if reason:
        check["reason"] = f"{reason} (sha256 does not match {sums})" if result["mismatched"] else reason
    return check


def _reference(bundle: Path, fmt_name: str) -> tuple[Optional[dict], dict]:
    path = bundle / REFERENCE
    if not path.is_file():
        return None, {"name": "reference", "passed": False,
                      "reason": f"{path} is missing: there is nothing to compare the runtime with (an export with "
                                f"--no-verify keeps no reference); re-export the artifact with --verify"}
    try:
        reference = load_reference(path)
    except ConfigError as exc:
        return None, {"name": "reference", "passed": False, "reason": str(exc)}
    made_for = reference["meta"].get("format")
    if made_for != fmt_name:
        return None, {"name": "reference", "passed": False,
                      "reason": f"{path} was made for a {made_for} artifact, this one is {fmt_name}"}
    return reference, {"name": "reference", "passed": True, "value": f"{len(reference['prompts'])} prompts"}


def _tokenizer(target, artifact: Path, reference: dict) -> dict:
    expected = reference["meta"].get("tokenizer_fingerprint")
    try:
        found = target.handoff(artifact, None).tokenizer_fingerprint
    except Exception as exc:  # noqa: BLE001 - a damaged artifact whose tokenizer cannot be read fails this check
        return {"name": "tokenizer", "passed": False,
                "reason": f"cannot read the tokenizer of {artifact} ({type(exc).__name__}: {exc})"}
    if found != expected:
        return {"name": "tokenizer", "passed": False, "value": found, "limit": expected,
                "reason": f"the artifact's tokenizer (sha256 {found[:12]}) is not the one the reference was made with "
                          f"({str(expected)[:12]}): the reference belongs to another model"}
    return {"name": "tokenizer", "passed": True, "value": found}


def _runtime(target, artifact: Path, reference: dict) -> tuple[Optional[dict], list[dict]]:
    meta = reference["meta"]
    try:
        with tempfile.TemporaryDirectory(prefix="qalora-verify-") as workdir:
            logits, greedy = target.runtime_outputs(artifact, reference["prompts"], int(meta["n_new"]), Path(workdir))
        figures = measure(reference["rows"], reference["greedy"], reference["margins"], logits, greedy,
                          float(meta.get("near_tie_factor", 0.0)))
    except (RuntimeCrashError, QALoRAExportError, ValueError) as exc:
        return None, [{"name": "runtime", "passed": False, "reason": f"{target.runtime.name}: {exc}"}]
    checks = [{**c, "name": f"runtime {c['name']}"} for c in judge(figures, meta.get("gate") or {})]
    if not checks:
        checks = [{"name": "runtime", "passed": False, "reason": "the reference records no limits"}]
    return figures, checks


def render_bundle_markdown(report: dict) -> str:
    """A short human summary of a :func:`verify_from_bundle` report."""
    lines = [f"# verify: {report['artifact']} ({report['format']}, against its bundle)", "",
             f"**{'PASSED' if report['passed'] else 'FAILED'}** — runtime {report['runtime']}", "",
             "| check | value | limit | passed |", "|---|---|---|---|"]
    for c in report["checks"]:
        value = c.get("value")
        value = f"{value:.3g}" if isinstance(value, float) else ("" if value is None else str(value)[:24])
        limit = "" if c.get("limit") is None else f"{c.get('op', '')} {c['limit']:.3g}" if isinstance(
            c["limit"], (int, float)) else str(c["limit"])[:24]
        lines.append(f"| {c['name']} | {value} | {limit} | {c['passed']} |")
    failures = [f"- {c['name']}: {c['reason']}" for c in report["checks"] if not c["passed"] and c.get("reason")]
    if failures:
        lines += ["", "Failures:", *failures]
    lines += ["", "Skipped:", *[f"- {s}" for s in report["skipped"]]]
    return "\n".join(lines) + "\n"
