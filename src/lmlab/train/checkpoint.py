"""Checkpoints: everything needed to continue a run bit for bit.

    checkpoints/step-00001000/
        model.safetensors   weights (tied tensors stored once)
        trainer.pt          optimizer, grad scaler, data position, step, tokens, best validation loss
        rng-rank0.pt …      each rank's RNG states (torch CPU/CUDA, numpy, python)
        MANIFEST.json       step, files with sha256 — written last; a folder without it is incomplete

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash or a
SIGKILL never leaves a folder that looks complete. Older checkpoints beyond `keep_last` are
removed, except the best one by validation loss (recorded in checkpoints/best.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..errors import LmlabError

MANIFEST = "MANIFEST.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, trainer_state: dict, *,
                    rank: int = 0, world_size: int = 1, barrier=lambda: None) -> Path:
    """Collective: every rank calls it. Rank 0 writes model + trainer state; each rank its RNG."""
    final = step_dir(root, step)
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
    barrier()
    if rank == 0:
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "world_size": world_size,
                    "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        with open(tmp / MANIFEST) as f:
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    return final


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and is_complete(p)), key=lambda p: p.name)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def verify(path: Path) -> None:
    """Raise LmlabError if a file is missing or its sha256 differs from the manifest."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise LmlabError(f"checkpoint {path}: {name} is missing or corrupted (sha256 mismatch)")


def load_checkpoint(path: Path, model: torch.nn.Module, rank: int = 0) -> tuple[dict, dict | None]:
    """Load weights into `model`; return (trainer_state, this rank's RNG state or None)."""
    verify(path)
    load_model(model, str(path / "model.safetensors"), strict=True)
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    return trainer_state, rng


def record_best(root: Path, step: int, val_loss: float) -> bool:
    """Remember the checkpoint with the lowest validation loss; True if `step` is the new best."""
    best_file = root / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    if best is None or val_loss < best["val_loss"]:
        tmp = root / ".best.json.tmp"
        tmp.write_text(json.dumps({"step": step, "val_loss": val_loss}))
        os.replace(tmp, best_file)
        return True
    return False


def prune(root: Path, keep_last: int) -> None:
    best_file = root / "best.json"
    best_step = json.loads(best_file.read_text())["step"] if best_file.is_file() else None
    ckpts = list_checkpoints(root)
    for p in ckpts[:-keep_last] if keep_last > 0 else []:
        if best_step is not None and p == step_dir(root, best_step):
            continue
        shutil.rmtree(p, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):  # left by a killed run
        shutil.rmtree(tmp, ignore_errors=True)
