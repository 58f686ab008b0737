"""Reading run folders while they are written: the shared engine of `watch`, `status`, `plot` and `doctor`.

    RunReader(path).refresh() -> RunState     incremental: each refresh reads only the bytes appended
                                              to metrics.jsonl since the last one (a torn last line waits)
    resolve_runs([path, ...]) -> [Path]       run folders in a run folder, a study folder or runs/
                                              (lmlab.runs.find_runs; none found is an error)

What a run folder is, its checkpoints and whether its process lives are `lmlab.runs` and `lmlab.fsutil`'s.

Nothing here writes to a run folder, so a reader can run on another terminal or another machine
that sees the folder.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LmlabError
from ..fsutil import pid_alive
from ..runs import checkpoints, find_runs

HEARTBEAT_STALE_S = 120.0  # no record for this long from a run on another host: presumed dead


def num(v: Any) -> float | None:
    """A metric value as a float: None stays None, "nan"/"inf" strings (how non-finite floats are logged) parse."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


SMOOTH_SPAN_FRACTION = 0.1  # the smoothing spans at most this fraction of a series (short runs barely smoothed)

# the fields of a `train` record every run writes; anything else numeric is the objective's own (rewards, kl, ...)
TRAIN_FIELDS = {"kind", "step", "time", "tokens", "loss", "lr", "grad_norm", "tok_s", "skipped"}


def smoothing_weight(n: int, beta: float = 0.9) -> float:
    """The EMA weight used on a series of `n` points: `beta`, lowered so that the EMA's span 1/(1 − β) is at most
    SMOOTH_SPAN_FRACTION of the series. A 30-record run is smoothed over ~3 records, not 10 (which would trail
    a falling loss by a large margin); from 100 records on it is `beta` itself."""
    span = max(1.0, SMOOTH_SPAN_FRACTION * n)
    return max(0.0, min(beta, 1.0 - 1.0 / span))


def ema(values: Iterable[float | None], beta: float = 0.9, scale: bool = True) -> list[float | None]:
    """Debiased exponential moving average (TensorBoard's smoothing); non-finite values are skipped (their slot
    repeats the last value). `scale`: the weight follows the series length (smoothing_weight)."""
    values = list(values)
    if scale:
        beta = smoothing_weight(sum(1 for v in values if finite(v)), beta)
    out: list[float | None] = []
    avg, weight = 0.0, 0.0
    for v in values:
        if finite(v):
            avg = beta * avg + (1 - beta) * v
            weight = beta * weight + (1 - beta)
        out.append(avg / weight if weight > 0 else None)
    return out


class MetricsTail:
    """Follows a JSONL file by byte offset. `poll()` returns the records appended since the last call.

    Only complete lines are consumed; a partial last line (the writer is mid-line, or crashed mid-line)
    is left for the next poll. A file that shrank or was replaced is read again from the start.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.bad_lines = 0
        self.lines_read = 0
        self._ino: int | None = None

    def poll(self) -> list[dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if st.st_ino != self._ino or st.st_size < self.offset:
            self.offset, self._ino = 0, st.st_ino
        if st.st_size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(st.st_size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for line in chunk[:end].split(b"\n"):
            if not line.strip():
                continue
            self.lines_read += 1
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.bad_lines += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def tail_lines(path: Path, n: int = 200, max_bytes: int = 1 << 16) -> tuple[list[str], int]:
    """The last `n` lines of a text file (reading at most `max_bytes` from its end) and the end offset."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    start = max(0, size - max_bytes)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(size - start)
    end = data.rfind(b"\n")  # a partial last line is left for read_new_lines
    if end < 0:
        return [], start
    lines = data[:end].decode("utf-8", "replace").split("\n")
    if start > 0:
        lines = lines[1:]  # the first one is probably cut
    return lines[-n:], start + end + 1


def read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Complete lines appended to a text file since `offset`, and the new offset."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    if size < offset:
        offset = 0
    if size == offset:
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read(size - offset)
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    return chunk[:end].decode("utf-8", "replace").split("\n"), offset + end + 1


