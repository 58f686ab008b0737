"""Two runs' validation losses side by side, eval by eval (e.g. fp32 against bf16 of the same recipe).

    python bench/compare_curves.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl

Prints a markdown table; asserts nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import table


def evals(path: str) -> dict[int, float]:
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and "val_loss" in rec:
            out[rec["step"]] = rec["val_loss"]
    return out


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/compare_curves.py A/metrics.jsonl B/metrics.jsonl")
    a, b = evals(sys.argv[1]), evals(sys.argv[2])
    rows = [[step, f"{a[step]:.4f}", f"{b[step]:.4f}", f"{b[step] - a[step]:+.4f}"] for step in sorted(a) if step in b]
    table(f"Validation loss: {Path(sys.argv[1]).parent.name} (A) against {Path(sys.argv[2]).parent.name} (B)",
          ["step", "A", "B", "B − A"], rows)


if __name__ == "__main__":
    main()
