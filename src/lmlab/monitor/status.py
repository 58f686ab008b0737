"""The facts about runs, once: as text (`lmlab status`) or JSON (`lmlab status --json`).

The small formatters here (durations, sizes, bars, sparklines) are shared with `lmlab watch`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence

from .runread import RunReader, RunState, finite

SPARK = "▁▂▃▄▅▆▇█"


def fmt_num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def fmt_duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def fmt_rate(v: float | None) -> str:
    if not finite(v):
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def bar(frac: float | None, width: int = 10) -> str:
    if frac is None:
        return "░" * width
    full = int(round(max(0.0, min(1.0, frac)) * width))
    return "█" * full + "░" * (width - full)


def spark(values: Sequence[float | None], width: int = 16) -> str:
    """A one-line sparkline of the last `width` finite values (resampled by averaging when longer)."""
    vals = [v for v in values if finite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        chunks = [vals[len(vals) * i // width:len(vals) * (i + 1) // width] for i in range(width)]
        vals = [sum(c) / len(c) for c in chunks]
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        return SPARK[len(SPARK) // 2] * len(vals)
    return "".join(SPARK[int((v - lo) / (hi - lo) * (len(SPARK) - 1))] for v in vals)


def status_word(s: RunState) -> str:
    """running / finished / … plus what we know about the process: 'running', 'running (dead?)' …, and
    'stopped (diverged)' for a run the guard stopped."""
    if s.status == "running":
        if s.alive is False:
            return "running (dead)"
        if s.alive is None:
            return "running (?)"
    if s.diverged and s.status in ("stopped", "failed", "finished"):  # (run.json may say "diverged" itself)
        return f"{s.status} (diverged)"
    return s.status


ENDED_EARLY = ("stopped", "failed", "diverged")  # statuses whose reason and resume command are shown
OBJECTIVE_SHOWN = 6  # objective metrics in the compact column / line


def objective_text(s: RunState, limit: int = OBJECTIVE_SHOWN) -> str:
    """The objective's own metrics of the last train record, compactly: 'reward 0.52  kl 0.0131 …' ('' if none).
    Grouped names (rewards/chosen, rewards/margins) keep their last part when the group is shown once."""
    items = list(s.objective.items())
    if not items:
        return ""
    parts = [f"{k} {fmt_num(v, 3)}" for k, v in items[:limit]]
    return "  ".join(parts) + (f"  (+{len(items) - limit} more)" if len(items) > limit else "")


def step_text(s: RunState) -> str:
    if s.total_steps:
        return f"{s.step:,}/{s.total_steps:,}"
    return f"{s.step:,}"


def ckpt_text(s: RunState) -> str:
    if not s.last_checkpoint:
        return "final" if s.has_final else "none"
    return f"{s.last_checkpoint_step:,} ({fmt_duration(s.checkpoint_age_s)} ago)"


def row(s: RunState, loss_history: Sequence[float | None] = ()) -> dict[str, str]:
    """One run as the columns both `status` and `watch` show."""
    val = "-" if s.val_loss is None else f"{fmt_num(s.val_loss)} / {fmt_num(s.val_ppl, 5)}"
    pct = f" {100 * s.progress:3.0f}%" if s.progress is not None else ""
    loss = fmt_num(s.loss_smooth)
    if loss_history:
        loss = f"{loss} {spark(loss_history, 10)}"
    return {
        "run": s.name,
        "status": status_word(s),
        "step": f"{step_text(s)} {bar(s.progress, 8)}{pct}",
        "loss": loss,
        "val loss / ppl": val,
        "lr": fmt_num(s.lr, 3),
        "grad norm": fmt_num(s.grad_norm, 3),
        "tok/s": fmt_rate(s.tok_s),
        "eta": fmt_duration(s.eta_s),
        "checkpoint": ckpt_text(s),
        "disk free": fmt_bytes(s.disk_free),
        "objective": objective_text(s, 3),
    }


def text_report(readers: Sequence[RunReader]) -> str:
    """A plain-text block per run (stable, grep-able, fits `watch -n 30`)."""
    out = []
    for r in readers:
        s = r.state
        cols = row(s)
        out.append(f"{s.name}  {cols['status']}" + (f"  pid {s.pid} on {s.host}" if s.pid else ""))
        out.append(f"  step        {cols['step']}   eta {cols['eta']}")
        out.append(f"  loss        {fmt_num(s.loss_smooth)} smoothed, {fmt_num(s.loss)} last"
                   f"   val {cols['val loss / ppl']}")
        out.append(f"  lr          {cols['lr']}   grad norm {cols['grad norm']}   tok/s {cols['tok/s']}")
        last = "-" if s.last_record is None else f"{fmt_duration(time.time() - s.last_record)} ago"
        out.append(f"  checkpoint  {cols['checkpoint']}   last record {last}   disk free {cols['disk free']}")
        if s.objective:
            out.append(f"  objective   {objective_text(s)}")
        if s.stop_reason and s.status in ENDED_EARLY:
            out.append(f"  {s.status:<11} {s.stop_reason}")
        if s.resume_command and s.status in ENDED_EARLY:
            out.append(f"  continue    {s.resume_command}")
        if s.restarts or s.skipped:
            starts = f" (from step {', '.join(f'{x:,}' for x in s.resumed_from)})" if s.resumed_from else ""
            out.append(f"  history     {s.restarts} restart{'s' * (s.restarts != 1)}{starts}   "
                       f"{s.skipped} step{'s' * (s.skipped != 1)} skipped by the guard")
        for p in s.problems:
            out.append(f"  note        {p}")
    return "\n".join(out)


def json_report(readers: Sequence[RunReader]) -> str:
    return json.dumps([r.state.to_dict() for r in readers], indent=1)


def no_runs_text(paths) -> str:
    """What `status` prints for folders that hold no run yet (a study whose cells have not started)."""
    return f"no runs yet in {', '.join(str(p) for p in paths)} (run folders appear here as they start)"


def read_states(paths) -> list[RunReader]:
    readers = [RunReader(p) for p in paths]
    for r in readers:
        r.refresh()
    return readers
