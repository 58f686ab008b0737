"""lmlab pretrain: train a language model from raw text into a new run folder."""

from __future__ import annotations

from ._common import add_budget_args, add_config_args, budget_overrides

HELP = "pretrain a model on raw text (new run folder under runs/)"


def add_arguments(p) -> None:
    add_config_args(p)
    add_budget_args(p)
    p.add_argument("--model", help="model name (model.name): a named size, a local folder or a hub id")
    p.add_argument("--data", help="data source (data.source): stdlib, a file, folder, glob, .jsonl or hf:NAME")
    p.add_argument("--name", help="run name (run.name)")


def run(args) -> int:
    from ..config import load_config
    from ..plan.estimate import memory_line
    from ..train.loop import train

    overrides = list(args.overrides) + budget_overrides(args)
    for flag, key in (("model", "model.name"), ("data", "data.source"), ("name", "run.name")):
        if getattr(args, flag):
            overrides.append(f"{key}={getattr(args, flag)}")
    cfg = load_config(args.config, overrides)
    train(cfg, preflight=memory_line)
    return 0
