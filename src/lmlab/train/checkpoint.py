"""Checkpoints: everything needed to continue a run bit for bit.

    checkpoints/step-00001000/          the name: lmlab.runs.step_dir
        model.safetensors   weights (tied tensors stored once); absent when the strategy's shards hold them
        dcp/ | zero/ …      the strategy's shards of model and optimizer, each rank its own (fsdp, deepspeed:
                            `Strategy.shard_dir`, written and read by the strategy object)
        trainer.pt          optimizer (unless in the shards), grad scaler, data position, step, tokens, best
                            validation loss, the guard's state
        rng-rank0.pt …      each rank's RNG states (torch CPU/CUDA, numpy, python)
        MANIFEST.json       step, rank count, the strategy whose shards it holds, files with sha256 — written
                            last (`_write_manifest`, its one writer); a folder without it is incomplete

A checkpoint is written into a hidden temporary folder that rank 0 makes and renames into place
(`lmlab.fsutil.atomic_dir`) once everything is in it, so a crash or a SIGKILL never leaves a folder that looks
complete. Rank 0 writes all but the shards (the other ranks' RNG states are gathered to it). Older
checkpoints beyond `keep_last` are removed, except the best one by validation loss (recorded in
checkpoints/best.json) and the one the run resumed from.

Loading runs no code: `.pt` files are read with `torch.load(weights_only=True)` (tensors, numbers,
strings, lists and dicts only), so a checkpoint folder from elsewhere cannot execute anything.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model

from ..errors import LmlabError
from ..fsutil import atomic_dir, atomic_write_text, first_line
from ..runs import MANIFEST, latest_checkpoint, list_checkpoints, step_dir
from . import strategies
from .strategies.base import Strategy, load_pt


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


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, trainer_state: dict, *, rt,
                    strategy: Strategy | None = None) -> Path:
    """Collective: every rank calls it. Rank 0 makes the folder (hidden until it is complete), the strategy's
    ranks write their shards into it (fsdp, deepspeed), then rank 0 writes the whole model (one process, ddp;
    deepspeed: gathered), the trainer state, every rank's RNG state and, last, the manifest. `strategy`: the
    one that placed `model` (by default the one that prepared it, `lmlab.train.strategies.of`)."""
    strategy = strategy if strategy is not None else strategies.of(model)
    final = step_dir(root, step)
    rngs = rt.all_gather_object(rng_state())
    sharded = strategy.shard_dir is not None
    rest = {k: v for k, v in trainer_state.items() if k != "optimizer"} if sharded else trainer_state
    rt.main_first(lambda: check_disk(root, model), others=False)
    with contextlib.ExitStack() as stack:  # rank 0 holds the temporary folder; any rank's failure ends it
        stack.enter_context(_space_errors(final))
        tmp = rt.main_first(lambda: str(stack.enter_context(atomic_dir(final, overwrite=True))), others=False)
        tmp = Path(rt.all_gather_object(tmp)[0])  # rank 0's folder: the run folder is shared
        weights = None
        if sharded:  # the optimizer lives in the shards
            weights = strategy.checkpoint_weights(model)  # collective
            strategy.save_shards(tmp / strategy.shard_dir)  # collective

        def write_rest() -> None:  # rank 0; a failure (disk full) stops every rank with the same line
            if not sharded:
                save_model(model, str(tmp / "model.safetensors"))  # tied weights once, named in the metadata
            elif weights is not None:
                save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            for rank, rng in enumerate(rngs):
                torch.save(rng, tmp / f"rng-rank{rank}.pt")
            torch.save(rest, tmp / "trainer.pt")
            _write_manifest(tmp, step, rt.world_size, strategy.name if sharded else None)

        rt.main_first(write_rest, others=False)
    rt.barrier()  # rank 0 has renamed it into place
    return final


def _write_manifest(folder: Path, step: int, world_size: int, strategy: str | None) -> None:
    """MANIFEST.json, the last file of a checkpoint: its step, rank count, the strategy whose shards it holds
    (none for the whole-model format) and every file's sha256."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    manifest = {"step": step, "world_size": world_size, **({"strategy": strategy} if strategy else {}),
                "files": {name: _sha256(folder / name) for name in files}}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


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


def verify(path: Path) -> dict:
    """The checkpoint's manifest; LmlabError if a file is missing or its sha256 differs from it."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file() or _sha256(f) != digest:
            raise LmlabError(f"checkpoint {path}: {name} is missing or corrupted (sha256 mismatch)")
    return manifest


def load_checkpoint(path: Path, model: torch.nn.Module, rank: int = 0, *,
                    strategy: Strategy | None = None) -> tuple[dict, dict | None]:
    """Load the weights into `model` and the optimizer state into the strategy's optimizer (when it holds one);
    return (trainer_state, this rank's RNG state or None). trainer_state["optimizer"] is the optimizer state as
    loaded (read from trainer.pt, or from the strategy's shards). Collective for a strategy with shards."""
    manifest = verify(path)
    strategy = strategy if strategy is not None else strategies.of(model)
    written_by = manifest.get("strategy")  # a strategy with shards; none: the whole model in model.safetensors
    if strategy.shard_dir is not None:
        shards = path / strategy.shard_dir
        if not shards.is_dir():
            raise LmlabError(f"checkpoint {path}: written by train.strategy={written_by or 'ddp'}; "
                             f"train.strategy={strategy.name} reads {shards.name}/ checkpoints: resume it with "
                             f"train.strategy={written_by or 'ddp'}")
        strategy.load_shards(shards)  # model and optimizer
        trainer_state = {**load_pt(path / "trainer.pt"), "optimizer": strategy.optimizer.state_dict()}
    else:
        if written_by is not None:  # its optimizer state (and perhaps its weights) are in the writer's shards
            writer = strategies.STRATEGIES.get(written_by)
            ranks = "" if writer is not None and writer.reshards else " on as many ranks"
            whole = " (its model.safetensors holds the whole model)" if "model.safetensors" in manifest["files"] else ""
            raise LmlabError(f"checkpoint {path}: written by train.strategy={written_by} on "
                             f"{manifest.get('world_size')} rank(s): resume it with train.strategy={written_by}"
                             f"{ranks}{whole}")
        load_model(model, str(path / "model.safetensors"), strict=True)
        trainer_state = load_pt(path / "trainer.pt")
        if strategy.optimizer is not None:
            strategy.optimizer.load_state_dict(trainer_state["optimizer"])
    rng_file = path / f"rng-rank{rank}.pt"
    rng = load_pt(rng_file) if rng_file.is_file() else None
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
