"""lmlab watch: a live terminal dashboard of runs (loss, val loss, LR, throughput, checkpoints, GPUs, log)."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="*", default=["runs"], metavar="RUN",
                   help="run folders, or folders holding runs (a study, runs/); default: runs")
    p.add_argument("-n", "--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--no-gpu", action="store_true", help="do not read GPU stats")


def run(args) -> int:
    from ..errors import LmlabError
    from ..monitor.runread import resolve_runs

    if args.interval <= 0:
        raise LmlabError(f"--interval: must be > 0, got {args.interval}")
    resolve_runs(args.runs, allow_empty=True)  # a missing folder fails with one line before the screen switches;
    # an existing one with no run yet (a study about to start) is watched until runs appear
    from ..monitor.watch import watch

    watch(args.runs, interval=args.interval, gpus=not args.no_gpu)
    return 0
