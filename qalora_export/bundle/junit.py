"""``verify --junit-xml PATH``: one JUnit testcase per check, a failure carrying the measured value and
the limit, so CI systems show what failed and by how much. Both verify modes (with the models, and
against the bundle) are turned into the same list of checks first.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def _figure(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def checks_from_report(report: dict) -> list[dict]:
    """The checks of a verify report made with the base (``verify.verify_artifact``)."""
    if "checks" in report and report.get("mode") == "reference":
        return list(report["checks"])
    weights = report["weights"]
    layers = weights.get("per_layer") or {}
    worst = max(layers.items(), key=lambda kv: (not kv[1].get("passed", True),
                                                 kv[1].get("max_abs_vs_declared", 0.0) / (kv[1].get("allowed") or 1.0)),
                default=(None, {}))
    checks = [{"name": "weights", "passed": bool(weights["passed"]), "value": worst[1].get("max_abs_vs_declared"),
               "limit": worst[1].get("allowed"), "op": "max",
               **({"reason": f"layer {worst[0]}: {worst[1].get('error', 'differs from the declared merge')}; "
                             f"missing layers: {weights.get('missing_layers')}"} if not weights["passed"] else {})}]
    if "require_exact" in report:
        checks.append({"name": "require_exact", **report["require_exact"]})
    runtime = report.get("runtime")
    if runtime is not None:
        if runtime.get("error"):
            checks.append({"name": "runtime", "passed": False, "reason": runtime["error"]})
        for name, ok in (runtime.get("checks") or {}).items():
            checks.append({"name": f"runtime {name}", "passed": bool(ok)})
        for key, value in runtime.items():  # comparisons that carry their own verdict
            if isinstance(value, dict) and "passed" in value:
                checks.append({"name": f"runtime {key}", "passed": bool(value["passed"]), "value": value.get("mean_kl"),
                               "reason": runtime.get("rule", "")})
        if "allowed_mean_kl" in runtime:
            checks.append({"name": "runtime mean_kl", "passed": bool(runtime.get("passed")), "op": "max",
                           "value": (runtime.get("artifact") or {}).get("mean_kl"), "limit": runtime["allowed_mean_kl"]})
        if not any(c["name"].startswith("runtime") for c in checks):
            checks.append({"name": "runtime", "passed": bool(runtime.get("passed")), "reason": runtime.get("rule", "")})
    return checks


def write_junit(report: dict, path: Path, skipped: list[str] = ()) -> Path:
    """Write ``report``'s checks as a JUnit XML file at ``path`` (skipped parts as skipped testcases)."""
    checks = checks_from_report(report)
    skipped = list(report.get("skipped") or skipped)
    suite = ET.Element("testsuite", name=f"qalora-export verify {report.get('format', '')}".strip(),
                       tests=str(len(checks) + len(skipped)),
                       failures=str(sum(not c["passed"] for c in checks)), skipped=str(len(skipped)))
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname=f"verify.{report.get('format', 'artifact')}", name=check["name"])
        if not check["passed"]:
            value, limit = check.get("value"), check.get("limit")
            parts = [f"measured {_figure(value)}" if value is not None else "",
                     f"limit {check.get('op', '')} {_figure(limit)}".replace("  ", " ") if limit is not None else "",
                     check.get("reason", "")]
            message = "; ".join(p for p in parts if p) or "failed"
            failure = ET.SubElement(case, "failure", message=message)
            failure.text = message
    for reason in skipped:
        case = ET.SubElement(suite, "testcase", classname=f"verify.{report.get('format', 'artifact')}",
                             name=reason.split(":")[0])
        ET.SubElement(case, "skipped", message=reason)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
    return path
