"""Turn loaded runs into report.html (self-contained: PNGs inline as base64, no scripts, no network), report.md
(with the PNGs in a folder beside it) and results.csv (one row per run)."""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .analysis import Group, budget_groups, fit_power_law, mean_std, resolve_price, seed_groups
from .collect import Run


def fmt(v, digits: int = 6) -> str:
    """Numbers as the report prints them (tests parse them back): ints with thousands separators, floats to
    `digits` significant digits, missing as an em dash, NaN / inf (a diverged run) as nan / inf."""
    if v is None:
        return "—"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


@dataclass
class Table:
    id: str
    title: str
    header: list[str]
    rows: list[list] = field(default_factory=list)
    note: str = ""


@dataclass
class Figure:
    id: str
    title: str
    png: bytes


@dataclass
class Report:
    title: str
    meta: list[tuple[str, str]]
    sections: list[tuple[str, list]]  # (heading, [Table | Figure | str])


def build(runs: list[Run], *, title: str = "lmlab report", price: float | None = None, gpu: str | None = None,
          command: str = "") -> tuple[Report, list[dict]]:
    """The report's content and the rows of results.csv."""
    prices = {r.name: resolve_price(price, gpu, r.hardware) for r in runs}
    groups = seed_groups(runs)
    sources = _ordered(k for r in runs for k in r.perplexity)
    tasks = _ordered(k for r in runs for k in r.tasks)
    csv_rows = []

    runs_t = Table("runs", "Runs", ["run", "model", "seed", "params", "tokens", "tokens/param", "steps",
                                    "final train loss", "final val loss", "val ppl", "status"])
    cost_t = Table("cost", "Time, energy and cost", ["run", "wall time (h)", "devices", "GPU-hours", "energy (kWh)",
                                                    "price / GPU-h", "cost", "tokens / GPU-h",
                                                    "val-loss gain over unigram / GPU-h"],
                   note="GPU-hours = wall hours × devices (a CPU run counts one device); energy only where "
                        "measured; cost = GPU-hours × price per GPU-hour (source in the price column).")
    ppl_t = Table("perplexity", "Final perplexity per eval source", ["run", *sources])
    bench_t = Table("benchmarks", "Benchmarks (lm-eval)", ["run", *[f"{t} {m}" for t in tasks
                                                                  for m in _task_metrics(runs, t)]])
    for r in runs:
        p, p_src = prices[r.name]
        cost = r.gpu_hours * p if p is not None else None
        gain = (r.unigram_loss - r.val_loss) / r.gpu_hours if (r.unigram_loss is not None and r.val_loss is not None
                                                              and r.gpu_hours > 0) else None
        tpg = r.tokens / r.gpu_hours if r.tokens and r.gpu_hours > 0 else None
        tpp = r.tokens / r.params if r.tokens and r.params else None
        last_train = r.train_loss
        steps = r.train[-1]["step"] if r.train else None
        runs_t.rows.append([r.name, r.config.get("model", {}).get("name", r.manifest.get("model")), r.seed, r.params,
                            r.tokens, tpp, steps, last_train, r.val_loss, r.val_ppl, r.status_text])
        cost_t.rows.append([r.name, r.wall_s / 3600, r.devices, r.gpu_hours, r.energy_kwh,
                            f"{fmt(p)} ({p_src})" if p is not None else "—", cost, tpg, gain])
        ppl_t.rows.append([r.name, *[r.perplexity.get(s, {}).get("ppl") for s in sources]])
        bench_t.rows.append([r.name, *[r.tasks.get(t, {}).get(m) for t in tasks for m in _task_metrics(runs, t)]])
        row = {"run": r.name, "dir": str(r.dir), "group": next(g.label for g in groups if r in g.runs),
               "model": runs_t.rows[-1][1], "seed": r.seed, "params": r.params, "tokens": r.tokens,
               "tokens_per_param": tpp, "steps": steps, "final_train_loss": last_train, "val_loss": r.val_loss,
               "val_ppl": r.val_ppl, "wall_s": r.wall_s, "devices": r.devices, "gpu_hours": r.gpu_hours,
               "energy_kwh": r.energy_kwh, "price_per_gpu_hour": p, "cost": cost, "tokens_per_gpu_hour": tpg,
               "val_gain_per_gpu_hour": gain, "status": r.status, "diverged": r.diverged}
        row.update({f"objective:{k}": v for k, v in r.objective.items()})
        row.update({f"ppl:{s}": r.perplexity.get(s, {}).get("ppl") for s in sources})
        row.update({f"{t}:{m}": r.tasks.get(t, {}).get(m) for t in tasks for m in _task_metrics(runs, t)})
        sw = _swelu_final(r)
        row.update({f"swelu:{k}": v for k, v in sw.items()})
        csv_rows.append(row)

    objective_t = _objective_table(runs)
    seeds_t = _seed_table(groups, sources, tasks, runs)
    fit_t, fit_fig = _fit(runs)
    budget_ts = _budget_tables(runs)
    sections: list[tuple[str, list]] = [
        ("Runs", [runs_t, *([objective_t] if objective_t else [])]),
        ("Training curves", [_curves_figure(runs)]),
        ("Cost and efficiency", [cost_t]),
    ]
    if sources:
        sections.append(("Perplexity per source", [ppl_t]))
    if tasks:
        sections.append(("Benchmarks", [bench_t, "Scores from lm-eval; on the shipped fixtures they compare models "
                                                  "on the same items and are not comparable with published numbers."]))
    if any(len(g.runs) > 1 for g in groups):
        sections.append(("Across seeds (mean ± std)", [seeds_t]))
    sections.append(("Scaling: final loss against tokens", [fit_t, *([fit_fig] if fit_fig else []), *budget_ts]))
    sw_figs = [f for f in (_swelu_figure(r) for r in runs) if f is not None]
    if sw_figs:
        sections.append(("SWELU k and λ during training", sw_figs))
    gen = _generations(runs)
    if gen is not None:
        sections.append(("Generations on the same prompts", [gen]))
    from .. import __version__

    meta = [("created", time.strftime("%Y-%m-%d %H:%M:%S")), ("runs", str(len(runs))), ("lmlab", __version__)]
    if command:
        meta.append(("command", command))
    return Report(title, meta, sections), csv_rows


