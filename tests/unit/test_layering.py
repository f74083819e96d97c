"""The architecture stays visible (docs/design.md §9): packages import only the packages below them,
module-level imports have no cycles, no module passes 400 lines, and nothing outside ``formats/``
names a format (cli, verify, inspect and plan loop over the registry).

Read from the source with ``ast``, nothing imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qalora_export"

# Bottom to top; a package may import its own level and the levels before it.
LEVELS: list[set[str]] = [
    {"__init__", "errors", "extras", "console"},
    {"storage"},
    {"core"},
    {"checkpoint"},
    {"modeling"},
    {"quantization"},
    {"training"},
    {"runtimes"},
    {"fixtures"},
    {"formats"},
    {"verify", "inspect_artifact", "plan", "lora_export", "bundle"},
    {"demo"},
    {"cli"},
]
MAX_LINES = 400
# demo.py scores its table in the base's own runtime (GPTQModel): the one sanctioned exception.
FORMAT_IMPORT_EXCEPTIONS = {("qalora_export.demo", "qalora_export.formats.gptq.runtime")}
FORMAT_NAMES = {"gptq", "onnx", "gguf", "mlx"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, module_level_only: bool) -> set[str]:
    """Our modules that ``path`` imports (``from X import y`` counts ``X.y`` when it is a module).
    ``module_level_only`` leaves out imports inside functions and under ``if TYPE_CHECKING``."""
    found: set[str] = set()

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if not (module_level_only and inner):
                if isinstance(child, ast.ImportFrom) and child.level == 0 and (child.module or "").startswith("qalora_export"):
                    found.add(child.module)
                    found.update(f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in MODULES)
                elif isinstance(child, ast.Import):
                    found.update(a.name for a in child.names if a.name.startswith("qalora_export"))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found & set(MODULES)


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _level(area: str) -> int:
    return next(i for i, names in enumerate(LEVELS) if area in names)


def test_every_package_has_a_level():
    assert {_area(m) for m in MODULES} <= set().union(*LEVELS)


def test_packages_import_only_their_level_and_below():
    upward = sorted(f"{m} imports {d}" for m, p in MODULES.items() for d in _imports(p, module_level_only=False)
                    if _level(_area(d)) > _level(_area(m)))
    assert not upward, "imports against the layering of docs/design.md §9:\n" + "\n".join(upward)


def test_module_level_imports_have_no_cycles():
    graph = {m: _imports(p, module_level_only=True) - {m} for m, p in MODULES.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    graph = {m: {d for d in deps if not (d.startswith(m + ".") and MODULES[m].name == "__init__.py")}
             for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                walk(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_over_the_line_limit():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by stage): {long}"


def test_outside_formats_no_module_imports_a_format_package():
    found = sorted((m, d) for m, p in MODULES.items() if not m.startswith("qalora_export.formats")
                   for d in _imports(p, module_level_only=False)
                   if d.split(".")[:3] != ["qalora_export", "formats", "protocol"] and len(d.split(".")) > 2
                   and d.startswith("qalora_export.formats.") and (m, d) not in FORMAT_IMPORT_EXCEPTIONS)
    assert not found, f"modules outside formats/ that reach into a format package (use the registry): {found}"


def test_outside_formats_no_module_branches_on_a_format_name():
    """``if fmt == "gguf"`` outside ``formats/`` is what the Format protocol replaced. ``"gptq"`` is
    also the input checkpoint's v1 ``checkpoint_format`` and a quantization method, so below the
    formats it is not an output format's name; above them (cli, verify, inspect, plan) it is."""
    found = []
    for m, p in MODULES.items():
        if m.startswith("qalora_export.formats"):
            continue
        watched = FORMAT_NAMES if _level(_area(m)) > _level("formats") else FORMAT_NAMES - {"gptq"}
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                names = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in watched}
                if names and not (m == "qalora_export.demo" and names == {"gptq"}):
                    found.append(f"{m}:{node.lineno} compares with {sorted(names)}")
    assert not found, "\n".join(found)


def test_the_registry_lists_the_formats_this_test_knows():
    from qalora_export.formats import FORMATS

    assert set(FORMATS) == FORMAT_NAMES


@pytest.mark.parametrize("name", sorted(FORMAT_NAMES))
def test_each_format_implements_the_protocol(name):
    from qalora_export.formats import get_format
    from qalora_export.formats.protocol import Format

    fmt = get_format(name)
    assert isinstance(fmt, Format) and fmt.name == name
    members = [m for m in vars(Format) if not m.startswith("_")] + list(Format.__annotations__)
    assert all(hasattr(fmt, m) for m in members)
