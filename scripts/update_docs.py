"""Rewrite the generated parts of the docs: the schema list at the end of docs/architecture.md
(``python -m memops schemas``) and the bytes-per-logit table in docs/internals.md (``python -m memops traffic``).

Run after adding or changing an op family's inputs or options, or a chunk head: ``python scripts/update_docs.py``.
``tests/test_contract.py`` and ``tests/test_triton.py`` check both are current.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton heads' traffic is counted under the interpreter

import memops  # noqa: E402, F401  (declares every family)
from memops.bench import traffic  # noqa: E402
from memops.contract import schemas  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    arch = DOCS / "architecture.md"
    text = arch.read_text()
    start = text.index("```\n", text.index("## Every schema"))
    end = text.index("```", start + 4)
    arch.write_text(text[:start] + "```\n" + "\n".join(schemas()) + "\n" + text[end:])
    internals = DOCS / "internals.md"
    text = internals.read_text()
    start = text.index("| head | dtype |")
    end = text.index("\n\n", start)
    internals.write_text(text[:start] + traffic.table() + text[end:])


if __name__ == "__main__":
    main()
