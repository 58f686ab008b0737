"""lmlab inspect: how each layer's SWELU shape k and scale λ moved during a run.

Reads the `swelu` records of metrics.jsonl (logged at every log step) and prints, per layer,
the first and latest value, the change and a trend sparkline; `--plot` writes swelu.png.
"""

from __future__ import annotations

from pathlib import Path

_SPARK = "▁▂▃▄▅▆▇█"


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder")
    p.add_argument("--plot", nargs="?", const="", metavar="PNG",
                   help="also write a plot (default: RUN/swelu.png); needs matplotlib")


def sparkline(values: list[float], width: int = 24) -> str:
    if not values:
        return ""
    if len(values) > width:  # sample evenly, keeping the last point
        idx = [round(i * (len(values) - 1) / (width - 1)) for i in range(width)]
        values = [values[i] for i in idx]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        return _SPARK[3] * len(values)
    return "".join(_SPARK[min(7, int((v - lo) / (hi - lo) * 8))] for v in values)


def swelu_history(run_dir: Path) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {"block.0.k": [...], "block.0.lam": [...], ...})."""
    from ..monitor.metrics import read_metrics

    recs = read_metrics(run_dir, "swelu")
    steps = [r["step"] for r in recs]
    series: dict[str, list[float]] = {}
    for r in recs:
        for k, v in r.items():
            if k not in ("kind", "step", "time"):
                series.setdefault(k, []).append(float(v))
    return steps, series


def _layer_key(name: str) -> tuple[int, int]:
    group, idx = name.split(".")[:2]
    return (0 if group == "block" else 1, int(idx))


def run(args) -> int:
    from rich.table import Table

    from ..errors import LmlabError
    from ..runs import read_manifest
    from ._common import console

    run_dir = Path(args.run)
    read_manifest(run_dir)
    steps, series = swelu_history(run_dir)
    if not steps:
        raise LmlabError(f"{run_dir}: no SWELU records in metrics.jsonl (model without SWELU, or no log step yet)")
    layers = sorted({n.rsplit(".", 1)[0] for n in series}, key=_layer_key)
    table = Table(title=f"SWELU per layer, steps {steps[0]:,} → {steps[-1]:,} ({len(steps)} records)")
    for col in ("layer", "k first", "k now", "Δk", "k trend", "λ first", "λ now", "Δλ", "λ trend"):
        table.add_column(col, justify="left" if col in ("layer", "k trend", "λ trend") else "right")
    for layer in layers:
        k, lam = series[f"{layer}.k"], series[f"{layer}.lam"]
        table.add_row(layer, f"{k[0]:.4f}", f"{k[-1]:.4f}", f"{k[-1] - k[0]:+.4f}", sparkline(k),
                      f"{lam[0]:.4f}", f"{lam[-1]:.4f}", f"{lam[-1] - lam[0]:+.4f}", sparkline(lam))
    console().print(table)
    if args.plot is not None:
        out = Path(args.plot) if args.plot else run_dir / "swelu.png"
        plot(steps, series, layers, out)
        print(f"plot: {out}")
    return 0


def plot(steps, series, layers, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import LmlabError

        raise LmlabError("--plot needs matplotlib: pip install 'lmlab[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for layer in layers:
        style = "-" if layer.startswith("block") else "--"
        axes[0].plot(steps, series[f"{layer}.k"], style, label=layer)
        axes[1].plot(steps, series[f"{layer}.lam"], style, label=layer)
    axes[0].set_title("SWELU shape k")
    axes[1].set_title("SWELU scale λ")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
