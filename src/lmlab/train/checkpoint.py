"""Checkpoints: everything needed to continue a run bit for bit.

    checkpoints/step-00001000/
        model.safetensors   weights (tied tensors stored once)
        trainer.pt          optimizer, grad scaler, data position, step, tokens, best validation loss
        rng-rank0.pt …      each rank's RNG states (torch CPU/CUDA, numpy, python)
        MANIFEST.json       step, files with sha256 — written last; a folder without it is incomplete

A checkpoint is written by rank 0 alone (the other ranks' RNG states are gathered to it) into a hidden
temporary folder and renamed into place (`lmlab.fsutil.atomic_dir`), so a crash or a SIGKILL never leaves
a folder that looks complete. Older checkpoints beyond `keep_last` are removed, except the best one by
validation loss (recorded in checkpoints/best.json) and the one the run resumed from.

Loading runs no code: `.pt` files are read with `torch.load(weights_only=True)` (tensors, numbers,
strings, lists and dicts only), so a checkpoint folder from elsewhere cannot execute anything.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from ..errors import LmlabError
from ..fsutil import atomic_dir, atomic_write_text, first_line
from ..runs import MANIFEST, is_complete, latest_checkpoint, list_checkpoints, step_dir  # noqa: F401  (one owner: runs)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    """This process's RNG states in types `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, trainer_state: dict, *, rt) -> Path:
    """Collective: every rank calls it; rank 0 writes model, trainer state and every rank's RNG state."""
    from . import strategy

    if (hooks := strategy.checkpoint_hooks(model)) is not None:
        return _save_sharded(root, step, model, hooks[1], trainer_state, rt)
    final = step_dir(root, step)
    rngs = rt.all_gather_object(rng_state())

    def write() -> None:  # rank 0; a failure (disk full) stops every rank with the same line
        check_disk(root, model)
        with _space_errors(final), atomic_dir(final, overwrite=True) as tmp:
            for rank, rng in enumerate(rngs):
                torch.save(rng, tmp / f"rng-rank{rank}.pt")
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(trainer_state, tmp / "trainer.pt")
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {"step": step, "world_size": rt.world_size,
                        "files": {name: _sha256(tmp / name) for name in files}}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))

    rt.main_first(write, others=False)
    return final


@contextlib.contextmanager
def _space_errors(final: Path):
    """A write that fails for want of space becomes one line; the previous checkpoint is untouched. The
    writers say it their own way: OSError (ENOSPC, EFBIG past a file-size limit), torch's zip writer a
    RuntimeError, safetensors a SafetensorError ("I/O error: File too large")."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if not _out_of_space(e):
            raise
        raise LmlabError(f"disk full while saving {final.name} ({first_line(e)}); the previous checkpoint is "
                         f"intact: free space, then lmlab resume") from None


def _out_of_space(e: BaseException) -> bool:
    """A write that failed for want of space: ENOSPC/EFBIG/EDQUOT, or torch's zip writer reporting the short
    write it got (a RuntimeError 'unexpected pos'), or safetensors' I/O error in words."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    text = str(e)
    return any(w in text for w in ("unexpected pos", "No space left", "File too large", "Disk quota exceeded"))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_disk(root: Path, model: torch.nn.Module) -> None:
    """Refuse to start a save that cannot fit: the last checkpoint's size (or 3 × the weights) plus 10 %."""
    root.mkdir(parents=True, exist_ok=True)
    last = latest_checkpoint(root)
    need = _size(last) if last is not None else 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(root).free
    if free < need * 1.1:
        raise LmlabError(f"disk full: {free / 2**20:,.0f} MiB free in {root}, a checkpoint takes about "
                         f"{need / 2**20:,.0f} MiB; the previous checkpoint is intact: free space, then lmlab resume")


