"""The local executor: a queue on one machine that hands out disjoint GPU groups.

Each cell gets a group of `gpus_per_run` ids (or its pinned group) through CUDA_VISIBLE_DEVICES and one process:
torchrun with one worker per GPU when the group has several, a plain `python -m lmlab.cli` otherwise (CPU: one
process). At most `max_parallel` run at once. The run folders are the only state: a finished cell is skipped, an
unfinished one resumed, a cell whose folder is locked by a live process is waited for (its GPUs, read from
/proc/<pid>/environ where possible, stay busy). So killing `lmlab study` and starting it again finishes the
study; SIGTERM to the study asks every run to checkpoint and stop first.

`launcher(cmd, env, log_path) -> process` (Popen-like: pid, poll(), wait(), send_signal()) replaces the
subprocess launch, e.g. to record what would run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .spec import Cell, Study
from .state import State, cell_state, command, config_drift, outcome, prepare, stop_reason, tail


def popen_launcher(cmd: list[str], env: dict[str, str], log_path: Path):
    """The run in a session of its own: a Ctrl-C in the study's terminal reaches the study alone, which forwards
    each stop to its runs exactly once (the same whether the signal went to the terminal's process group or to
    the study's pid). On Linux the run also gets SIGTERM (save and stop) if the study dies without forwarding
    anything (SIGKILL, a crash), so no run is left training without its study."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_stop_with_parent(os.getpid()))


def _stop_with_parent(parent: int):
    """A preexec_fn: ask the kernel for SIGTERM when the parent (the study) exits (Linux PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the study died before the request took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


@dataclass
class _Running:
    cell: Cell
    group: tuple[int, ...]
    proc: object | None  # our process, or None for one started by someone else (pid below)
    pid: int | None = None
    log: Path | None = None


class LocalExecutor:
    name = "local"

    def __init__(self, *, max_parallel: int | None = None, gpus: list[int] | None = None, launcher=None,
                 poll_s: float = 0.5, python: str = sys.executable):
        self.max_parallel, self.gpus = max_parallel, gpus
        self.launcher = launcher or popen_launcher
        self.poll_s, self.python = poll_s, python

    def run(self, study: Study, echo=print) -> dict[str, str]:
        gpus = list(self.gpus if self.gpus is not None else study.gpus)
        for c in study.cells:
            need = len(c.gpus) if c.gpus is not None else c.gpus_per_run
            if c.gpus is not None and not set(c.gpus) <= set(gpus):
                raise ConfigError(f"run {c.name}: GPUs {list(c.gpus)} are not among this machine's {gpus}")
            if need > len(gpus):
                raise ConfigError(f"run {c.name}: needs {need} GPUs; the study has {len(gpus)} ({gpus or 'CPU'})")
            if c.nodes > 1:
                raise ConfigError(f"run {c.name}: {c.nodes} nodes; the local executor runs on one machine "
                                  f"(use --executor slurm)")
        limit = self.max_parallel or study.max_parallel or _default_parallel(study, gpus)
        free = list(gpus)
        pending, running, results = list(study.cells), [], {}
        stop = _Stop()
        with stop:
            while pending or running:
                for r in list(running):  # reap
                    rc = r.proc.poll() if r.proc is not None else (None if _alive(r.pid) else 0)
                    if rc is None:
                        continue
                    running.remove(r)
                    free += [g for g in r.group if g not in free]
                    if r.proc is None:  # someone else's process ended: look at the folder again
                        pending.insert(0, r.cell)
                        continue
                    results[r.cell.name] = outcome(r.cell.run_dir, rc)
                    if stop.requested and results[r.cell.name] == "failed":
                        results[r.cell.name] = "stopped"  # ended by our stop before its loop began: resumable
                    msg = f"{results[r.cell.name]:<9} {r.cell.name}"
                    if results[r.cell.name] in ("stopped", "diverged") and stop_reason(r.cell.run_dir):
                        msg += f" ({stop_reason(r.cell.run_dir)})"
                    if results[r.cell.name] == "failed":
                        msg += f" (exit {rc}; {r.log})\n{tail(r.log)}"
                    echo(msg)
                if stop.requested:
                    if stop.forwarded < stop.count:  # each stop once to every run we started
                        again = stop.forwarded > 0
                        for r in running:
                            if r.proc is not None and r.proc.poll() is None:
                                _signal(r.proc, signal.SIGINT if again else signal.SIGTERM)
                        names = ", ".join(r.cell.name for r in running if r.proc is not None)
                        if names:
                            echo(f"stopping  {names}: " + ("asked again, they stop now; waiting for them to exit"
                                                           if again else "each saves its state at the end of its "
                                                           "step; waiting for them"))
                        stop.forwarded = stop.count
                    if not any(r.proc is not None for r in running):
                        break
                    time.sleep(self.poll_s)
                    continue
                for cell in list(pending):  # start what fits
                    if len([r for r in running if r.proc is not None]) >= limit:
                        break
                    st = cell_state(cell.run_dir)
                    if st.kind == "finished":
                        pending.remove(cell)
                        results[cell.name] = "finished"
                        echo(f"skipped   {cell.name} (already finished)")
                        continue
                    if st.kind == "blocked":
                        pending.remove(cell)
                        results[cell.name] = "blocked"
                        echo(f"blocked   {cell.name}: {st.why}")
                        continue
                    if st.kind == "running":
                        pending.remove(cell)
                        group = tuple(g for g in _visible_of(st.pid) if g in free)
                        free = [g for g in free if g not in group]
                        running.append(_Running(cell, group, None, pid=st.pid))
                        echo(f"waiting   {cell.name} ({st.why})")
                        continue
                    group = _take(cell, free)
                    if group is None:
                        continue
                    free = [g for g in free if g not in group]
                    pending.remove(cell)
                    running.append(self._start(study, cell, st, group, echo))
                if pending or running:
                    time.sleep(self.poll_s)
        for cell in pending:
            results.setdefault(cell.name, "pending")
        for r in running:
            results.setdefault(r.cell.name, "stopped" if r.proc is not None else "running")
        if stop.requested:
            echo("study stopped; run the same command again to continue it")
        return results

    def _start(self, study: Study, cell: Cell, st: State, group: tuple[int, ...], echo) -> _Running:
        log = prepare(cell, st, study.out_dir)
        cmd = command(cell, st, study.out_dir, nproc=len(group), python=self.python)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, group)), "PYTHONUNBUFFERED": "1"}
        proc = self.launcher(cmd, env, log)
        where = f"GPUs {','.join(map(str, group))}" if group else "CPU"
        if st.kind == "new":
            echo(f"started   {cell.name} on {where} (pid {proc.pid})")
        else:
            drift = config_drift(cell)
            echo(f"resumed   {cell.name} on {where} (pid {proc.pid}; was {st.why})")
            if drift:
                echo(f"WARNING   {cell.name}: the study now sets {', '.join(drift)} differently; the run folder's "
                     f"config.yaml wins (delete {cell.run_dir} to start that run over)")
        return _Running(cell, group, proc, pid=proc.pid, log=log)


def _default_parallel(study: Study, gpus: list[int]) -> int:
    if not gpus:
        return 1
    per = max((len(c.gpus) if c.gpus is not None else c.gpus_per_run) for c in study.cells) or 1
    return max(1, len(gpus) // per)


def _take(cell: Cell, free: list[int]) -> tuple[int, ...] | None:
    """The cell's GPU group from the free ids (its pinned group, or the lowest free ids), or None to wait."""
    if cell.gpus is not None:
        return cell.gpus if set(cell.gpus) <= set(free) else None
    if cell.gpus_per_run == 0:
        return ()
    if len(free) < cell.gpus_per_run:
        return None
    return tuple(sorted(free)[:cell.gpus_per_run])


def _alive(pid: int | None) -> bool:
    from ..fsutil import pid_alive

    return pid is not None and pid_alive(int(pid))


def _visible_of(pid: int | None) -> list[int]:
    """CUDA_VISIBLE_DEVICES of another process (Linux /proc), to keep its GPUs busy; [] when unreadable."""
    try:
        env = Path(f"/proc/{int(pid)}/environ").read_bytes().split(b"\0")
    except (OSError, TypeError, ValueError):
        return []
    for item in env:
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return [int(g) for g in item.split(b"=", 1)[1].decode().split(",") if g.strip().isdigit()]
    return []


def _signal(proc, sig: int) -> None:
    """`sig` to a run's own process (torchrun passes it on to its workers: they must not get it twice)."""
    try:
        proc.send_signal(sig)
    except (OSError, ProcessLookupError):
        pass


class _Stop:
    """SIGINT, SIGTERM or SIGHUP, to the study's pid or to its terminal's process group: every run is asked to
    save and stop (SIGTERM: the trainer checkpoints at the end of its step), and the study waits for them. A
    second signal is forwarded too (SIGINT: the trainer stops at once, from its last checkpoint) and the study
    still waits for its runs to exit, so none is left running without it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.count, self.forwarded, self._old = 0, 0, {}

    @property
    def requested(self) -> bool:
        return self.count > 0

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.count += 1

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