def _ordered(keys) -> list[str]:
    out = []
    for k in keys:
        if k not in out:
            out.append(k)
    return out


def _objective_table(runs: list[Run]) -> Table | None:
    """The objective's own metrics (DPO's rewards/*, GRPO's reward, kl, ...) of each run's last train record,
    one column per name any run logged; None when no run has any (pretraining, SFT)."""
    names = _ordered(k for r in runs for k in r.objective)
    if not names:
        return None
    t = Table("objective", "Objective metrics (last logged)", ["run", "objective", *names],
              note="What each run's objective logs beside its loss, as in metrics.jsonl; — where a run has no such "
                   "metric.")
    for r in runs:
        t.rows.append([r.name, r.config.get("train", {}).get("objective") or r.manifest.get("objective"),
                       *[r.objective.get(k) for k in names]])
    return t


def _task_metrics(runs: list[Run], task: str) -> list[str]:
    found = {m for r in runs for m in r.tasks.get(task, {}) if m in ("acc", "acc_norm", "perplexity")}
    return [m for m in ("acc", "acc_norm", "perplexity") if m in found]


def _pm(values: list[float]) -> str:
    m, s = mean_std(values)
    if m is None:
        return "—"
    return f"{fmt(m)} ± {fmt(s)}" if s is not None else fmt(m)


def _seed_table(groups: list[Group], sources, tasks, runs) -> Table:
    cols = [("final val loss", lambda r: r.val_loss), ("val ppl", lambda r: r.val_ppl),
            ("GPU-hours", lambda r: r.gpu_hours)]
    cols += [(f"ppl {s}", lambda r, s=s: r.perplexity.get(s, {}).get("ppl")) for s in sources]
    cols += [(f"{t} {m}", lambda r, t=t, m=m: r.tasks.get(t, {}).get(m)) for t in tasks for m in _task_metrics(runs, t)]
    t = Table("seeds", "Mean ± std across seeds", ["group", "seeds", *[c for c, _ in cols]],
              note="Runs whose configs differ only by train.seed form a group; std is the sample std (n − 1).")
    for g in groups:
        t.rows.append([g.label, ", ".join(str(r.seed) for r in g.runs), *[_pm(g.values(fn)) for _, fn in cols]])
    return t