def _save_sharded(root: Path, step: int, model, optimizer, trainer_state: dict, rt) -> Path:
    """fsdp / deepspeed (`lmlab.train.strategy`): every rank writes its shards of the model and optimizer
    into dcp/ (torch.distributed.checkpoint, readable on any number of ranks); rank 0 writes the rest."""
    from . import strategy

    final = step_dir(root, step)
    rngs = rt.all_gather_object(rng_state())
    rest = {k: v for k, v in trainer_state.items() if k != "optimizer"}  # the optimizer lives in dcp/
    rt.main_first(lambda: check_disk(root, model), others=False)
    with contextlib.ExitStack() as stack:  # rank 0 holds the temporary folder; any rank's failure ends it
        stack.enter_context(_space_errors(final))
        tmp = rt.main_first(lambda: str(stack.enter_context(atomic_dir(final, overwrite=True))), others=False)
        tmp = Path(rt.all_gather_object(tmp)[0])  # rank 0's folder: the run folder is shared
        strategy.save_sharded(model, optimizer, tmp / strategy.shard_dir(model), rt)  # dcp/ or zero/ (collective)

        def write_rest() -> None:
            for rank, rng in enumerate(rngs):
                torch.save(rng, tmp / f"rng-rank{rank}.pt")
            torch.save(rest, tmp / "trainer.pt")
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            manifest = {"step": step, "world_size": rt.world_size, "strategy": strategy.checkpoint_hooks(model)[0],
                        "files": {name: _sha256(tmp / name) for name in files}}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))

        rt.main_first(write_rest, others=False)
    rt.barrier()  # rank 0 has renamed it into place
    return final


def verify(path: Path) -> dict:
    """The checkpoint's manifest; LmlabError if a file is missing or its sha256 differs from it."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise LmlabError(f"checkpoint {path}: {name} is missing or corrupted (sha256 mismatch)")
    return manifest


def _load_pt(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as e:
        raise LmlabError(f"checkpoint {path.parent}: {path.name} holds something other than tensors and plain "
                         f"values ({type(e).__name__}); refusing to load it") from None


def load_checkpoint(path: Path, model: torch.nn.Module, rank: int = 0) -> tuple[dict, dict | None]:
    """Load weights into `model`; return (trainer_state, this rank's RNG state or None)."""
    manifest = verify(path)
    from . import strategy

    written_by = manifest.get("strategy", "ddp")
    if (hooks := strategy.checkpoint_hooks(model)) is not None:
        shards = path / strategy.shard_dir(model)
        if not shards.is_dir():
            raise LmlabError(f"checkpoint {path}: written by train.strategy={written_by}; train.strategy={hooks[0]} "
                             f"reads {shards.name}/ checkpoints: resume it with train.strategy={written_by}")
        strategy.load_state_dicts(model, hooks[1], shards)
        trainer_state = {**_load_pt(path / "trainer.pt"), "optimizer": hooks[1].state_dict()}
    else:
        if written_by == "deepspeed":  # the optimizer state lives in zero/, one file per rank
            raise LmlabError(f"checkpoint {path}: written by train.strategy=deepspeed on {manifest.get('world_size')} "
                             f"rank(s): resume it with train.strategy=deepspeed on as many ranks (its "
                             f"model.safetensors holds the whole model)")
        load_model(model, str(path / "model.safetensors"), strict=True)
        trainer_state = _load_pt(path / "trainer.pt")
    rng_file = path / f"rng-rank{rank}.pt"
    rng = _load_pt(rng_file) if rng_file.is_file() else None
    return trainer_state, rng


def record_best(root: Path, step: int, val_loss: float) -> bool:
    """Remember the checkpoint with the lowest validation loss; True if `step` is the new best."""
    best_file = root / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    if best is None or val_loss < best["val_loss"]:
        atomic_write_text(best_file, json.dumps({"step": step, "val_loss": val_loss}))
        return True
    return False


def prune(root: Path, keep_last: int, protect: tuple[Path, ...] = ()) -> None:
    """Keep the newest `keep_last` checkpoints, the best one, and those in `protect` (the resume source)."""
    best_file = root / "best.json"
    best_step = json.loads(best_file.read_text())["step"] if best_file.is_file() else None
    keep = {Path(p).resolve() for p in protect}
    if best_step is not None:
        keep.add(step_dir(root, best_step).resolve())
    for p in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        if p.resolve() not in keep:
            shutil.rmtree(p, ignore_errors=True)
