"""`lmlab watch`: a live terminal dashboard of one or more runs (Textual; works over SSH).

    ┌ runs ─ one row each: status (+ is the process alive), step/total and bar, smoothed loss and its
    │        sparkline, val loss / perplexity, LR, grad norm, tokens/s, ETA, last checkpoint, disk free
    ├ the selected run: loss, val loss, LR and throughput sparklines │ GPUs (NVML): util, memory, °C, W
    └ the selected run's train.log, followed

It only reads run folders, and incrementally (RunReader), so it can watch from another terminal or
another machine that sees the folder. GPU stats come from this machine's NVML, or, where it has no
GPU, from the `system` records the run itself wrote.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rich.markup import escape
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Label, Log, Sparkline, Static

from ..runs import find_runs
from .gpu import BENIGN_THROTTLE, gpu_stats
from .runread import RunReader, num, read_new_lines, tail_lines
from .status import ENDED_EARLY, bar, fmt_bytes, fmt_duration, fmt_num, fmt_rate, objective_text, row

COLUMNS = ["run", "status", "step", "loss", "val loss / ppl", "lr", "grad norm", "tok/s", "eta", "checkpoint",
           "disk free"]
PLOTS = [  # id, title, record kind, field
    ("loss", "loss (smoothed)", "train", "loss"),
    ("val", "val loss", "eval", "val_loss"),
    ("lr", "learning rate", "train", "lr"),
    ("tok", "tokens/s", "train", "tok_s"),
]
SPARK_POINTS = 240


def gpu_lines(gpus: Sequence[dict]) -> list[str]:
    """One text line per GPU for the panel."""
    out = []
    for g in gpus:
        util, used, total = num(g.get("util")), num(g.get("mem_used")), num(g.get("mem_total"))
        mem = f"{fmt_bytes(used)}/{fmt_bytes(total)}" if used is not None and total else "-"
        thr = [t for t in g.get("throttle") or [] if t not in BENIGN_THROTTLE]
        power = num(g.get("power_w"))
        limit = num(g.get("power_limit_w"))
        pw = "-" if power is None else f"{power:.0f}" + (f"/{limit:.0f}" if limit else "") + " W"
        temp = num(g.get("temp"))
        out.append(f"GPU {g.get('index', '?')} {g.get('name') or ''}".rstrip())
        out.append(f"  util {'-' if util is None else f'{util:3.0f}%'} {bar(None if util is None else util / 100, 10)}"
                   f"  mem {mem}")
        out.append(f"  {'-' if temp is None else f'{temp:.0f}°C'}  {pw}  throttle: {', '.join(thr) or 'none'}")
    return out


class WatchApp(App):
    """The dashboard. `paths`: run folders or folders holding runs (re-scanned for new runs)."""

    TITLE = "lmlab watch"
    CSS = """
    #runs { height: auto; max-height: 14; }
    #detail { height: 1fr; }
    #plots { width: 2fr; padding: 0 1; }
    #plots Label { margin-top: 1; }
    #plots Sparkline { height: 3; }
    #gpus { width: 1fr; border-left: solid $accent; padding: 0 1; }
    #log { height: 12; border-top: solid $accent; }
    """
    BINDINGS = [Binding("q", "quit", "quit"), Binding("r", "refresh_now", "refresh")]

    def __init__(self, paths: Sequence[str | Path], interval: float = 2.0, gpu_source=None, gpus: bool = True):
        super().__init__()
        self.paths = [Path(p) for p in paths]
        self.interval = interval
        self.gpu_source = gpu_source
        self.show_gpus = gpus
        self.readers: dict[str, RunReader] = {}
        self.selected: str | None = None
        self._log_offset = 0
        self._log_run: str | None = None
        self._ticks = 0
        self.columns = list(COLUMNS)  # + "objective" once a run logs its objective's own metrics

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="detail"):
            with Vertical(id="plots"):
                yield Static("", id="title")
                for pid, title, _, _ in PLOTS:
                    yield Label(title, id=f"label-{pid}")
                    yield Sparkline([], id=f"spark-{pid}")
            yield Static("", id="gpus")
        yield Log(id="log", max_lines=2000)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#runs", DataTable)
        for c in COLUMNS:
            table.add_column(c, key=c)
        self.refresh_data()
        self.set_interval(self.interval, self.refresh_data)

    # data ----------------------------------------------------------------------------------------------
    def _discover(self) -> None:
        for p in find_runs(self.paths):
            key = str(p)
            if key not in self.readers:
                self.readers[key] = RunReader(p)

    def refresh_data(self) -> None:
        if self._ticks % 10 == 0 or not self.readers:  # new runs appear in a study folder
            self._discover()
        self._ticks += 1
        now = time.time()
        table = self.query_one("#runs", DataTable)
        states = {key: r.refresh(now) for key, r in self.readers.items()}
        if "objective" not in self.columns and any(s.objective for s in states.values()):
            self.columns.append("objective")  # DPO / GRPO / ... runs: their rewards, kl, ... in one more column
            table.add_column("objective", key="objective", default="")
        for key, r in self.readers.items():
            cells = row(states[key], r.loss_smooth[-48:])
            if key in table.rows:
                for c in self.columns:
                    table.update_cell(key, c, cells[c])
            else:
                table.add_row(*(cells[c] for c in self.columns), key=key)
        if self.selected is None and self.readers:
            self.selected = next(iter(self.readers))
        self.update_detail()
        self.update_gpus()
        self.update_log()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value if event.row_key is not None else None
        if key and key != self.selected:
            self.selected = key
            self.update_detail()
            self.update_gpus()
            self.update_log()

    def action_refresh_now(self) -> None:
        self.refresh_data()

    # panels --------------------------------------------------------------------------------------------
    def update_detail(self) -> None:
        r = self.readers.get(self.selected or "")
        if r is None:
            where = ", ".join(str(p) for p in self.paths)
            self.query_one("#title", Static).update(f"no runs yet in {escape(where)}: waiting for them to appear")
            return
        s = r.state
        extra = ""
        if s.stop_reason and s.status in ENDED_EARLY:
            extra += f"\n{escape(s.status)}: {escape(s.stop_reason)}"
        if s.resume_command and s.status in ENDED_EARLY:
            extra += f"\ncontinue: {escape(s.resume_command)}"
        if s.objective:
            extra += f"\nobjective: {escape(objective_text(s))}"
        self.query_one("#title", Static).update(
            f"[b]{escape(s.name)}[/b]  {escape(s.model or '')}  step {s.step:,}"
            + (f"/{s.total_steps:,}" if s.total_steps else "")
            + f"  elapsed {fmt_duration(s.elapsed_s)}  eta {fmt_duration(s.eta_s)}" + extra)
        for pid, title, kind, key in PLOTS:
            if pid == "loss":
                ys = [v for v in r.loss_smooth if v is not None]
                last = s.loss_smooth
            else:
                ys = r.series(kind, key)[1]
                last = ys[-1] if ys else None
            ys = [v for v in ys if v == v and abs(v) != float("inf")][-SPARK_POINTS:]
            fmt = fmt_rate if key == "tok_s" else fmt_num
            text = fmt(last)
            if ys:
                text += f"   (min {fmt(min(ys))}, max {fmt(max(ys))})"
            self.query_one(f"#label-{pid}", Label).update(f"{title}: {text}")
            self.query_one(f"#spark-{pid}", Sparkline).data = ys

    def update_gpus(self) -> None:
        panel = self.query_one("#gpus", Static)
        if not self.show_gpus:
            panel.update("GPU stats off")
            return
        gpus = gpu_stats(self.gpu_source)
        note = "this machine"
        if not gpus:
            r = self.readers.get(self.selected or "")
            if r is not None and r.system and r.system[-1].get("gpus"):
                gpus = r.system[-1]["gpus"]
                age = time.time() - (num(r.system[-1].get("time")) or 0)
                note = f"recorded by the run {fmt_duration(age)} ago"
        if not gpus:
            panel.update("[b]GPUs[/b]\nno GPU")
            return
        panel.update(f"[b]GPUs[/b] ({note})\n" + "\n".join(gpu_lines(gpus)))

    def update_log(self) -> None:
        log = self.query_one("#log", Log)
        r = self.readers.get(self.selected or "")
        if r is None:
            return
        path = r.path / "train.log"
        switched = self._log_run != self.selected
        if switched:
            log.clear()
            lines, self._log_offset = tail_lines(path, 200)
            self._log_run = self.selected
        else:
            lines, self._log_offset = read_new_lines(path, self._log_offset)
        if lines:
            log.write_lines(lines)
        if switched:
            log.scroll_end(animate=False)
            log.refresh()


def watch(paths: Sequence[str | Path], interval: float = 2.0, gpus: bool = True) -> None:
    WatchApp(paths, interval=interval, gpus=gpus).run()