def _fit(runs: list[Run]) -> tuple[Table, Figure | None]:
    pts = [(r.tokens, r.val_loss, r.params, r.name) for r in runs if r.tokens and r.val_loss]
    law = fit_power_law([p[0] for p in pts], [p[1] for p in pts], [p[2] or 0 for p in pts]) if pts else None
    t = Table("fit", "Power-law fit of final validation loss", ["fit", "a", "alpha (tokens)", "beta (params)", "R²",
                                                                "runs"])
    if law is None:
        t.note = "Not enough runs: a fit needs final losses at two or more token counts."
        return t, None
    t.rows.append([law.formula(), law.a, law.alpha, law.beta, law.r2, law.n])
    t.note = ("Least squares on log L = log a − alpha·log T (− beta·log N when sizes vary), over each run's final "
              "validation loss. A pure power law has no irreducible-loss term, so alpha is a local slope.")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for tok, loss, _, name in pts:
        ax.scatter(tok, loss, label=name)
    xs = sorted({p[0] for p in pts})
    if law.beta is None:
        import numpy as np

        grid = np.geomspace(xs[0], xs[-1], 50)
        ax.plot(grid, law.predict(grid), "k--", label=law.formula())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("final val loss")
    ax.legend(fontsize=7)
    return t, Figure("fig-fit", "Final validation loss against tokens", _png(fig))


def _budget_tables(runs: list[Run]) -> list[Table]:
    out = []
    for i, rs in enumerate(budget_groups(runs)):
        t = Table(f"budget-{i}", "Same configuration, different token budgets",
                  ["run", "tokens", "tokens/param", "final val loss", "GPU-hours", "Δ loss vs smallest budget"])
        base = rs[0].val_loss
        for r in rs:
            tpp = r.tokens / r.params if r.tokens and r.params else None
            d = r.val_loss - base if r.val_loss is not None and base is not None else None
            t.rows.append([r.name, r.tokens, tpp, r.val_loss, r.gpu_hours, d])
        out.append(t)
    return out


def _swelu_final(r: Run) -> dict[str, float]:
    if not r.swelu:
        return {}
    last = r.swelu[-1]
    return {k: v for k, v in last.items() if k.endswith((".k", ".lam")) and isinstance(v, int | float)}


def _generations(runs: list[Run]) -> Table | None:
    prompts = _ordered(s.get("prompt") for r in runs for s in r.samples if s.get("prompt") is not None)
    if not prompts:
        return None
    t = Table("generations", "Generations (each run's last sample per prompt)", ["prompt", "run", "step",
                                                                                   "completion"])
    for p in prompts:
        for r in runs:
            last = [s for s in r.samples if s.get("prompt") == p]
            if last:
                t.rows.append([p, r.name, last[-1].get("step"), last[-1].get("completion", "")])
    return t


# ---------------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    _plt().close(fig)
    return buf.getvalue()


def _curves_figure(runs: list[Run]) -> Figure:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        for ax, key in ((axes[0], "tokens"), (axes[1], "gpu_hours")):
            tr = [(_x(rec, key, r), rec["loss"]) for rec in r.train if isinstance(rec.get("loss"), int | float)]
            ev = [(_x(rec, key, r), rec["val_loss"]) for rec in r.evals if isinstance(rec.get("val_loss"), int | float)]
            tr = [p for p in tr if p[0] is not None]
            ev = [p for p in ev if p[0] is not None]
            if tr:
                ax.plot(*zip(*tr), color=c, alpha=0.45, lw=1, label=f"{r.name} train")
            if ev:
                ax.plot(*zip(*ev), color=c, marker="o", ms=3, lw=1.5, ls="--", label=f"{r.name} val")
    axes[0].set_xlabel("tokens")
    axes[1].set_xlabel("GPU-hours")
    axes[0].set_ylabel("loss (nats/token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right")
    return Figure("fig-curves", "Train and validation loss against tokens and against GPU-hours", _png(fig))


