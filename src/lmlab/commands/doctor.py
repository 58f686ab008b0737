"""lmlab doctor: what is going wrong with a run, in plain words, with numbers and what to do."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders holding runs")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")


def run(args) -> int:
    """Exit code 0 when no run has a warning or an error, 1 otherwise (notes do not count)."""
    import json

    from ..monitor.doctor import diagnose, text_report
    from ..monitor.runread import RunReader, resolve_runs

    results = []
    for path in resolve_runs(args.runs):
        r = RunReader(path)
        results.append((r, diagnose(r)))
    if args.json:
        print(json.dumps([{"run": str(r.path), "status": r.state.status, "findings": [f.to_dict() for f in fs]}
                          for r, fs in results], indent=1))
    else:
        print("\n\n".join(text_report(r, fs) for r, fs in results))
    return int(any(f.severity in ("error", "warning") for _, fs in results for f in fs))
