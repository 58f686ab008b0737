"""`lmlab study --dry-run`: each cell's memory, time and cost from the planner, and the local schedule.

    rows, schedule = plan(study)          # nothing is written, nothing is trained
    print(format_plan(study, rows, schedule))

Time comes from `lmlab.plan.estimate.estimate` on the study's `hardware` (GPUs: peak × MFU); on a CPU the planner
does not guess a speed, so a study may give `throughput` (tokens/s per run, measured) and the schedule uses it.
The schedule is the local executor's queue replayed with those durations: each cell starts on the first free
GPU group (its pinned one if it has one), at most max_parallel at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .spec import Cell, Study
from .state import cell_state


@dataclass
class Row:
    cell: Cell
    state: str
    params: int
    tokens: int | None
    steps: int | None
    memory_gib: float
    fits: bool
    hours: float | None
    gpu_hours: float | None
    cost: float | None
    hardware: str


@dataclass
class Slot:
    cell: Cell
    group: tuple[int, ...]
    start_h: float | None
    end_h: float | None
    wave: int


def _hardware(study: Study, cell: Cell) -> str:
    return study.hardware or ("cpu" if not study.gpus and cell.gpus_per_run == 0 else "a100-80")


def estimate_cell(study: Study, cell: Cell, cache: dict | None = None):
    """The planner's Estimate for one cell (cached across cells that differ only by seed or name)."""
    from ..plan.estimate import _run_vocab, estimate

    cfg, t = cell.config, cell.config.train
    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k != "run"} | {"seed": None, "g": cell.gpus_per_run,
                                                                                "n": cell.nodes}, sort_keys=True,
                     default=str)
    key = key.replace(f'"seed": {t.seed}', '"seed": null')
    if cache is not None and key in cache:
        return cache[key]
    gpus = max(1, (len(cell.gpus) if cell.gpus is not None else cell.gpus_per_run) * cell.nodes)
    est = estimate(cfg.model.name, seq_len=cfg.data.seq_len, micro_batch=t.batch_size, grad_accum=t.grad_accum,
                   precision=None if t.precision == "auto" else t.precision, hardware=_hardware(study, cell),
                   gpus=gpus, tokens=t.max_tokens, token_ratio=t.token_ratio if t.max_tokens is None else None,
                   steps=t.max_steps if t.max_tokens is None and t.token_ratio is None else None,
                   vocab_size=_run_vocab(cfg), overrides=cfg.model.overrides or None,
                   trust_remote_code=cfg.model.trust_remote_code, checkpointing=t.activation_checkpointing,
                   price_per_hour=study.price_per_hour, suggest=False)
    if cache is not None:
        cache[key] = est
    return est


def plan(study: Study, *, gpus: list[int] | None = None, max_parallel: int | None = None):
    """(rows, schedule): the planner's numbers per cell and the replayed local queue."""
    from ..plan.estimate import gib

    cache: dict = {}
    rows = []
    for cell in study.cells:
        est = estimate_cell(study, cell, cache)
        hours, gpu_hours, cost = est.hours, est.gpu_hours, est.cost
        if hours is None and study.throughput and est.tokens:
            hours = est.tokens / study.throughput / 3600
            gpu_hours = hours * est.gpus if est.hardware != "cpu" else None
            cost = gpu_hours * est.price_per_hour if gpu_hours is not None else None
        rows.append(Row(cell, cell_state(cell.run_dir).kind, est.params_total, est.tokens, est.steps,
                        gib(est.memory["total"]), est.fits, hours, gpu_hours, cost, est.hardware))
    return rows, schedule(study, rows, gpus=gpus, max_parallel=max_parallel)


