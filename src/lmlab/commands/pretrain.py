"""lmlab pretrain: train a language model from raw text into a new run folder."""

from __future__ import annotations

from ._common import BUDGET, add_config_flags, alias_overrides


def add_arguments(p) -> None:
    add_config_flags(p, ("--model", "--data", "--text-field", "--seq-len", "--lr", "--name", *BUDGET))


def run(args) -> int:
    from ..config import load_config
    from ..plan.estimate import memory_line
    from ..train.loop import train

    cfg = load_config(args.config, [*args.overrides, *alias_overrides(args)])
    train(cfg, preflight=memory_line)
    return 0
