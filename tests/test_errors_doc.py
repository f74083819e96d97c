"""``docs/errors.md`` cannot rot: it lists every typed error the code can raise, and every test it
names exists.

A *site* is a construction of a ``QALoRAExportError`` subclass in ``qalora_export/``
(``raise ConfigError(f"...")``, or a helper that builds one), identified by its
class, module, function and the head of its message (placeholders written ``{…}``). The
catalogue's tables have one row per site with a ``site`` cell holding that key.

Checks: every site in the code has a row; every row's site still exists; every test a row names
(``tests/...py::test_name``) exists. After changing messages, regenerate the tables with

    .venv/bin/python tests/test_errors_doc.py --write [--sites error_sites.json]

which keeps the hand-written "cause / fix" and "covered by" cells of rows whose key is unchanged
and fills new rows' "covered by" from a traced test run (``fuzz/error_sites_plugin.py``: which
test constructed which error) or, without one, from tests that quote a fragment of the message.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
SOURCES = sorted((ROOT / "qalora_export").rglob("*.py"))
TESTS = sorted((ROOT / "tests").rglob("test_*.py"))
HEAD = 60  # characters of the message pattern in a site key


def typed_error_classes() -> list[str]:
    import qalora_export.errors as errors

    return sorted(name for name, obj in vars(errors).items()
                  if isinstance(obj, type) and issubclass(obj, errors.QALoRAExportError))


def _pattern(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{…}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _pattern(node.left) + _pattern(node.right)
    return "{…}"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").replace("`", "'").strip()


def sites() -> list[dict]:
    """Every construction of a typed error, in source order."""
    classes = set(typed_error_classes())
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes):
                continue
            message = next((a for a in node.args if isinstance(a, (ast.Constant, ast.JoinedStr, ast.BinOp))), None)
            if message is None:
                continue
            func, p = "<module>", parents.get(node)
            while p is not None:
                if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    func = p.name
                    break
                p = parents.get(p)
            pattern = _clean(_pattern(message))
            rel = path.relative_to(ROOT).as_posix()
            found.append({"cls": node.func.id, "file": rel, "func": func, "line": node.lineno, "end": node.end_lineno,
                          "pattern": pattern, "key": f"{node.func.id} {rel}:{func} `{pattern[:HEAD]}`"})
    return found


# ------------------------------------------------------------------------------ the document

ROW = re.compile(r"^\| (?P<site>[A-Za-z]+Error [^|]+?:[^ |]+ `(?:[^`]|\\`)*`) \| (?P<message>.*?) \| "
                 r"(?P<cause>.*?) \| (?P<tests>[^|]*?) \|$")
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def doc_rows(text: str) -> dict[str, dict]:
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group("site")] = m.groupdict()
    return rows


def test_every_error_site_is_catalogued():
    rows = doc_rows(DOC.read_text())
    missing = [s["key"] for s in sites() if s["key"] not in rows]
    assert not missing, (f"{len(missing)} error site(s) are not in docs/errors.md (regenerate with "
                         f"`python tests/test_errors_doc.py --write`, then write their cause/fix): {missing[:5]}")


def test_every_catalogued_site_exists():
    keys = {s["key"] for s in sites()}
    stale = [k for k in doc_rows(DOC.read_text()) if k not in keys]
    assert not stale, f"docs/errors.md lists sites that no longer exist: {stale[:5]}"


def test_every_listed_test_exists():
    text = DOC.read_text()
    refs = TEST_REF.findall(text)
    assert len(refs) > 50, "the catalogue names too few tests; is the table format intact?"
    missing = []
    for file, name in set(refs):
        path = ROOT / file
        if not path.is_file() or not re.search(rf"^\s*def {re.escape(name)}\(", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/errors.md names tests that do not exist: {sorted(missing)}"


# ------------------------------------------------------------------------------ regeneration


def _test_functions() -> list[tuple[str, str, str]]:
    out = []
    for path in TESTS:
        src = path.read_text()
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                body = (ast.get_source_segment(src, node) or "").replace("\\", "")
                out.append((path.relative_to(ROOT).as_posix(), node.name, body))
    return out


def _guess_tests(pattern: str, functions) -> list[str]:
    """Tests whose source quotes an 18-character fragment of the message's literal text."""
    chunks = [c for c in re.split(r"\{…\}", pattern.replace("\\|", "|")) if len(c.strip()) >= 18]
    hits = []
    for file, name, body in functions:
        for chunk in chunks:
            windows = {chunk[i:i + 18] for i in range(0, max(1, len(chunk) - 17), 3)}
            if any(w in body for w in windows):
                hits.append(f"{file}::{name}")
                break
    return hits[:2]


def _fix_of(pattern: str) -> str:
    """The part of a message that says what to do (after the last ';' or '. ' before a verb)."""
    m = re.search(r"(?:; |\. |: )((?:use|pass|choose|drop|fix|give|add|remove|save|quantize|export|train|copy|"
                  r"check|set|raise|lower|free|write|convert|upgrade|run|re-?export|export it|start|install|"
                  r"rename|delete|provide|re-?quantize|split)\b.*)$", pattern, re.I)
    return m.group(1) if m else ""


