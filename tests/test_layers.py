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
