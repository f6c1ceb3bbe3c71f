"""The package layout: stage packages on floors, imports only downward, no cycles, no private names across modules.

Read from the source with ``ast`` (nothing is imported), function-level imports included: a lazy import that runs
back up is still a dependency that runs back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tledge"

# Bottom to top: a module may import its own floor (without a cycle) and any floor below, never one above.
FLOORS = [
    {"tledge", "errors", "artifacts", "validate", "machine", "cpu_isa", "cuda", "defaults"},  # shared low-level helpers
    {"data"},
    {"models"},
    {"train"},
    {"runners"},
    {"export"},
    {"quant"},
    {"trt"},
    {"bench"},
    {"release"},
    {"monitor"},
    {"report"},
    {"pipeline"},
    {"cli"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "tledge"
    for i, names in enumerate(FLOORS):
        if part in names:
            return i
    raise AssertionError(f"{module} sits in no floor of {Path(__file__).name}: add its package to FLOORS")


def resolve(module: str, name: str | None) -> str:
    """The tledge module an import names: ``from tledge.x import y`` is module ``tledge.x.y`` when that exists."""
    if name and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


def imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every tledge import in ``module``, at any depth, except
    those under ``if TYPE_CHECKING:``."""
    found = []
    tree = ast.parse(MODULES[module].read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
                   for n in ast.walk(block)}  # annotations only: never imported at run time
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tledge":
            assert node.level == 0
            for alias in node.names:
                found.append((resolve(node.module, alias.name), alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append(("(relative)", "", node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "tledge"]
    return found


def test_every_module_sits_on_a_floor():
    for module in MODULES:
        floor_of(module)


def test_imports_are_absolute_and_name_real_modules():
    for module in MODULES:
        for target, _, line in imports(module):
            assert target in MODULES, f"{MODULES[module]}:{line} imports {target}, which is no module of tledge"


def test_no_import_runs_back_up():
    upward = [f"{MODULES[m]}:{line}: {m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})"
              for m in MODULES for t, _, line in imports(m) if floor_of(t) > floor_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in imports(m) if t != m and not (m == "tledge" or t == "tledge")} for m in MODULES}
    # A package's __init__ re-exports its modules; a module importing a sibling through the package is a cycle too.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_private_name_is_imported_from_another_module():
    private = [f"{MODULES[m]}:{line}: {name} from {t}" for m in MODULES for t, name, line in imports(m)
               if name.startswith("_") and name != "__version__" and t != m]
    assert not private, "\n".join(private)


def test_bench_experiments_use_public_names_only():
    private = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tledge"):
                private += [f"{path.name}:{node.lineno}: {a.name} from {node.module}" for a in node.names
                            if a.name.startswith("_") and a.name != "__version__"]
    assert not private, "\n".join(private)


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path):
    """The walk above must be able to fail: a made-up pair of modules that import each other is caught."""
    assert floor_of("tledge.cli") > floor_of("tledge.quant.quantize") > floor_of("tledge.data.images")
    assert resolve("tledge.quant", "quantize") == "tledge.quant.quantize"
    assert ("tledge.errors", "TledgeError") in [(t, n) for t, n, _ in imports("tledge.artifacts")]