def _x(rec: dict, key: str, r: Run):
    if key == "tokens":
        return rec.get("tokens")
    s = rec.get("_active_s")
    return s / 3600 * r.devices if s is not None else None


def _swelu_figure(r: Run) -> Figure | None:
    if not r.swelu:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.4), layout="constrained")
    names = _ordered(k.rsplit(".", 1)[0] for k in r.swelu[-1] if k.endswith((".k", ".lam")))
    for ax, p, label in ((axes[0], "k", "k"), (axes[1], "lam", "λ")):
        for n in names:
            pts = [(rec["step"], rec[f"{n}.{p}"]) for rec in r.swelu if isinstance(rec.get(f"{n}.{p}"), int | float)]
            if pts:
                ax.plot(*zip(*pts), lw=1, label=n)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if len(names) <= 12:
        axes[1].legend(fontsize=6, loc="best")
    return Figure(f"fig-swelu-{r.name}", f"SWELU k and λ per layer: {r.name}", _png(fig))


# ---------------------------------------------------------------------------------------------------- writers


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right;vertical-align:top}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
td.text{text-align:left;white-space:pre-wrap;font-family:monospace;max-width:600px}.note{color:#666;font-size:12px}
img{max-width:100%;border:1px solid #eee}"""


def write_html(report: Report, path: Path) -> None:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{e(report.title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(report.title)}</h1>", "<table id=\"meta\">"]
    parts += [f"<tr><th>{e(k)}</th><td class=\"text\">{e(v)}</td></tr>" for k, v in report.meta]
    parts.append("</table>")
    for heading, items in report.sections:
        parts.append(f"<h2>{e(heading)}</h2>")
        for it in items:
            if isinstance(it, Table):
                parts.append(f"<h3>{e(it.title)}</h3><table id=\"{e(it.id)}\"><thead><tr>"
                             + "".join(f"<th>{e(h)}</th>" for h in it.header) + "</tr></thead><tbody>")
                for row in it.rows:
                    cells = []
                    for v in row:
                        cls = ' class="text"' if isinstance(v, str) and (len(v) > 40 or it.id == "generations") else ""
                        cells.append(f"<td{cls}>{e(fmt(v))}</td>")
                    parts.append("<tr>" + "".join(cells) + "</tr>")
                parts.append("</tbody></table>")
                if it.note:
                    parts.append(f"<p class=\"note\">{e(it.note)}</p>")
            elif isinstance(it, Figure):
                b64 = base64.b64encode(it.png).decode()
                parts.append(f"<figure id=\"{e(it.id)}\"><img alt=\"{e(it.title)}\" "
                             f"src=\"data:image/png;base64,{b64}\"><figcaption>{e(it.title)}</figcaption></figure>")
            else:
                parts.append(f"<p class=\"note\">{e(str(it))}</p>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def write_markdown(report: Report, path: Path) -> None:
    img_dir = path.parent / f"{path.stem}_files"
    lines = [f"# {report.title}", ""]
    lines += [f"- {k}: `{v}`" for k, v in report.meta]
    for heading, items in report.sections:
        lines += ["", f"## {heading}", ""]
        for it in items:
            if isinstance(it, Table):
                lines += [f"### {it.title}", "", "| " + " | ".join(it.header) + " |",
                          "|" + "|".join("---" for _ in it.header) + "|"]
                lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in it.rows]
                if it.note:
                    lines += ["", f"_{it.note}_"]
                lines.append("")
            elif isinstance(it, Figure):
                img_dir.mkdir(exist_ok=True)
                (img_dir / f"{it.id}.png").write_bytes(it.png)
                lines += [f"![{it.title}]({img_dir.name}/{it.id}.png)", ""]
            else:
                lines += [f"_{it}_", ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _md_cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", "⏎ ")


def write_csv(rows: list[dict], path: Path) -> None:
    cols = _ordered(k for row in rows for k in row)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
