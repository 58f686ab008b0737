"""Strategies: how the model is spread over ranks, one object per run, one file per strategy.

    single     one process: no sharding, no wrapper (`train.strategy=ddp` on one process)   single.py
    ddp        DistributedDataParallel on several ranks (the default)                         ddp.py
    fsdp       FSDP2, ZeRO-3 (ZeRO-2-like with train.fsdp_reshard=false); DCP checkpoints     fsdp.py
    deepspeed  DeepSpeed ZeRO 1-2, optimizer offload; per-rank partitions in checkpoints      deepspeed.py

The interface is `base.Strategy`. `make_strategy(cfg, rt)` is the one place that picks the class for a run;
a new strategy is one file plus `register_strategy(name, cls)`. The trainer holds the object (setup.Parts);
code that holds only a model or an optimizer finds the strategy that prepared it with `of`.

For readers of checkpoint folders (inference, export): `sharded_format(checkpoint)` names the strategy whose
shards hold the weights (None: one model.safetensors), `load_sharded_weights(checkpoint, state)` reads them in
one process.

`train.compile` compiles each block with `torch.compile` under every strategy (base.compile_blocks).

The functions at the end take the model where the trainer's code takes the object: for scripts and tests that
keep only the model and its optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...config import Config
from ...errors import ConfigError, LmlabError
from ...runs import MANIFEST
from ...runtime import Runtime
from .base import Strategy, bound
from .ddp import DDP
from .deepspeed import DeepSpeed, engine_of
from .fsdp import FSDP
from .single import Single

STRATEGIES: dict[str, type[Strategy]] = {"single": Single, "ddp": DDP, "fsdp": FSDP, "deepspeed": DeepSpeed}


def register_strategy(name: str, cls: type[Strategy]) -> None:
    """Make `cls` the strategy of `train.strategy=name`."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise TypeError(f"strategy {name!r}: {cls!r} is not a lmlab.train.strategies.base.Strategy subclass")
    STRATEGIES[name] = cls


def make_strategy(cfg: Config, rt: Runtime) -> Strategy:
    """The strategy object of a run: the class registered for `train.strategy` (ddp on one process: single)."""
    name = cfg.train.strategy
    if name == "ddp" and not rt.distributed:
        name = "single"
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy: unknown {name!r}; allowed: "
                          f"{', '.join(n for n in STRATEGIES if n != 'single')}")
    return STRATEGIES[name](cfg, rt)


def of(obj) -> Strategy:
    """The strategy that prepared a model (or holds an optimizer); a plain one-process strategy for a model that
    none prepared."""
    return bound(obj) or Single()


def sharded_format(folder: str | Path) -> str | None:
    """The strategy whose per-rank shards hold a complete checkpoint's weights ("fsdp": dcp/), or None when its
    model.safetensors holds the whole model (one process, ddp, and deepspeed, whose zero/ holds the optimizer
    partitions beside it)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise LmlabError(f"checkpoint {folder}: no readable {MANIFEST} (an interrupted save)") from None
    if "model.safetensors" in manifest.get("files", {}):
        return None
    written_by = manifest.get("strategy")
    if written_by is not None:
        return written_by
    return next((n for n, c in STRATEGIES.items() if c.shard_dir and (folder / c.shard_dir).is_dir()), None)


def load_sharded_weights(folder: str | Path, into: dict[str, torch.Tensor]) -> None:
    """Fill `into` (a plain model's tensors by name, in place) from a checkpoint whose shards hold its weights
    (`sharded_format(folder)` is not None), in this one process."""
    folder = Path(folder)
    written_by = sharded_format(folder)
    if written_by not in STRATEGIES:
        raise LmlabError(f"checkpoint {folder}: its weights are not in model.safetensors and train.strategy="
                         f"{written_by} is not a known strategy here")
    cls = STRATEGIES[written_by]
    cls.read_weights(folder / cls.shard_dir, into)


# ------------------------------------------------------------------------------- the same, keyed by the model
def prepare(model: torch.nn.Module, cfg: Config, rt: Runtime) -> torch.nn.Module:
    """`make_strategy(cfg, rt).prepare(model)`; the strategy stays with the model."""
    return make_strategy(cfg, rt).prepare(model)


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config | None = None) -> None:
    of(model).attach(optimizer)


def wrap(model: torch.nn.Module, cfg: Config | None = None, rt: Runtime | None = None,
         optimizer: torch.optim.Optimizer | None = None) -> torch.nn.Module:
    return of(model).wrap(model, optimizer)


def unsharded_model(model: torch.nn.Module, rt: Runtime | None = None) -> torch.nn.Module | None:
    return of(model).unsharded_model(model)


__all__ = ["DDP", "FSDP", "STRATEGIES", "DeepSpeed", "Single", "Strategy", "attach", "engine_of",
           "load_sharded_weights", "make_strategy", "of", "prepare", "register_strategy", "sharded_format",
           "unsharded_model", "wrap"]
