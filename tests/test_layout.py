"""The package reads as its architecture: no import cycles between its modules (lazy imports
included), no over-long module, a docstring for every folder, and docs that name only modules
that exist (the README's module table lists every folder and top-level module)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "geoseg"

#: The longest a module may be, in lines ("about 600").
MAX_LINES = 620

#: Modules allowed to be longer, each one idea that would be worse split (none today).
LONG_ALLOWED: dict[str, str] = {}


def _name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere (in functions too), except under
    ``if TYPE_CHECKING:``. ``from geoseg.pkg import sub`` counts as the submodule ``sub``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

    def resolve(dotted: str) -> str:
        while dotted and dotted not in modules:
            dotted = dotted.rsplit(".", 1)[0] if "." in dotted else ""
        return dotted

    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit_one(other)
                continue
            visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(resolve(a.name) for a in node.names if a.name.startswith("geoseg"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("geoseg"):
                for a in node.names:
                    full = f"{base}.{a.name}"
                    found.add(full if full in modules else resolve(base))
        visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    found.discard("")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path: Path) -> None:
    """The check itself: a function-level import closing a loop is a cycle; one under
    ``if TYPE_CHECKING:`` is not."""
    a = tmp_path / "a.py"
    a.write_text("import geoseg.b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from geoseg.a import x\n")
    c = tmp_path / "c.py"
    c.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from geoseg.a import y\n"
    )
    names = {"geoseg.a", "geoseg.b", "geoseg.c"}
    graph = {
        "geoseg.a": imports_of("geoseg.a", a, names),
        "geoseg.b": imports_of("geoseg.b", b, names),
        "geoseg.c": imports_of("geoseg.c", c, names),
    }
    assert cycles(graph) == [["geoseg.a", "geoseg.b"]]
    assert graph["geoseg.c"] == set()


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: imports_of(m, p, set(modules)) for m, p in modules.items()}
    found = cycles(graph)
    detail = [
        f"{' <-> '.join(c)}: " + "; ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
        for c in found
    ]
    assert not found, "\n".join(detail)


def test_no_module_over_about_600_lines() -> None:
    long = {
        m: n
        for m, p in _modules().items()
        if (n := len(p.read_text().splitlines())) > MAX_LINES and m not in LONG_ALLOWED
    }
    assert not long, long


def test_every_folder_says_what_it_is_for() -> None:
    for folder in sorted(p for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        init = folder / "__init__.py"
        assert init.is_file(), f"{folder} has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 20, f"{init} has no docstring saying what the folder is for"


def _table_paths(text: str) -> set[str]:
    """The ``geoseg/...`` paths in the first column of the README's module table."""
    rows = [line for line in text.splitlines() if line.startswith("| `geoseg/")]
    return {p for row in rows for p in re.findall(r"`(geoseg/[\w/.]*)`", row.split("|")[1])}


def test_the_readme_module_table_matches_the_tree() -> None:
    listed = _table_paths((REPO / "README.md").read_text())
    for path in listed:
        assert (REPO / path).exists(), f"the README's module table names {path}, which is gone"
    top = {
        f"geoseg/{p.name}" + ("/" if p.is_dir() else "")
        for p in PKG.iterdir()
        if p.name not in ("__pycache__", "__init__.py", "__main__.py", "py.typed")
    }
    missing = sorted(t for t in top if t not in listed and t.rstrip("/") not in listed)
    assert not missing, f"not in the README's module table: {missing}"


def test_the_architecture_page_names_only_modules_that_exist() -> None:
    text = (REPO / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`(geoseg/[\w/]+(?:\.py)?)`", text))
    assert len(named) > 15, named
    gone = sorted(p for p in named if not (REPO / p).exists())
    assert not gone, gone
    assert "ARCHITECTURE.md" in (REPO / "README.md").read_text()
