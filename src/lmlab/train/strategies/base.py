"""The interface every strategy implements: how a model is spread over ranks, applied from outside the model.

    s = make_strategy(cfg, rt)                    lmlab.train.strategies: the class registered for train.strategy
    model = s.prepare(model)                      before the optimizer exists: compile blocks, shard (fsdp)
    s.attach(optimizer)                           after: the object keeps the optimizer its checkpoints hold
    wrapped = s.wrap(model, optimizer)            what runs forward/backward; `model` keeps owning the parameters

Step hooks (lmlab.train.step calls them, in this order, for every optimizer step):
    with s.no_sync(wrapped, last): …            DDP: no gradient all-reduce before the last micro-batch
    s.backward(wrapped, loss, last)               the backward of one micro-batch
    s.clip(model, wrapped, grad_clip)             the total gradient norm before clipping (a plain tensor); the
                                                  gradients are clipped by the time the update reads them
                                                  (Single: inside torch's fused AdamW step)
    s.step(optimizer, scaler, skip)               the update (skip: the device guard's flag, obeyed on the device)
    s.discard(optimizer, scaler)                  no update: parameters and optimizer state stay as they were

Checkpoints (lmlab.train.checkpoint writes the folder, its trainer state, RNG files and MANIFEST.json):
    shard_dir = None                              the whole model in model.safetensors (checkpoint.py writes it),
                                                  the optimizer state in trainer.pt
    shard_dir = "dcp"                             every rank writes its shards of model and optimizer there:
    s.save_shards(folder) / s.load_shards(folder) collective; `checkpoint_weights` may add a whole
                                                  model.safetensors beside them (deepspeed)
    cls.read_weights(folder, into)                the weights alone, in one process (inference, export)
Export:
    s.full_state_dict(model)                      collective: the whole weights on rank 0's CPU
    s.unsharded_model(model)                      collective: a plain model on rank 0 (the model itself when whole)

The object keeps what it made (model, optimizer, the engine); the trainer holds the object. Callers that
hold only a model or an optimizer (scripts, benchmarks) find the strategy that prepared it with
`lmlab.train.strategies.of`. A new strategy is a subclass (of `Single` for the plain parts) and one
`register_strategy` line.
"""

from __future__ import annotations

import abc
import contextlib
import pickle
from pathlib import Path
from typing import ClassVar

import torch

from ...config import Config
from ...errors import ConfigError, LmlabError
from ...runtime import Runtime

BOUND = "_lmlab_strategy"  # the attribute of a prepared model (and an attached optimizer) naming its strategy


class _Bound:
    """What a model or optimizer carries: the strategy that prepared it. A deep copy of the model (a frozen
    reference, lmlab.train.dpo) is a plain model placed by nobody: the copy carries no strategy, and the
    strategy (its optimizer, its engine) is never copied with it."""

    __slots__ = ("strategy",)

    def __init__(self, strategy: Strategy | None):
        self.strategy = strategy

    def __deepcopy__(self, memo) -> _Bound:
        return _Bound(None)

    def __reduce__(self):
        return (_Bound, (None,))


def bind(obj, strategy: Strategy) -> None:
    object.__setattr__(obj, BOUND, _Bound(strategy))  # not a submodule, not in any state_dict


def bound(obj) -> Strategy | None:
    """The strategy that prepared a model or holds an optimizer, None for any other object."""
    b = getattr(obj, "__dict__", {}).get(BOUND)
    return b.strategy if b is not None else None


