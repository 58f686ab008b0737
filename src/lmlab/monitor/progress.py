"""Progress display: a rich bar (loss, LR, tokens/s, ETA) on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time


def _fmt_time(s: float) -> str:
    if not (s >= 0) or s == float("inf"):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, echo=print, stream=None):
        self.total, self.start, self.enabled, self.echo = total, start, enabled, echo
        self.stream = stream or sys.stdout
        self.tty = enabled and self.stream.isatty()
        self._bar = None
        self._t0 = time.perf_counter()
        self._step = start

    def __enter__(self):
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return float("inf")
        return (time.perf_counter() - self._t0) / done * (self.total - step)

    def update(self, step: int, loss: float | None = None, lr: float | None = None, tok_s: float | None = None):
        self._step = step
        if not self.enabled:
            return
        if loss is None:
            if self._bar is not None:
                self._bar.update(self._task, completed=step)
            return
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            self.echo(f"step {step:>6}/{self.total}  {info}  eta {_fmt_time(self.eta(step))}")

    def note(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(line)
        else:
            self.echo(line)