def schedule(study: Study, rows: list[Row], *, gpus: list[int] | None = None,
             max_parallel: int | None = None) -> list[Slot]:
    """Replay the local queue: finished cells take no time; unknown durations count as one wave each."""
    from .local import _default_parallel, _take

    gpus = list(gpus if gpus is not None else study.gpus)
    limit = max_parallel or study.max_parallel or _default_parallel(study, gpus)
    timed = all(r.hours is not None for r in rows if r.state != "finished")
    pending = [r for r in rows if r.state != "finished"]
    now, free, running, out = 0.0, list(gpus), [], []  # running: (end, group)
    wave = 0
    while pending:
        started = False
        for r in list(pending):
            if len(running) >= limit:
                break
            group = _take(r.cell, free)
            if group is None:
                continue
            free = [g for g in free if g not in group]
            end = now + (r.hours if timed else 1.0)
            running.append((end, group))
            out.append(Slot(r.cell, group, now if timed else None, end if timed else None, wave))
            pending.remove(r)
            started = True
        if not pending:
            break
        if not running and not started:  # nothing can ever start (a group larger than the machine)
            break
        running.sort(key=lambda x: x[0])
        end, group = running.pop(0)
        now = end
        free += list(group)
        if not timed or not running or running[0][0] > now:
            wave += 1
    return out


def _h(h: float | None) -> str:
    if h is None:
        return "-"
    return f"{h * 60:.1f} min" if h < 1 else f"{h:.1f} h"


def _money(x: float | None) -> str:
    return "-" if x is None else f"{x:,.2f}"


def format_plan(study: Study, rows: list[Row], slots: list[Slot]) -> str:
    lines = [f"study     {study.name}: {len(rows)} runs in {study.out_dir}"]
    width = max(len(r.cell.name) for r in rows)
    lines.append(f"{'run':<{width}}  {'state':<8} {'params':>10} {'tokens':>12} {'steps':>8} {'memory':>9} "
                 f"{'time':>9} {'GPU-h':>8} {'cost':>9}  where")
    for r in rows:
        g = r.cell.gpus if r.cell.gpus is not None else r.cell.gpus_per_run
        where = (f"{r.hardware} x{len(g) if isinstance(g, tuple) else g}" if g else r.hardware)
        if r.cell.nodes > 1:
            where += f" x{r.cell.nodes} nodes"
        lines.append(f"{r.cell.name:<{width}}  {r.state:<8} {r.params:>10,} {_num(r.tokens):>12} {_num(r.steps):>8} "
                     f"{r.memory_gib:>6.2f} GiB{'' if r.fits else '!'} {_h(r.hours):>9} "
                     f"{'-' if r.gpu_hours is None else f'{r.gpu_hours:,.1f}':>8} {_money(r.cost):>9}  {where}")
    if not all(r.fits for r in rows):
        lines.append("!         does not fit in memory on this hardware (lmlab estimate shows what would)")
    lines.append("")
    lines.append("schedule  (the local queue; run with --executor slurm or ray to let the cluster schedule)")
    for s in slots:
        where = f"GPUs {','.join(map(str, s.group))}" if s.group else "CPU"
        when = (f"{_h(s.start_h):>9} -> {_h(s.end_h):>9}" if s.start_h is not None else f"wave {s.wave + 1}")
        lines.append(f"  {s.cell.name:<{width}}  {where:<14} {when}")
    todo = [r for r in rows if r.state != "finished"]
    if not todo:
        lines.append("total     nothing to run")
    elif slots and slots[-1].end_h is not None:
        total = max(s.end_h for s in slots)
        gh = sum(r.gpu_hours or 0 for r in todo)
        cost = sum(r.cost or 0 for r in todo)
        extra = f", {gh:,.1f} GPU-h, {cost:,.2f} USD" if gh else ""
        lines.append(f"total     {len(todo)} runs to go, about {_h(total)} wall time{extra}")
    else:
        lines.append(f"total     {len(todo)} runs to go (no time estimate on CPU: give the study a measured "
                     f"`throughput` in tokens/s per run)")
    done = len(rows) - len(todo)
    if done:
        lines.append(f"          {done} already finished (skipped)")
    return "\n".join(lines)


def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:,}" if x < 1e6 else f"{x / 1e6:,.2f}M" if x < 1e9 else f"{x / 1e9:,.2f}B"


__all__ = ["Row", "Slot", "estimate_cell", "format_plan", "plan", "schedule"]
