"""zeda's import graph has no circle: each module can be read after the ones it imports. Module-level imports
are counted (those under `if TYPE_CHECKING:` are for annotations only and never run); an import inside a
function is a deliberate lazy one (a slow or optional package) and is counted too, so it cannot hide a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = [ROOT / "zeda", ROOT / "zeda_toy"]
USER_SCRIPTS = ["convert.py", "rollout.py", "train_sft.py", "train_opd.py", "evaluate.py", "serve.py", "pipeline.py"]
EXPERIMENT_MODULES = {f.stem for f in (ROOT / "experiments").glob("*.py")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def zeda_imports(path: Path, modules: set[str]) -> set[str]:
    """The zeda modules `path` imports (a `from zeda import x` names module zeda.x when there is one)."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules - {module_name(path)}


def test_the_import_graph_has_no_circle():
    files = sorted(f for package in PACKAGES for f in package.rglob("*.py"))
    modules = {module_name(f) for f in files}
    graph = {module_name(f): zeda_imports(f, modules) for f in files}

    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_method_stands_apart_from_the_toy_world_and_the_experiments():
    """zeda/ is the method and its scale-up: of the toy world it imports only the task suite, which
    zeda/evaluation.py scores as evaluate.py's default benchmark; zeda/, zeda_toy/ and the user's scripts never
    import an experiment (experiments/ imports them, not the other way)."""
    toy = {module_name(f) for f in (ROOT / "zeda_toy").rglob("*.py")}
    everything = toy | {module_name(f) for f in (ROOT / "zeda").rglob("*.py")} | EXPERIMENT_MODULES
    toy_edges = {(module_name(f), m) for f in (ROOT / "zeda").rglob("*.py") for m in zeda_imports(f, everything)
                 if m in toy}
    assert toy_edges == {("zeda.evaluation", "zeda_toy.tasks")}, toy_edges
    importers = [*PACKAGES[0].rglob("*.py"), *PACKAGES[1].rglob("*.py"), *(ROOT / s for s in USER_SCRIPTS)]
    into_experiments = {(str(f.relative_to(ROOT)), m) for f in importers for m in zeda_imports(f, everything)
                        if m in EXPERIMENT_MODULES}
    assert not into_experiments, into_experiments
