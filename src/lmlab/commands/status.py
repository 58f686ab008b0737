"""lmlab status: where each run stands, once (text, or JSON for scripts)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="*", default=["runs"], metavar="RUN",
                   help="run folders, or folders holding runs (a study, runs/); default: runs")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per run")


def run(args) -> int:
    from ..monitor.runread import resolve_runs
    from ..monitor.status import json_report, no_runs_text, read_states, text_report

    paths = resolve_runs(args.runs, allow_empty=True)
    if not paths and not args.json:
        print(no_runs_text(args.runs))
        return 0
    readers = read_states(paths)
    print(json_report(readers) if args.json else text_report(readers))
    return 0
