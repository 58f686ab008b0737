"""Everything the loop needs, built from a Config: tokenizer, data, model, optimizer, plan.

    parts = build(cfg, rt, objective, saved_tokenizer=None)

Nothing here writes into a run folder: a run that fails to build leaves nothing behind. Rank 0 builds
shared caches (tokenizer, token shards) first; the other ranks wait and reuse them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..data.corpus import build_corpus  # noqa: F401  (its home is lmlab.data.corpus; kept importable from here)
from ..errors import ConfigError
from ..models import registry
from ..runs.load import build_model  # the run loader builds what the trainer trains
from ..runtime import Runtime
from .objectives import Objective, ObjectiveData
from .optim import make_optimizer
from .strategies import Strategy, make_strategy

DEFAULT_STEPS = 1000


@dataclass
class Plan:
    params: int
    tokens_per_step: int
    total_steps: int
    total_tokens: int
    budget: str  # how the step count was decided

    def lines(self, cfg: Config, rt: Runtime) -> list[str]:
        t = cfg.train
        return [
            f"model     {cfg.model.name}  {self.params:,} parameters",
            f"batch     {self.tokens_per_step:,} tokens/step = {t.batch_size} seq × {cfg.data.seq_len} tokens"
            f" × {t.grad_accum} accum × {rt.world_size} rank(s)",
            f"budget    {self.total_steps:,} steps = {_human(self.total_tokens)} tokens "
            f"({self.total_tokens / max(1, self.params):.1f} tokens/param; {self.budget})",
            f"device    {rt.device} {rt.precision}" + (f", {torch.get_num_threads()} threads"
                                                        if rt.device.type == "cpu" else ""),
        ]


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def make_plan(cfg: Config, params: int, world_size: int) -> Plan:
    t = cfg.train
    tps = t.batch_size * cfg.data.seq_len * t.grad_accum * world_size
    if t.max_steps is not None:
        steps, budget = t.max_steps, "train.max_steps"
    elif t.max_tokens is not None:
        steps, budget = math.ceil(t.max_tokens / tps), f"train.max_tokens={t.max_tokens:,}"
    elif t.token_ratio is not None:
        tokens = t.token_ratio * params
        steps, budget = math.ceil(tokens / tps), f"train.token_ratio={t.token_ratio:g} × params"
    else:
        steps, budget = DEFAULT_STEPS, "default; set train.max_steps, max_tokens or token_ratio"
    return Plan(params=params, tokens_per_step=tps, total_steps=steps, total_tokens=steps * tps, budget=budget)


@dataclass
class Parts:
    tokenizer: object
    data: ObjectiveData
    model: torch.nn.Module  # owns the parameters; checkpoints and exports read it
    wrapped: torch.nn.Module  # what runs forward/backward (the model under DDP, or the model itself)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    plan: Plan
    params: int
    strategy: Strategy  # how the model is placed over ranks: it wraps, steps, and reads and writes its shards


def build(cfg: Config, rt: Runtime, objective: Objective, saved_tokenizer: Path | None = None) -> Parts:
    tokenizer = build_tokenizer(cfg, rt, saved=saved_tokenizer)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer!r} has no end-of-text token")
    data = objective.data(cfg, tokenizer, rt)
    model = build_model(cfg, tokenizer)
    if hasattr(model, "set_scan_backend"):  # decided once, for this device, before any compute
        from ..models.scan import resolve_backend

        chosen = model.config.scan_backend  # what the exported config keeps ("auto" moves with the model)
        model.set_scan_backend(resolve_backend(chosen, rt.device))
        model.config.scan_backend = chosen
    if cfg.finetune.method != "full":
        from .adapters import add_adapters

        model = add_adapters(model, cfg)
    objective.check_model(model)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model, cfg.model.name)
    params = registry.count_parameters(model)
    model.to(rt.device)
    t = cfg.train
    strategy = make_strategy(cfg, rt)
    model = strategy.prepare(model)  # compile; fsdp shards before the optimizer sees the parameters
    optimizer = make_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, rt.device, kind=t.optimizer,
                               momentum=t.momentum)
    strategy.attach(optimizer)
    wrapped = strategy.wrap(model, optimizer)
    objective.setup(model, wrapped, rt)
    return Parts(tokenizer, data, model, wrapped, optimizer, rt.grad_scaler(), make_plan(cfg, params, rt.world_size),
                 params, strategy)


def enable_activation_checkpointing(model, name: str) -> None:
    """One checkpoint per layer (transformers' mechanism; non-reentrant, so dropout replays exactly)."""
    from .. import _compat

    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {name} ({type(model).__name__}) does not support it")
    _compat.enable_activation_checkpointing(model)


def build_tokenizer(cfg: Config, rt: Runtime, saved: Path | None = None):
    from ..data.tokenizer import load_tokenizer

    if saved is not None and saved.is_dir():
        return load_tokenizer(str(saved))
    return rt.main_first(lambda: load_tokenizer(cfg.data.tokenizer, cfg.data.vocab_size))  # rank 0 trains/caches
