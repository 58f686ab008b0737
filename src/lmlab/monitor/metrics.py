"""Where a run's numbers go: metrics.jsonl (one JSON object per line), TensorBoard, and train.log.

Every record has `kind` ("train", "eval", "event", "swelu", "sample", ...), `step`, `time` (unix
seconds) and its fields. Files are appended and flushed line by line, so `tail -f` and other
tools can read a run while it trains. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return v


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self._jsonl = self._log = self._tb = None
        if not enabled:
            return
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self._log = open(run_dir / "train.log", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            except ImportError:  # tensorboard missing: jsonl and log still work
                self._tb = None

    def log(self, kind: str, step: int, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        self._jsonl.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in fields.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def text(self, line: str) -> None:
        """A line for the human log (train.log)."""
        if self.enabled:
            self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def close(self) -> None:
        if not self.enabled:
            return
        for f in (self._jsonl, self._log):
            f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    """All records of a run (optionally of one kind); a torn last line (crash mid-write) is skipped."""
    from ..fsutil import read_jsonl

    return [r for r in read_jsonl(Path(run_dir) / "metrics.jsonl") if kind is None or r.get("kind") == kind]
