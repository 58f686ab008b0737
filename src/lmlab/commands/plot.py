"""lmlab plot: loss, val loss, LR and throughput of runs on shared axes, to a PNG (or SVG/PDF) file."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders holding runs")
    p.add_argument("-o", "--output", default="plot.png", help="image file (.png, .svg, .pdf); default plot.png")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="horizontal axis (default step)")
    p.add_argument("--smooth", type=float, default=0.9, help="EMA weight for the smoothed lines, 0 = off")
    p.add_argument("--log", action="store_true", help="log scale for the loss panels")


def run(args) -> int:
    from ..errors import LmlabError
    from ..monitor.runread import resolve_runs

    if not 0 <= args.smooth < 1:
        raise LmlabError(f"--smooth: must be in [0, 1), got {args.smooth}")
    runs = resolve_runs(args.runs)
    try:
        from ..monitor.plots import plot_runs
        plot_runs(runs, args.output, x=args.x, smooth=args.smooth, log_loss=args.log)
    except ImportError as e:
        raise LmlabError(f"plotting needs matplotlib: pip install 'lmlab[plot]' ({e})") from e
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0
