"""Opening and closing a run folder: the folder itself, its lock, its manifest and its event sink.

    with open_run(cfg, rt, run_dir, manifest=..., echo=print) as run:
        run.dir, run.sink, run.resuming
        ...
        run.status = "finished"          # whatever it is when the block ends goes into run.json

The folder is created only here, after everything that can be checked without compute was checked and the
data, tokenizer and model were built, so a refused run leaves nothing behind. The lock (`run.lock`: pid and
host) refuses a second process writing the same folder; a lock left by a dead process on this host, or by an
earlier attempt of the same torchrun job (restarted with --max-restarts, rank 0 maybe on another node), is
taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import runs
from ..config import Config, save_config
from ..errors import LmlabError
from ..fsutil import pid_alive
from ..monitor.events import EventSink
from ..monitor.trackers import start_trackers
from ..runtime import Runtime

LOCK = "run.lock"


@dataclass
class Run:
    dir: Path
    sink: EventSink
    resuming: bool
    status: str = "failed"
    step: int = 0  # the loop's current step, for records written from other threads (system stats)
    warned: set[str] = field(default_factory=set)  # warnings said once per run


@contextmanager
def open_run(cfg: Config, rt: Runtime, run_dir: Path | None, *, tokenizer, manifest: dict,
             resumed_from: int | None = None, echo=print, rewrite_config: bool = False) -> Iterator[Run]:
    """`rewrite_config`: a resume with changed settings saves `cfg` as config.yaml, after the lock is taken (a
    refused resume leaves the folder as it was)."""
    resuming = run_dir is not None
    if run_dir is None:
        name = rt.all_gather_object(cfg.run.name or runs.default_name(cfg.model.name))[0]  # rank 0's, everywhere
        cfg.run.name = name
        run_dir = Path(cfg.run.out_dir) / name
    run_dir = Path(run_dir)

    def take() -> None:  # rank 0; what fails here (an existing folder, a held lock) stops every rank
        if not resuming:
            if cfg.run.if_exists == "resume":
                clear_unstarted(run_dir)
            runs.create_run_dir(cfg.run.out_dir, run_dir.name)
        acquire_lock(run_dir)

    rt.main_first(take, others=False)
    run = Run(run_dir, EventSink(run_dir, enabled=rt.is_main, echo=echo, show_progress=cfg.train.progress),
              resuming)

    def describe() -> None:
        if not resuming or rewrite_config:  # config.yaml last: with it, the folder holds a run (if_exists=resume)
            if not resuming:
                tokenizer.save_pretrained(run_dir / "tokenizer")
            save_config(cfg, run_dir / "config.yaml")
        runs.start_manifest(run_dir, resumed_from=resumed_from)
        runs.write_manifest(run_dir, name=run_dir.name, model=cfg.model.name, objective=cfg.train.objective,
                            **manifest)

    try:
        rt.main_first(describe, others=False)
        if rt.is_main:  # W&B / trackio when log.wandb / log.trackio ask for them
            run.sink.attach(start_trackers(cfg, run_dir, say=run.sink.say, text=run.sink.text))
        yield run
    finally:
        run.sink.close(run.status)
        if rt.is_main:
            runs.write_manifest(run_dir, status=run.status, ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
            release_lock(run_dir)


# what a start leaves before config.yaml, its last file, is written: a folder of only these never held a run
_START_LEFTOVERS = {LOCK, "run.json", "tokenizer", "metrics.jsonl", "train.log", "tb", "trackers.json"}


def clear_unstarted(run_dir: Path) -> None:
    """Empty a folder left by a start that was killed before it wrote config.yaml (run.if_exists=resume),
    so the restart can begin; a live holder of its lock is refused as usual."""
    if not run_dir.is_dir() or (run_dir / "config.yaml").exists() or \
            not {p.name for p in run_dir.iterdir()} <= _START_LEFTOVERS:
        return
    acquire_lock(run_dir)
    for p in run_dir.iterdir():
        if p.name != LOCK:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    release_lock(run_dir)


# ------------------------------------------------------------------------------------------- the lock
def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def acquire_lock(run_dir: Path) -> None:
    """Take `run.lock` or raise naming its holder. A lock whose process is gone (same host) is taken over."""
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: which job, which (re)start of it
        me.update(job=os.environ["TORCHELASTIC_RUN_ID"], attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _holder(path)
            if held is None:  # torn write by a process killed while taking it
                path.unlink(missing_ok=True)
                continue
            if held.get("host") == me["host"] and not pid_alive(int(held.get("pid", -1))):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            if me.get("job") is not None and held.get("job") == me["job"] and held.get("attempt", 0) < me["attempt"]:
                path.unlink(missing_ok=True)  # an earlier attempt of this torchrun job (on any node): torchrun
                continue                      # ended all its workers before restarting them
            if held.get("pid") == me["pid"] and held.get("host") == me["host"]:
                return
            raise LmlabError(f"{run_dir} is in use by pid {held.get('pid')} on {held.get('host')} "
                             f"(since {held.get('since')}); stop it first, or remove {path} if that process "
                             f"is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return
    raise LmlabError(f"{path}: cannot take the lock")


def release_lock(run_dir: Path) -> None:
    path = run_dir / LOCK
    held = _holder(path)
    if held is not None and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
