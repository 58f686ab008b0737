"""Where a cell stands, read from its run folder alone, and the command that moves it forward.

    cell_state(run_dir) -> State("new" | "finished" | "running" | "resume" | "blocked", why)
    command(cell, state, nproc=2) -> [python, -m, torch.distributed.run, ..., -m, lmlab.cli, pretrain, -c, ...]

- new: no folder (or an empty one): `lmlab pretrain -c <out_dir>/.cells/<name>.yaml`;
- finished: run.json says so: skipped;
- running: `run.lock` is held by a live process (or by another host): left alone;
- resume: a config.yaml and no live holder (killed, stopped, failed): `lmlab resume <run_dir>`, which restores
  the latest complete checkpoint exactly (or starts over in the same folder when there is none yet);
- blocked: a folder that is not a run folder: never touched.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import runs
from ..config import save_config
from ..fsutil import pid_alive
from .spec import Cell

CELLS = ".cells"  # under the study's out_dir: each cell's launch config and its process output


@dataclass
class State:
    kind: str
    why: str = ""
    pid: int | None = None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def lock_holder(run_dir: Path) -> dict | None:
    """The live holder of `run.lock` ({"pid", "host"}), or None when nobody (alive) holds it."""
    held = _read_json(Path(run_dir) / "run.lock")
    if held is None:
        return None
    if held.get("host") != socket.gethostname():
        return held  # another host: trust the lock
    try:
        pid = int(held.get("pid"))
    except (TypeError, ValueError):
        return None
    return held if pid_alive(pid) else None


def cell_state(run_dir: Path) -> State:
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return State("new")
    manifest = _read_json(run_dir / "run.json") or {}
    if manifest.get("status") == "finished":
        return State("finished", "finished")
    held = lock_holder(run_dir)
    if held is not None:
        return State("running", f"held by pid {held.get('pid')} on {held.get('host')}", pid=held.get("pid"))
    if (run_dir / "config.yaml").is_file():
        status = manifest.get("status", "not started")
        return State("resume", f"{status} at step {_last_checkpoint_step(run_dir)}")
    if {p.name for p in run_dir.iterdir()} <= {"run.lock"}:
        return State("new", "stale lock")  # killed while taking the lock, before anything was written
    return State("blocked", f"{run_dir} exists but is not an lmlab run folder (no config.yaml)")


def _last_checkpoint_step(run_dir: Path) -> int:
    latest = runs.latest_checkpoint(run_dir / runs.CHECKPOINTS)
    return runs.step_of(latest) if latest is not None else 0


def prepare(cell: Cell, state: State, out_dir: Path) -> Path:
    """Write the cell's launch config (new cells) and clear a stale lock; returns the process-output file."""
    cells = Path(out_dir) / CELLS
    cells.mkdir(parents=True, exist_ok=True)
    if state.kind == "new":
        if state.why == "stale lock":
            (cell.run_dir / "run.lock").unlink(missing_ok=True)
        save_config(cell.config, cells / f"{cell.name}.yaml")
    return cells / f"{cell.name}.out"


def config_drift(cell: Cell) -> list[str]:
    """Keys whose value in the run folder's config.yaml differs from the study's (the folder's wins on resume)."""
    try:
        saved = yaml.safe_load((cell.run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    now = cell.config.to_dict()
    out = []
    for section, values in now.items():
        if section == "run":
            continue
        for k, v in values.items():
            if (saved.get(section) or {}).get(k, v) != v:
                out.append(f"{section}.{k}")
    return out


def lmlab_args(cell: Cell, state: State, out_dir: Path) -> list[str]:
    if state.kind == "new":
        return ["pretrain", "-c", str(Path(out_dir) / CELLS / f"{cell.name}.yaml")]
    return ["resume", str(cell.run_dir)]


def command(cell: Cell, state: State, out_dir: Path, *, nproc: int, nodes: int = 1, rdzv: str | None = None,
            rdzv_id: str | None = None, python: str = sys.executable) -> list[str]:
    """One plain process for nproc <= 1 on one node; torchrun (`python -m torch.distributed.run`) otherwise:
    `--standalone` on one node, a c10d rendezvous at `rdzv` (host:port) across nodes."""
    args = ["-m", "lmlab.cli", *lmlab_args(cell, state, out_dir)]
    if nodes > 1:
        if rdzv is None:
            raise ValueError("a multi-node run needs a rendezvous endpoint")
        return [python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc_per_node={max(nproc, 1)}",
                "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv}", f"--rdzv_id={rdzv_id or cell.name}", *args]
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return [python, *args]


def outcome(run_dir: Path, returncode: int) -> str:
    """finished | stopped | diverged | failed, after a cell's process exited. A run the guard stopped (exit 3,
    run.json `stopped` with its state saved) is stopped; one whose weights went non-finite is diverged."""
    status = (_read_json(Path(run_dir) / "run.json") or {}).get("status")
    if returncode == 0 and status in ("finished", "stopped"):
        return status
    if status in ("stopped", "diverged"):
        return status
    return "failed"


def stop_reason(run_dir: Path) -> str:
    """run.json's `stop_reason` ('' when none)."""
    return str((_read_json(Path(run_dir) / "run.json") or {}).get("stop_reason") or "")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