def _traced_tests(path: Path | None, all_sites: list[dict]) -> dict[str, list[str]]:
    """site key -> tests that constructed it, from ``fuzz/error_sites_plugin.py``'s record: the
    record's line is mapped to the nearest site at or above it in the same file and class.
    Deterministic tests first; fuzz tests (random) only where nothing else reaches the site."""
    import json

    if path is None:
        return {}
    by_file: dict[tuple[str, str], list[dict]] = {}
    for s in all_sites:
        by_file.setdefault((s["file"], s["cls"]), []).append(s)
    found: dict[str, set[str]] = {}
    for file, line, cls, nodeid in json.loads(Path(path).read_text()):
        for site in by_file.get((file, cls), []):
            if site["line"] <= line <= site["end"]:
                found.setdefault(site["key"], set()).add(nodeid.split("[")[0])
    out = {}
    for key, tests in found.items():
        ordered = sorted(tests, key=lambda t: ("test_fuzz_" in t, len(t), t))
        out[key] = ordered[:2]
    return out


# What to do, by what the message says (first match wins), then by class; used for new rows only.
ADVICE = [
    (r"NaN or inf", "non-finite values: a damaged file, or a training run that diverged; re-export it, or "
                    "re-train with a lower --lr"),
    (r"fingerprint|belongs to another|another model|different quantized base|does not quantize|match no module",
     "an input from a different model: use the base, adapter and tokenizer that belong together"),
    (r"corrupt|truncated|not a readable|cannot be read|cannot be decoded|unreadable|is not valid JSON|"
     r"not UTF-8|not JSON", "the file is damaged or not what its name says (interrupted copy or download, "
                            "another tool's format); re-download or re-export it; `qalora-export inspect PATH` "
                            "shows what it holds"),
    (r"does not exist|is missing|missing|has no ", "something the command needs is absent: check the path, or copy "
                                                   "the missing file from the original model"),
]
CLASS_ADVICE = {
    "AdapterError": "check that the adapter belongs to this base; pass --pooling for adapters that do not record it",
    "CheckpointError": "re-create the checkpoint (`qalora-export quantize`) or fix the named file",
    "ConfigError": "change the option as the message says",
    "DataError": "fix the named line of the training data",
    "FoldError": "export to onnx/gguf (float zero-points), or train with integer zeros",
    "FormatLimitError": "the format cannot hold this; use the alternative the message names",
    "OutputExistsError": "choose another output path or pass --overwrite",
    "OutputWriteError": "free space or choose another output path",
    "TrainingError": "lower --lr or check the data",
    "UnsupportedModelError": "not supported by this target; use another output format",
}


def _advice(cls: str, pattern: str) -> str:
    fix = _fix_of(pattern)
    if fix:
        return "as the message says: " + fix
    for rule, text in ADVICE:
        if re.search(rule, pattern, re.I):
            return text
    return CLASS_ADVICE.get(cls, "see the message")


def write_doc(sites_json: Path | None = None) -> None:
    text = DOC.read_text() if DOC.exists() else ""
    old = doc_rows(text)
    intro, _, _ = text.partition("\n<!-- catalogue -->")
    functions = _test_functions()
    all_sites = sites()
    traced = _traced_tests(sites_json, all_sites)
    by_class: dict[str, list[dict]] = {}
    for s in all_sites:
        by_class.setdefault(s["cls"], []).append(s)
    lines = [intro.rstrip() + "\n", "<!-- catalogue -->",
             "<!-- generated by `python tests/test_errors_doc.py --write`; the cause/fix and covered-by cells "
             "are kept across regenerations -->", ""]
    for cls in sorted(by_class):
        lines += [f"### {cls}", "", "| site | message | cause / fix | covered by |", "|---|---|---|---|"]
        for s in by_class[cls]:
            prev = old.get(s["key"])
            cause = prev["cause"] if prev and prev["cause"] != "see the message" else _advice(cls, s["pattern"])
            tests = prev["tests"] if prev and prev["tests"] != "—" else (
                ", ".join(traced.get(s["key"], []) if sites_json else _guess_tests(s["pattern"], functions)) or "—")
            lines.append(f"| {s['key']} | {s['pattern']} | {cause} | {tests} |")
        lines.append("")
    DOC.write_text("\n".join(lines))
    n = sum(len(v) for v in by_class.values())
    uncovered = sum(1 for line in lines if line.endswith("| — |"))
    print(f"{DOC}: {n} sites, {uncovered} without a named test")


if __name__ == "__main__" and sys.argv[1:2] == ["--write"]:
    sys.path.insert(0, str(ROOT))
    write_doc(Path(sys.argv[3]) if sys.argv[2:3] == ["--sites"] else None)
