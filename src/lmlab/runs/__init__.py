"""A run is a folder. This package is its one owner: it creates the folder, keeps its manifest (run.json) up to
date, says what a run folder is, lists its checkpoints and finds runs; `lmlab.runs.load` turns one into a model.

    runs/<name>/config.yaml  run.json  metrics.jsonl  train.log  tb/  samples.jsonl  tokenizer/
                checkpoints/step-XXXXXXXX/  final/  (merged/, exports/step-XXXXXXXX/: models made from it)

    is_run(path)               the one rule for "this folder is a run"
    run_of(path)               the run a folder is, or lies in (final/, merged/, exports/step-N/)
    find_runs([path, ...])     run folders named, or found below study folders and runs/
    list_checkpoints(root)     the complete checkpoints under <run>/checkpoints, oldest first (checkpoints(run):
                               the same with their step and completion time)

A multi-stage run (lmlab.train.stages) is a folder of such runs, `runs/<name>/stages/<i>-<stage>/`;
`resolve_stage` turns it into its last finished stage, the run that `chat`, `eval`, `compare` and
`generate` open.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LmlabError
from ..fsutil import atomic_write_text


def _git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"lmlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def default_name(model_name: str) -> str:
    base = Path(model_name).name if os.sep in model_name else model_name.replace("/", "-")
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_run_dir(out_dir: str, name: str) -> Path:
    path = Path(out_dir) / name
    if path.exists() and any(path.iterdir()):
        raise LmlabError(f"run folder {str(path)!r} already exists; use `lmlab resume {path}` to continue it "
                         f"(run.if_exists=resume does that from the same command) or pick another run.name")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_manifest(run_dir: Path, **fields: Any) -> dict:
    """Merge `fields` into run.json (atomically) and return the result."""
    path = run_dir / "run.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(fields)
    atomic_write_text(path, json.dumps(data, indent=1, default=str))
    return data


def start_manifest(run_dir: Path, resumed_from: int | None = None) -> dict:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    data = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    sessions = data.get("sessions", [])
    sessions.append({"pid": os.getpid(), "host": socket.gethostname(), "started": now,
                     "resumed_from_step": resumed_from})
    fields = {"status": "running", "pid": os.getpid(), "host": socket.gethostname(), "sessions": sessions,
              "versions": versions(), "git": _git_hash()}
    if "started" not in data:
        fields["started"] = now
    return write_manifest(run_dir, **fields)


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise LmlabError(f"{run_dir}: not an lmlab run folder (no run.json)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- what a run is
def is_run(path: str | Path) -> bool:
    """Whether `path` is a run folder: a folder holding config.yaml or run.json (the trainer writes both when a
    run starts, config.yaml first) and no config.json (an exported model folder is not a run, even one that
    carries a copy of the run's files)."""
    p = Path(path)
    return p.is_dir() and not (p / "config.json").is_file() and ((p / "config.yaml").is_file()
                                                                  or (p / "run.json").is_file())


def run_of(path: str | Path) -> Path | None:
    """The run folder `path` is, or the one it lies in (`<run>/final`, `<run>/merged`, `<run>/exports/step-N`,
    any folder one or two levels below a run); None for anything else (a model folder of its own, a hub id)."""
    p = Path(path).resolve()
    for cand in (p, p.parent, p.parent.parent):
        if is_run(cand):
            return cand
    return None


def base_label(path: str | Path) -> str:
    """What a base folder is called in a new run's name: its run's name (also for the run's final/, merged/ and
    exports/step-N/ folders); any other folder's own name."""
    run = run_of(path)
    return run.name if run is not None else Path(path).resolve().name


def find_runs(paths: Iterable[str | Path], depth: int = 2) -> list[Path]:
    """Run folders named directly, or found up to `depth` levels below the given folders (a study, runs/, a
    multi-stage run), each once, in a stable order; a run's own subfolders are not searched. LmlabError for a
    path that does not exist."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise LmlabError(f"{p}: no such folder")
        if is_run(p):
            found.append(p)
            continue
        level = [p]
        for _ in range(depth):
            below = []
            for d in level:
                try:
                    children = sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
                except OSError:
                    continue
                for c in children:
                    (found if is_run(c) else below).append(c)
            level = below
    seen, out = set(), []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


CHECKPOINTS = "checkpoints"  # <run>/checkpoints/step-XXXXXXXX/
MANIFEST = "MANIFEST.json"  # written last into a checkpoint folder: a folder without it is an interrupted save


def step_dir(root: Path, step: int) -> Path:
    """The folder of step `step`'s checkpoint under `root` (<run>/checkpoints): the one spelling of the name."""
    return Path(root) / f"step-{step:08d}"


def step_of(folder: str | Path) -> int | None:
    """The step a `step-XXXXXXXX` folder name stands for, or None for any other name."""
    prefix, _, digits = Path(folder).name.partition("-")
    return int(digits) if prefix == "step" and digits.isdigit() else None


def is_complete(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under `root` (<run>/checkpoints), oldest step first."""
    try:
        found = [(step_of(p), p) for p in Path(root).iterdir() if p.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [p for step, p in sorted((s, p) for s, p in found if s is not None) if is_complete(p)]


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint of a run: its folder, its step, and when it was completed (its manifest's mtime)."""

    path: Path
    step: int
    mtime: float

    @property
    def name(self) -> str:
        return self.path.name


def checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """list_checkpoints of a run folder, each with its step and completion time, oldest first (one deleted while
    being read is left out)."""
    out = []
    for p in list_checkpoints(Path(run_dir) / CHECKPOINTS):
        try:
            out.append(Checkpoint(p, step_of(p), (p / MANIFEST).stat().st_mtime))
        except OSError:
            continue
    return out


STAGES_SPEC, STAGES_DIR = "stages.yaml", "stages"  # the multi-stage layout (lmlab.train.stages)


def is_multi_stage(path: str | Path) -> bool:
    p = Path(path)
    return (p / STAGES_SPEC).is_file() and (p / STAGES_DIR).is_dir()


def resolve_stage(path: str | Path) -> Path:
    """`path` itself, or for a multi-stage run folder its last finished stage's run folder."""
    p = Path(path)
    if not is_multi_stage(p):
        return p
    stages = []
    for d in (p / STAGES_DIR).iterdir():
        index, _, name = d.name.partition("-")
        if d.is_dir() and index.isdigit() and name:
            stages.append((int(index), d))
    finished = []
    for _, d in sorted(stages):
        try:
            if json.loads((d / "run.json").read_text()).get("status") == "finished":
                finished.append(d)
        except (OSError, ValueError):
            continue
    if not finished:
        names = ", ".join(d.name for _, d in sorted(stages)) or "none started"
        raise LmlabError(f"{path}: a multi-stage run with no finished stage yet (stages: {names}); "
                         f"continue it with `lmlab finetune -c {p / STAGES_SPEC}`")
    return finished[-1]
