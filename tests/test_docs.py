"""The documentation points only inside the repository: every `file.py:function` the README and docs/ name
exists, every relative link resolves, and nothing refers to files a person who clones zeda does not have."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def defined(path: Path, dotted: str) -> bool:
    """Whether `dotted` (a function, a class, or Class.method) is defined at the top level of a Python file."""
    tree = ast.parse(path.read_text())
    head, _, tail = dotted.partition(".")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == head:
            return not tail or any(isinstance(m, ast.FunctionDef) and m.name == tail for m in node.body)
        if isinstance(node, ast.Assign) and not tail and any(getattr(t, "id", None) == head for t in node.targets):
            return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_code_reference_exists(doc):
    refs = re.findall(r"`([\w/]+\.py):([\w.]+)`", doc.read_text())
    missing = [f"{f}:{name}" for f, name in refs if not (ROOT / f).is_file() or not defined(ROOT / f, name)]
    assert not missing, f"{doc.name} names code that does not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(doc):
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", doc.read_text())
    broken = [link for link in links if "://" not in link and not (doc.parent / link).exists()]
    assert not broken, f"{doc.name} links to missing files: {broken}"


def test_nothing_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared|ZEDA\.md|PEERS\.md|TEACHER-PROBE")
    files = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".toml"} and ".venv" not in p.parts
             and "runs" not in p.parts and p != Path(__file__)]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_script_and_module_path_exists(doc):
    """The files the docs send a reader to: `python X.py` commands, `python -m pkg.module` and paths such as
    `zeda/moe.py` or `experiments/frontier.py` (a moved file leaves no stale command behind)."""
    text = doc.read_text()
    scripts = re.findall(r"python3? ((?:[\w-]+/)*[\w-]+\.py)\b", text)
    modules = [m.replace(".", "/") + ".py" for m in re.findall(r"python3? -m ((?:zeda|zeda_toy)(?:\.\w+)+)", text)]
    paths = re.findall(r"\b((?:zeda|zeda_toy|experiments|bench|tests)/[\w/]*\w\.py)\b", text)
    missing = sorted({f for f in [*scripts, *modules, *paths] if not (ROOT / f).is_file()})
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
