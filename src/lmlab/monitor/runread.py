"""Reading run folders while they are written: the shared engine of `watch`, `status`, `plot` and `doctor`.

    RunReader(path).refresh() -> RunState     incremental: each refresh reads only the bytes appended
                                              to metrics.jsonl since the last one (a torn last line waits)
    find_runs([path, ...]) -> [Path]          run folders in a run folder, a study folder or runs/

Nothing here writes to a run folder, so a reader can run on another terminal or another machine
that sees the folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LmlabError

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


def ema(values: Iterable[float | None], beta: float = 0.9) -> list[float | None]:
    """Debiased exponential moving average; non-finite values are skipped (their slot repeats the last value)."""
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


def _proc_start_time(pid: int) -> float | None:
    """Unix time a process started (Linux /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":  # a zombie has exited
            return -1.0
        ticks = int(fields[19])
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return None


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Is `pid` (on this host) alive and, if `started` is given, not a newer process that reused the pid?"""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    t0 = _proc_start_time(pid)
    if t0 is not None and t0 < 0:
        return False
    if started is not None and t0 is not None and t0 > started + 60:
        return False  # the pid now belongs to a process that started after the run did
    return True


@dataclass
class Checkpoint:
    name: str
    step: int
    path: Path
    mtime: float
    size: int = 0


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints (MANIFEST.json present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    out = []
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for e in entries:
        if not e.name.startswith("step-") or not e.is_dir():
            continue
        manifest = Path(e.path) / "MANIFEST.json"
        try:
            st = manifest.stat()
            step = int(e.name[5:])
        except (OSError, ValueError):
            continue
        out.append(Checkpoint(e.name, step, Path(e.path), st.st_mtime))
    return sorted(out, key=lambda c: c.step)


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
    alive: bool | None = None        # its process exists (this host) or its heartbeat is fresh (other host)
    pid: int | None = None
    host: str | None = None
    model: str | None = None
    step: int = 0
    total_steps: int | None = None
    tokens: int | None = None
    loss: float | None = None        # last logged training loss
    loss_smooth: float | None = None  # EMA of the training loss
    val_loss: float | None = None
    val_ppl: float | None = None
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
            loss = num(rec.get("loss"))
            avg, weight = self._ema
            if finite(loss):
                avg = self.ema_beta * avg + (1 - self.ema_beta) * loss
                weight = self.ema_beta * weight + (1 - self.ema_beta)
                self._ema = (avg, weight)
            self.train.append(rec)
            self.loss_smooth.append(avg / weight if weight > 0 else None)
        elif kind == "eval":
            self.evals.append(rec)
        elif kind == "event":
            self.events.append(rec)
        elif kind == "system":
            self.system.append(rec)
        else:
            self.other.append(rec)

    def poll(self) -> int:
        """Read what was appended to metrics.jsonl; the number of new records."""
        new = self.tail.poll()
        for rec in new:
            self._add(rec)
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
        if self.evals:
            r = self.evals[-1]
            s.val_loss, s.val_ppl = num(r.get("val_loss")), num(r.get("val_ppl"))
        if self.events:
            s.last_event = self.events[-1].get("event")
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
        ckpts = list_checkpoints(self.path)
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


def is_run(path: Path) -> bool:
    return (path / "run.json").is_file() or (path / "metrics.jsonl").is_file()


def find_runs(paths: Iterable[str | Path], depth: int = 2) -> list[Path]:
    """Run folders named directly, or found up to `depth` levels below the given folders (a study, runs/)."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise LmlabError(f"{p}: no such folder")
        if is_run(p):
            found.append(p)
            continue
        level = [p]
        for _ in range(depth):
            nxt = []
            for d in level:
                try:
                    children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
                except OSError:
                    continue
                for c in children:
                    (found if is_run(c) else nxt).append(c)
            level = nxt
    seen, out = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def resolve_runs(paths: Iterable[str | Path]) -> list[Path]:
    """find_runs, but an empty result is a user error naming what was searched."""
    paths = list(paths) or ["runs"]
    runs = find_runs(paths)
    if not runs:
        raise LmlabError(f"no run folders (with run.json) in {', '.join(str(p) for p in paths)}")
    return runs
