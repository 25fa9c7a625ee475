"""Rewrite the schema list at the end of docs/architecture.md from the declarations (``python -m memops schemas``).

Run after adding or changing an op family's inputs or options: ``python scripts/update_schema_docs.py``.
"""

from __future__ import annotations

from pathlib import Path

import memops  # noqa: F401  (declares every family)
from memops.contract import schemas

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def main() -> None:
    text = DOC.read_text()
    start = text.index("```\n", text.index("## Every schema"))
    end = text.index("```", start + 4)
    DOC.write_text(text[:start] + "```\n" + "\n".join(schemas()) + "\n" + text[end:])


if __name__ == "__main__":
    main()
