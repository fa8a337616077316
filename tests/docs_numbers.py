"""Read numbers out of README.md and docs/*.md, so tests can hold them to the committed results files they quote."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def doc_text(page: str) -> str:
    """The text of README.md or docs/<page>.md, with bold marks and line breaks inside paragraphs flattened."""
    path = ROOT / "README.md" if page == "README" else ROOT / "docs" / f"{page}.md"
    return " ".join(path.read_text().replace("**", "").split())


def table_row(page: str, start: str, after: str | None = None) -> list[str]:
    """The cells of the first markdown table row of ``page`` that starts with ``| start`` (bold marks dropped; end
    ``start`` with `` |`` for a whole first cell); ``after``: only rows after the first line containing that text."""
    lines = (ROOT / "README.md" if page == "README" else ROOT / "docs" / f"{page}.md").read_text().splitlines()
    if after is not None:
        lines = lines[next(i for i, line in enumerate(lines) if after in line) :]
    row = next(line for line in lines if line.replace("**", "").startswith(f"| {start}"))
    return [cell.strip() for cell in row.replace("**", "").strip().strip("|").split("|")]


def numbers(text: str) -> list[float]:
    """Every number in ``text`` in order (unicode minus read as minus; thousands separators dropped)."""
    return [float(x.replace(",", "")) for x in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text.replace("−", "-"))]
