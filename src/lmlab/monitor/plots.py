"""`lmlab plot RUN… -o FILE.png`: training loss, validation loss, learning rate and throughput of one or
several runs on shared axes (raw lines faint, smoothed lines solid). Uses matplotlib's Agg backend,
so it works on a machine without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .runread import RunReader, ema

PANELS = [
    ("train", "loss", "training loss", True),
    ("eval", "val_loss", "validation loss", False),
    ("train", "lr", "learning rate", False),
    ("train", "tok_s", "tokens / s", True),
]


def plot_runs(runs: Sequence[str | Path | RunReader], out: str | Path | None = None, *, x: str = "step",
              smooth: float = 0.9, log_loss: bool = False):
    """Draw the runs and return the matplotlib Figure (saved to `out` when given).

    Every panel has, per run, a line labelled '<run>' (raw values) and, for noisy series, one labelled
    '<run> (smoothed)' (debiased EMA with weight `smooth`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    readers = [r if isinstance(r, RunReader) else RunReader(r) for r in runs]
    for r in readers:
        r.refresh()
    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    colors = [f"C{i % 10}" for i in range(len(readers))]
    for ax, (kind, key, title, noisy) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        for r, c in zip(readers, colors):
            xs, ys = r.series(kind, key, x=x)
            if not xs:
                continue
            if noisy and smooth > 0:
                ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8, label=r.name)
                ax.plot(xs, ema(ys, smooth), color=c, linewidth=1.6, label=f"{r.name} (smoothed)")
            else:
                ax.plot(xs, ys, color=c, linewidth=1.4, marker="o" if kind == "eval" else None, markersize=3,
                        label=r.name)
        if log_loss and key in ("loss", "val_loss"):
            ax.set_yscale("log")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes[1]:
        ax.set_xlabel("tokens" if x == "tokens" else "step")
    for ax in axes.flat:
        if ax.get_lines():
            ax.legend(fontsize="small")
    if out is not None:
        fig.savefig(out, dpi=120)
    return fig