def _parse_local(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def dir_size(path: Path) -> int:
    total = 0
    for p in Path(path).rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


@dataclass
class RunState:
    """What a person wants to know about a run at a glance. Times are unix seconds; None = unknown."""

    name: str
    path: str
    status: str = "unknown"          # running / finished / failed / stopped (from run.json) or unknown
    stop_reason: str | None = None   # why a stopped (or failed) run ended, where it says: the guard's words
    resume_command: str | None = None  # how to continue a stopped run (the trainer's own line when it wrote one)
    diverged: bool = False           # the last logged training loss is not finite, or the guard stopped the run
    alive: bool | None = None        # its process exists (this host) or its heartbeat is fresh (other host)
    pid: int | None = None
    host: str | None = None
    model: str | None = None
    step: int = 0
    total_steps: int | None = None
    tokens: int | None = None
    loss: float | None = None        # last logged training loss (of a window in which a step was applied)
    loss_smooth: float | None = None  # EMA of the training loss
    val_loss: float | None = None    # None: never measured (no held-out data), not 0
    val_ppl: float | None = None
    objective: dict[str, float] = field(default_factory=dict)  # the objective's own metrics (reward, kl, ...)
    lr: float | None = None
    grad_norm: float | None = None
    tok_s: float | None = None
    steps_per_s: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    last_record: float | None = None  # time of the newest record in metrics.jsonl
    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    checkpoint_age_s: float | None = None
    n_checkpoints: int = 0
    has_final: bool = False
    disk_free: int | None = None
    disk_total: int | None = None
    last_event: str | None = None
    restarts: int = 0                # sessions after the first (resumes by hand or by torchrun's restarts)
    resumed_from: list[int] = field(default_factory=list)  # the step each of them continued from
    skipped: int = 0                 # steps the guard did not apply
    problems: list[str] = field(default_factory=list)  # things a reader could not parse

    @property
    def progress(self) -> float | None:
        if self.total_steps:
            return min(1.0, self.step / self.total_steps)
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["progress"] = self.progress
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)
        d["objective"] = {k: v if math.isfinite(v) else str(v) for k, v in self.objective.items()}
        return d


