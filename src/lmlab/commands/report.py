"""lmlab report: one self-contained HTML report (plus report.md and results.csv) from a study or runs."""

from __future__ import annotations

import shlex
import sys

HELP = "write a self-contained HTML report (+ markdown, CSV) comparing the runs of a study or a list of runs"


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="STUDY_DIR|RUN", help="a study folder or run folders")
    p.add_argument("-o", "--out", default=None, help="HTML file (default: report.html in the study folder, or here "
                   "for several paths); report.md and results.csv go beside it")
    p.add_argument("--title", default=None)
    p.add_argument("--price-per-hour", type=float, default=None,
                   help="price per GPU-hour for the cost (default: the study file's, or the planner's table)")
    p.add_argument("--gpu", default=None, help="GPU name in the planner's hardware table (rtx4090, a100-80, h100, "
                   "h200, ...): its price per GPU-hour")


def run(args) -> int:
    from pathlib import Path

    from ..report import build_report

    out = args.out
    if out is None:
        only = Path(args.paths[0])
        out = only / "report.html" if len(args.paths) == 1 and not (only / "run.json").is_file() else "report.html"
    cmd = "lmlab report " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else ""
    res = build_report(args.paths, out, title=args.title, price_per_hour=args.price_per_hour, gpu=args.gpu,
                       command=cmd)
    print(f"report    {res['html']}  ({res['runs']} runs)")
    print(f"markdown  {res['markdown']}")
    print(f"csv       {res['csv']}")
    return 0
