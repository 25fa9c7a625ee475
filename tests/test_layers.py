"""The shape layer imports no kernel code: ``memops/meta`` (fake kernels) and the neutral modules it uses
(``contract``, ``rules``, ``registry``, ``validation``, ``config``: the settings) import nothing from
``memops/ops`` or above it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "memops"
NEUTRAL = {"memops.config", "memops.contract", "memops.rules", "memops.registry", "memops.validation"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _memops_imports(path: Path) -> set[str]:
    """Every memops module ``path`` imports (relative imports resolved; ``from . import x`` as ``pkg.x``)."""
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("memops")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("memops"):
                found |= {f"{base}.{a.name}" if not node.module else base for a in node.names}
    return found


def test_meta_imports_no_kernel_code():
    files = sorted((ROOT / "meta").glob("*.py")) + [ROOT / f"{m.split('.')[1]}.py" for m in NEUTRAL]
    for path in files:
        for name in _memops_imports(path):
            allowed = name in NEUTRAL or name.startswith("memops.meta")
            assert allowed, f"{path.relative_to(ROOT.parent)} imports {name}"


def test_the_check_sees_a_kernel_import():
    # what an old fake kernel did (``from ..ops.engine import compute_dtype``) is caught
    assert "memops.ops.engine" in _memops_imports(ROOT / "ops" / "linear_ce.py")


def _import_graph() -> dict[str, set[str]]:
    """memops module -> the memops modules it imports anywhere in its code (function-level imports included; a
    name imported from a package that is not a module of its own counts as the package)."""
    paths = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        edges = set()
        for target in _memops_imports(path):
            while target and target not in paths:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """No two memops modules import each other, directly or through others, at any level of their code (a
    package's ``__init__`` importing its modules is not counted back: importing a module runs its package)."""
    graph = _import_graph()
    for pkg in [m for m in graph if (ROOT.parent / m.replace(".", "/") / "__init__.py").exists()]:
        graph[pkg] = set()  # what a package's __init__ re-exports
    assert _cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_architecture_doc_names_every_module():
    """docs/architecture.md has a line for every module under memops/ (a new module gets one)."""
    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    section = text.split("## Every module", 1)[1].split("\n## ", 1)[0]
    named = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `memops/")}
    present = {str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")}
    assert sorted(present - named) == [], "add these to docs/architecture.md's 'Every module' table"
    assert sorted(named - present) == [], "docs/architecture.md names modules that no longer exist"


def test_architecture_doc_sample_matches_the_declaration():
    """The worked example in docs/architecture.md shows memops::linear_ce's real outputs, shape rule and check."""
    import re

    from memops.meta import linear_ce

    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    sample = text.split("## One family, start to end", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    outputs = re.search(r"outputs=\(([^)]*)\)", sample).group(1)
    assert tuple(re.findall(r'"(\w+)"', outputs)) == linear_ce.SPEC.outputs
    assert re.search(r"shapes=(\w+)", sample).group(1) == linear_ce.SPEC.shapes.__name__
    assert re.search(r"\n        check=(\w+)", sample).group(1) == linear_ce.SPEC.check.__name__
    assert f'name="{linear_ce.SPEC.name}"' in sample
