"""Atomic writes, the only way lmlab puts a file or folder into place.

Everything is written into a hidden temporary beside its target, then `os.replace`d into place, so a
killed or failed write never leaves anything that looks finished (and a reader sees the old or the new
version, never half of one)."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder; on normal exit it becomes `final`, on error it is removed.

    If `final` already exists (another process finished first) ours is discarded, unless `overwrite`,
    in which case the old folder is swapped out and deleted.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(final)
    tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # unlike mkdtemp, honours the umask (mkdtemp makes 0700 folders)
    try:
        yield tmp
        if overwrite and final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.replace(tmp, final)  # atomic; fails if `final` is a non-empty folder
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race with an identical build: keep theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_dead_builds(final: Path) -> None:
    """Delete temp folders of builds of `final` that were killed (same host, process gone)."""
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.tmp-*"):
        host, pid, _ = tmp.name.rsplit("-", 2)
        if host.endswith(f".tmp-{socket.gethostname()}") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _proc_start_time(pid: int) -> float | None:
    """Unix time process `pid` started (Linux /proc), -1.0 for a zombie (it has exited), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            return -1.0
        ticks = int(fields[19])
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return None


PID_REUSE_SLACK_S = 60.0  # a process started this long after `started` is another one that reused the pid


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether process `pid` exists on this host and has not exited (a zombie has), for locks, temporary folders
    of killed writers and the readers' "is the run alive". With `started` (unix time the process is known to have
    been running by), a process that started more than a minute later is a newer one that reused the pid: False."""
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
    return not (started is not None and t0 is not None and t0 > started + PID_REUSE_SLACK_S)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step (flushed to disk before the rename)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries raise long, multi-line ones)."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def error_line(e: BaseException) -> str:
    """An exception of another library as one line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, [] if it is missing; a torn line (a crash mid-write) is skipped."""
    import json

    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