class RunReader:
    """Keeps the records of one run in memory and adds only what was appended since the last refresh."""

    def __init__(self, path: str | Path, ema_beta: float = 0.9, disk_usage=shutil.disk_usage):
        self.path = Path(path)
        self.name = self.path.name
        self.ema_beta = ema_beta
        self._disk_usage = disk_usage
        self.tail = MetricsTail(self.path / "metrics.jsonl")
        self.train: list[dict] = []
        self.evals: list[dict] = []
        self.events: list[dict] = []
        self.system: list[dict] = []
        self.other: list[dict] = []
        self.loss_smooth: list[float | None] = []
        self._ema = (0.0, 0.0)
        self._beta: float | None = None
        self._finite_losses = 0
        self.manifest: dict = {}
        self._manifest_mtime: float | None = None
        self._config: dict | None = None
        self.state = RunState(self.name, str(self.path))

    # reading -------------------------------------------------------------------------------------------
    def _read_manifest(self) -> None:
        path = self.path / "run.json"
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._manifest_mtime:
            return
        try:
            self.manifest = json.loads(path.read_text())
            self._manifest_mtime = mtime
        except (OSError, json.JSONDecodeError):
            pass  # being replaced right now; the next refresh gets it

    @property
    def config(self) -> dict:
        """config.yaml as a dict ({} when absent); read once."""
        if self._config is None:
            self._config = {}
            path = self.path / "config.yaml"
            if path.is_file():
                try:
                    import yaml

                    self._config = yaml.safe_load(path.read_text()) or {}
                except Exception:  # noqa: BLE001 - a reader never fails on a bad config file
                    self._config = {}
        return self._config

    def _add(self, rec: dict) -> None:
        kind = rec.get("kind")
        if kind == "train":
            self.train.append(rec)
        elif kind == "eval":
            self.evals.append(rec)
        elif kind == "event":
            self.events.append(rec)
        elif kind == "system":
            self.system.append(rec)
        else:
            self.other.append(rec)

    def _smooth(self) -> None:
        """Extend loss_smooth over the new train records; all of it again while the weight still grows with
        the run's length (its first ~100 records), incrementally after that."""
        new = self.train[len(self.loss_smooth):]
        n_finite = self._finite_losses + sum(1 for r in new if finite(num(r.get("loss"))))
        beta = smoothing_weight(n_finite, self.ema_beta)
        if beta != self._beta:
            self._beta, self._ema, self.loss_smooth, self._finite_losses = beta, (0.0, 0.0), [], 0
        avg, weight = self._ema
        for r in self.train[len(self.loss_smooth):]:
            loss = num(r.get("loss"))
            if finite(loss):
                avg = beta * avg + (1 - beta) * loss
                weight = beta * weight + (1 - beta)
                self._finite_losses += 1
            self.loss_smooth.append(avg / weight if weight > 0 else None)
        self._ema = (avg, weight)

    def poll(self) -> int:
        """Read what was appended to metrics.jsonl; the number of new records."""
        new = self.tail.poll()
        for rec in new:
            self._add(rec)
        if len(self.loss_smooth) < len(self.train):
            self._smooth()
        return len(new)

    def refresh(self, now: float | None = None) -> RunState:
        self._read_manifest()
        self.poll()
        self.state = self._summarise(time.time() if now is None else now)
        return self.state

    # summarising -------------------------------------------------------------------------------------
    def series(self, kind: str, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(xs, ys) of one numeric field of one record kind; records without it are left out."""
        recs = {"train": self.train, "eval": self.evals, "system": self.system, "event": self.events}.get(kind)
        recs = recs if recs is not None else [r for r in self.other if r.get("kind") == kind]
        xs, ys = [], []
        for r in recs:
            xv, yv = num(r.get(x)), num(r.get(key))
            if xv is not None and yv is not None:
                xs.append(xv)
                ys.append(yv)
        return xs, ys

    def segment_start(self) -> int:
        """Index into self.train of the first record after the latest start/resume (for rates and ETA)."""
        last = None
        for e in self.events:
            if e.get("event") in ("start", "resume"):
                last = e
        if last is None:
            return 0
        t = num(last.get("time")) or 0.0
        for i, r in enumerate(self.train):
            if (num(r.get("time")) or 0.0) >= t:
                return i
        return len(self.train)

    def steps_per_second(self, window: int = 20) -> float | None:
        recs = self.train[max(self.segment_start(), len(self.train) - window):]
        if len(recs) >= 2:
            ds = num(recs[-1].get("step")) - num(recs[0].get("step"))
            dt = num(recs[-1].get("time")) - num(recs[0].get("time"))
            if ds > 0 and dt > 0:
                return ds / dt
        tok_s = num(self.train[-1].get("tok_s")) if self.train else None
        tps = num(self.manifest.get("tokens_per_step"))
        if finite(tok_s) and tok_s > 0 and tps:
            return tok_s / tps
        return None

    def alive(self, now: float) -> bool | None:
        m = self.manifest
        pid, host = m.get("pid"), m.get("host")
        if pid is None:
            return None
        if host in (None, socket.gethostname()):
            sessions = m.get("sessions") or []
            started = _parse_local(sessions[-1].get("started")) if sessions else _parse_local(m.get("started"))
            return pid_alive(int(pid), started)
        # another machine: trust a fresh heartbeat (system records come every few seconds)
        if self.system:
            t = num(self.system[-1].get("time"))
            return t is not None and now - t < HEARTBEAT_STALE_S
        return None

    def _summarise(self, now: float) -> RunState:
        m = self.manifest
        s = RunState(self.name, str(self.path))
        s.status = m.get("status", "unknown" if not self.train else "running")
        s.pid, s.host, s.model = m.get("pid"), m.get("host"), m.get("model")
        s.total_steps = m.get("total_steps")
        s.alive = self.alive(now) if s.status == "running" else None
        t0 = _parse_local(m.get("started"))
        t1 = _parse_local(m.get("ended")) if s.status != "running" else now
        if t0 is not None and t1 is not None:
            s.elapsed_s = max(0.0, t1 - t0)
        steps = [num(r.get("step")) for r in (self.train + self.evals + self.events) if num(r.get("step")) is not None]
        s.step = int(max(steps)) if steps else 0
        if self.train:
            r = self.train[-1]
            s.loss, s.lr, s.grad_norm = num(r.get("loss")), num(r.get("lr")), num(r.get("grad_norm"))
            s.tok_s, s.tokens = num(r.get("tok_s")), r.get("tokens")
            s.loss_smooth = self.loss_smooth[-1]
            s.objective = objective_metrics(r)
        measured = [e for e in self.evals if num(e.get("val_loss")) is not None]
        if measured:
            r = measured[-1]
            s.val_loss, s.val_ppl = num(r.get("val_loss")), num(r.get("val_ppl"))
        if self.events:
            s.last_event = self.events[-1].get("event")
        applied = last_applied(self.train)  # a window the guard skipped whole logs NaN: not the last loss
        last_loss = num(applied.get("loss")) if applied is not None else None
        if applied is not None:
            s.loss = last_loss
        s.diverged = last_loss is not None and not math.isfinite(last_loss)  # it ended in NaN/inf
        s.stop_reason, s.resume_command, guard_stop = stop_info(m, self.events)
        s.diverged = s.diverged or guard_stop
        if s.status == "stopped" and s.resume_command is None:
            s.resume_command = f"lmlab resume {self.path}"
        later = (m.get("sessions") or [])[1:]
        s.restarts = len(later)
        s.resumed_from = [int(x["resumed_from_step"] or 0) for x in later if isinstance(x, dict)
                          and "resumed_from_step" in x]
        if self.train:
            s.skipped = int(num(self.train[-1].get("skipped")) or 0)
        times = [num(x[-1].get("time")) for x in (self.train, self.evals, self.events, self.system, self.other) if x]
        times = [t for t in times if t is not None]
        s.last_record = max(times) if times else None
        s.steps_per_s = self.steps_per_second()
        if s.status == "running" and s.total_steps and s.steps_per_s:
            s.eta_s = max(0.0, (s.total_steps - s.step) / s.steps_per_s)
        elif s.status == "finished":
            s.eta_s = 0.0
        ckpts = checkpoints(self.path)
        s.n_checkpoints = len(ckpts)
        if ckpts:
            c = ckpts[-1]
            s.last_checkpoint, s.last_checkpoint_step = c.name, c.step
            s.checkpoint_age_s = max(0.0, now - c.mtime)
        s.has_final = (self.path / "final").is_dir()
        try:
            du = self._disk_usage(str(self.path))
            s.disk_free, s.disk_total = int(du.free), int(du.total)
        except OSError:
            pass
        if self.tail.bad_lines:
            s.problems.append(f"{self.tail.bad_lines} unreadable line(s) in metrics.jsonl")
        return s


def nothing_applied(rec: dict, prev: dict | None) -> bool:
    """A train record of a log window whose steps the guard all skipped: its loss is NaN because no step was
    applied (the steps since `prev` equal the skips since `prev`), not because the run diverged."""
    step, skipped = num(rec.get("step")), num(rec.get("skipped"))
    before = (num(prev.get("step")), num(prev.get("skipped"))) if prev is not None else (0.0, 0.0)
    if step is None or skipped is None or before[0] is None:
        return False
    return step - before[0] > 0 and step - before[0] == skipped - (before[1] or 0.0)


def applied_records(train: list[dict]) -> list[dict]:
    """The train records of windows in which at least one step was applied (see nothing_applied)."""
    return [r for i, r in enumerate(train) if not nothing_applied(r, train[i - 1] if i else None)]


def last_applied(train: list[dict]) -> dict | None:
    """The newest train record of a window in which a step was applied (None when there is none)."""
    for i in range(len(train) - 1, -1, -1):
        if not nothing_applied(train[i], train[i - 1] if i else None):
            return train[i]
    return None


def objective_metrics(rec: dict) -> dict[str, float]:
    """The numeric fields of a `train` record beyond the ones every run logs: what the objective adds
    (DPO's rewards/chosen …, GRPO's reward, kl, completion_length …), in the order written."""
    out = {}
    for k, v in rec.items():
        if k in TRAIN_FIELDS or k.startswith("_"):
            continue
        x = num(v)
        if x is not None:
            out[k] = x
    return out


GUARD_STOP_WORDS = ("guard", "loss is", "gradient norm is", "spike", "bad steps", "rollbacks", "diverged")


def stop_info(manifest: dict, events: list[dict]) -> tuple[str | None, str | None, bool]:
    """(why the run stopped, the command that continues it, whether it diverged: the guard stopped it, or the
    trainer found its weights not finite) from run.json's `stop_reason` and `resume_command`, else the guard's
    last `stop` event or the trainer's `diverged` event."""
    reason = manifest.get("stop_reason") or manifest.get("reason")
    resume = manifest.get("resume_command") or manifest.get("resume")
    guard = None
    diverged = None
    for e in events:
        if e.get("event") == "guard" and e.get("action") == "stop":
            guard = e
        elif e.get("event") == "diverged":
            diverged = e
    if guard is not None and not reason:
        reason = f"guard stop at step {int(num(guard.get('step')) or 0):,}: {guard.get('reason') or 'bad step'}"
    if diverged is not None and not reason:
        reason = f"diverged: {diverged.get('reason') or 'not finite'}"
    by_guard = guard is not None or diverged is not None or manifest.get("status") == "diverged" or (
        isinstance(reason, str) and manifest.get("status") in ("stopped", "failed")
        and any(w in reason for w in GUARD_STOP_WORDS))
    return (str(reason) if reason else None), (str(resume) if resume else None), by_guard


def resolve_runs(paths: Iterable[str | Path], allow_empty: bool = False) -> list[Path]:
    """find_runs, but an empty result is a user error naming what was searched (unless `allow_empty`: existing
    folders with no run yet, such as a study whose cells have not started, give [])."""
    paths = list(paths) or ["runs"]
    runs = find_runs(paths)
    if not runs and not allow_empty:
        raise LmlabError(f"no run folders (with run.json) in {', '.join(str(p) for p in paths)}")
    return runs