class Strategy(abc.ABC):
    """One way of spreading a model over ranks. `cfg` and `rt` are the run's; they may be None for the plain
    one-process object that stands in for a model no strategy prepared (its hooks do not read them)."""

    name: ClassVar[str]  # what checkpoints of a sharded strategy record as their writer (MANIFEST.json)
    shard_dir: ClassVar[str | None] = None  # the folder of a checkpoint each rank writes into; None: no shards
    reshards: ClassVar[bool] = False  # its checkpoints resume on another number of ranks
    steps_itself: ClassVar[bool] = False  # the update happens in its own state (no device skip, no kept copy)

    def __init__(self, cfg: Config | None = None, rt: Runtime | None = None):
        self.cfg, self.rt = cfg, rt
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------------------------------- building
    @abc.abstractmethod
    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Before the optimizer is made (its parameters must be the final ones): compile, shard."""

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the optimizer (its state goes into this strategy's checkpoints)."""
        self.optimizer = optimizer
        bind(optimizer, self)

    @abc.abstractmethod
    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> torch.nn.Module:
        """What runs forward and backward (the model itself, a DDP wrapper, an engine)."""

    def _placed(self, model: torch.nn.Module) -> torch.nn.Module:
        """Record `model` as this strategy's (for checkpoints, export and `of`)."""
        self.model = model
        bind(model, self)
        return model

    # ------------------------------------------------------------------------------------------ step hooks
    @abc.abstractmethod
    def no_sync(self, wrapped, last: bool) -> contextlib.AbstractContextManager: ...

    @abc.abstractmethod
    def backward(self, wrapped, loss: torch.Tensor, last: bool) -> None:
        """`loss` is already scaled for the whole step (no division by the accumulation count)."""

    @abc.abstractmethod
    def clip(self, model: torch.nn.Module, wrapped, grad_clip: float) -> torch.Tensor:
        """Clip to `grad_clip` (0: no clipping), here or in the `step` that follows (`discard` drops it); the total
        norm before clipping, over every rank, plain."""

    @abc.abstractmethod
    def step(self, optimizer, scaler: torch.amp.GradScaler | None = None, skip: torch.Tensor | None = None) -> None:
        """Apply the update and clear the gradients."""

    @abc.abstractmethod
    def discard(self, optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        """Drop this step's gradients without an update."""

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_shards(self, folder: Path) -> None:
        """Collective: every rank writes its shards of the model and optimizer into `folder`."""
        raise NotImplementedError(f"{type(self).__name__} writes no shards (shard_dir is None)")

    def load_shards(self, folder: Path) -> None:
        """Collective: this rank's shards of the model and optimizer from `folder`."""
        raise NotImplementedError(f"{type(self).__name__} reads no shards (shard_dir is None)")

    @classmethod
    def read_weights(cls, folder: Path, into: dict[str, torch.Tensor]) -> None:
        """In one process, without a strategy object: fill `into` (a plain model's tensors by name, in place)
        from the shards in `folder`, for a strategy whose shards hold the weights (`sharded_format`)."""
        raise LmlabError(f"checkpoint {folder.parent}: the weights of a {cls.name} checkpoint are not read "
                         f"outside a {cls.name} run")

    def checkpoint_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Collective, for a strategy with shards: the whole model that goes into model.safetensors beside them,
        or None (the shards alone hold the weights)."""
        return None

    # ---------------------------------------------------------------------------------------------- export
    @abc.abstractmethod
    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Collective: the whole model's weights on rank 0's CPU (an empty dict on the other ranks)."""

    @abc.abstractmethod
    def unsharded_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """Collective: a plain model on rank 0 (None elsewhere) for export and samples."""


# ---------------------------------------------------------------------------------------------------- helpers
def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers (lmlab's blocks, transformers' decoder layers): the unit of sharding and compiling."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found:
        names = set(getattr(model, "_no_split_modules", None) or ())
        found = [m for m in model.modules() if type(m).__name__ in names]
    return found


def compile_blocks(model: torch.nn.Module) -> None:
    """`torch.compile` each block in place (parameter names and checkpoints are unchanged). The selective scan
    stays outside the graph (`lmlab.models.scan.selective_scan` is `torch.compiler.disable`d: compiling its
    per-step loop unrolls it)."""
    blocks = blocks_of(model)
    if not blocks:
        raise ConfigError(f"train.compile: no repeated blocks found in {type(model).__name__}")
    for blk in blocks:
        blk.compile()


def load_pt(path: Path):
    """A checkpoint's `.pt` file, read with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and
    dicts only, so a file from elsewhere cannot execute anything."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ValueError, EOFError) as e:
        raise LmlabError(f"checkpoint {path.parent}: {path.name} holds something other than tensors and plain "
                         f"values ({type(e).__name__}); refusing to load it") from None
