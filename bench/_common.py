"""What the bench scripts share. They run as `python bench/<script>.py`, which puts this folder on sys.path."""

from __future__ import annotations

import sys


def table(title: str, header: list[str], rows: list[list]) -> None:
    """Print a markdown table under a `###` title (docs/benchmarks.md keeps them as printed)."""
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    sys.stdout.flush()
