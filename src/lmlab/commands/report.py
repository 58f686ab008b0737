"""lmlab report: one self-contained HTML report (plus report.md and results.csv) from a study or runs."""

from __future__ import annotations

import shlex
import sys


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="STUDY_DIR|RUN", help="a study folder or run folders")
    p.add_argument("-o", "--out", default=None, help="HTML file (default: report.html in the study folder, or here "
                   "for several paths); report.md and results.csv go beside it")
    import argparse

    from ._common import add_hardware_flags

    p.add_argument("--title", default=None, help="the report's title (default: lmlab report: the paths' names)")
    add_hardware_flags(p, gpus_flag=False, hardware_help="its price per GPU-hour, when --price-per-hour and the "
                                                         "study file give none")
    p.add_argument("--gpu", dest="hardware", help=argparse.SUPPRESS)  # the former spelling of --hardware


def run(args) -> int:
    from pathlib import Path

    from .. import runs
    from ..report import build_report

    out = args.out
    if out is None:
        only = Path(args.paths[0])
        out = only / "report.html" if len(args.paths) == 1 and not runs.is_run(only) else "report.html"
    cmd = "lmlab report " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else ""
    res = build_report(args.paths, out, title=args.title, price_per_hour=args.price_per_hour, gpu=args.hardware,
                       command=cmd)
    print(f"report    {res['html']}  ({res['runs']} runs)")
    print(f"markdown  {res['markdown']}")
    print(f"csv       {res['csv']}")
    return 0
