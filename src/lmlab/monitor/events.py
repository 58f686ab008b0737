"""The event sink: the one writer of a run's records besides checkpoints.

    sink.log(kind, step, **fields)    a record in metrics.jsonl (and a TensorBoard scalar per number)
    sink.text(line)                   a line in train.log
    sink.event(name, step, text, ...) both: a `kind: "event"` record and its log line
    sink.say(line)                    the console (rank 0 only), above the progress bar
    sink.note(line)                   the console only while progress is shown (validation lines)
    sink.progress(total, start)       the live progress bar (a context); sink.update(step, ...) moves it, and
                                      at log steps shows loss, LR, tokens/s and the objective's own metrics

Every other rank gets a sink that writes nothing. Records may come from a side thread (system stats):
writes are serialised by a lock. `sink.attach(trackers)` also forwards every record to W&B / trackio
(lmlab.monitor.trackers); `sink.close(status)` finishes them with the run's final status.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .metrics import MetricsWriter
from .progress import Progress, _fmt_time


def compact(metrics: dict[str, float], limit: int = 6) -> str:
    """An objective's metrics on one short line: `rewards/margin 0.41  rewards/accuracy 0.75` (at most `limit`)."""
    items = list(metrics.items())
    more = f"  +{len(items) - limit} more" if len(items) > limit else ""
    return "  ".join(f"{k} {v:.4g}" for k, v in items[:limit]) + more


class _Progress(Progress):
    """The progress display with the objective's metrics after loss, LR and tokens/s."""

    def update(self, step: int, loss: float | None = None, lr: float | None = None, tok_s: float | None = None,
               metrics: dict[str, float] | None = None):
        if loss is None or not metrics or not self.enabled:
            return super().update(step, loss, lr, tok_s)
        self._step = step
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  {compact(metrics)}"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            self.echo(f"step {step:>6}/{self.total}  {info}  eta {_fmt_time(self.eta(step))}")


class EventSink:
    def __init__(self, run_dir: Path, *, enabled: bool = True, echo=print, show_progress: bool = True):
        self.enabled, self._echo, self.show_progress = enabled, echo, show_progress
        self._writer = MetricsWriter(run_dir, enabled=enabled)
        self._lock = threading.Lock()
        self._progress = None
        self._trackers = None

    def attach(self, trackers) -> None:
        """Forward every `log` record to `trackers` (lmlab.monitor.trackers.Trackers; None: nothing)."""
        self._trackers = trackers

    def say(self, line: str = "") -> None:
        """Always printed (rank 0); above the bar when one is live."""
        if not self.enabled:
            return
        if self._progress is not None and self._progress.tty:
            self._progress.note(line)
        else:
            self._echo(line)

    def note(self, line: str) -> None:
        """Printed with the progress display (step lines, validation lines); silent when progress is off."""
        if self._progress is not None:
            self._progress.note(line)

    def log(self, kind: str, step: int, **fields: Any) -> None:
        with self._lock:
            self._writer.log(kind, step, **fields)
            if self._trackers is not None:  # a queue hand-off: never waits on the service
                self._trackers.log(kind, step, fields)

    def text(self, line: str) -> None:
        with self._lock:
            self._writer.text(line)

    def event(self, name: str, step: int, text: str | None = None, **fields: Any) -> None:
        self.log("event", step, event=name, **fields)
        if text:
            self.text(text)

    @contextmanager
    def progress(self, total: int, start: int):
        self._progress = _Progress(total, start=start, enabled=self.enabled and self.show_progress, echo=self._echo)
        try:
            with self._progress:
                yield self._progress
        finally:
            self._progress = None

    def update(self, step: int, **fields) -> None:
        """Move the progress display; at log steps `loss`, `lr`, `tok_s` and `metrics` (a dict) are shown."""
        if self._progress is not None:
            self._progress.update(step, **fields)

    def eta(self, step: int) -> float | None:
        return self._progress.eta(step) if self._progress is not None else None

    def close(self, status: str = "finished") -> None:
        trackers, self._trackers = self._trackers, None
        if trackers is not None:  # outside the lock: their side thread may still write a warning line
            trackers.close(status)
        with self._lock:
            self._writer.close()
