"""lmlab finetune: instruction-tune a base model (full, LoRA or QLoRA) into a new run folder.

    lmlab finetune --model runs/base --data alpaca.json stdlib-instruct --method lora --steps 500
    lmlab finetune -c stages.yaml          # a `stages:` list: several stages in one run folder

BASE (--model): a run folder (its final/ model, or its latest checkpoint), a model folder, a hub id or a named
size. The tokenizer follows the base unless data.tokenizer is set. A run tuned from a folder is named after it
(`<run>-sft-<time>`, `<run>-dpo-<time>`; a run's final/ counts as the run) unless run.name is set.
"""

from __future__ import annotations

from ._common import BUDGET, add_config_flags, alias_overrides

TUNING_FLAGS = ("--model", "--data", "--method", "--template", "--seq-len", "--lr", "--name", *BUDGET)


def add_arguments(p) -> None:
    add_tuning_args(p, "instruction data: alpaca/dolly/oasst/sharegpt/messages files, hf:NAME, stdlib-instruct")


def add_tuning_args(p, data_help: str, epilog: str = "") -> None:
    """The flags of finetune, dpo and grpo: the config's, with the base model and several data sources."""
    add_config_flags(p, TUNING_FLAGS, nargs={"--data": "+"}, epilog=epilog,
                     help={"--model": "base model: a run folder, a model folder, a hub id or a named size",
                           "--data": data_help})


def tuning_config(args, objective: str):
    """The run's Config from -c, the flags and KEY=VALUE overrides, with the base and its tokenizer resolved."""
    import os
    import time

    from ..config import load_config
    from ..runs import base_label, is_run
    from ..runs.load import resolve_base

    overrides = [f"train.objective={objective}", *args.overrides, *alias_overrides(args)]
    cfg = load_config(args.config, overrides)
    name = cfg.model.name
    if cfg.run.name is None and os.path.isdir(name):  # named after the run it continues, not after "final"
        cfg.run.name = f"{base_label(name)}-{objective}-{time.strftime('%Y%m%d-%H%M%S')}"
    if os.path.isdir(name):  # resolved once, so the run (and its resumption) names the exact base folder
        base = resolve_base(name) if is_run(name) else os.path.abspath(name)
        cfg.model.name = base
        if not any(o.startswith("data.tokenizer=") for o in overrides) and not _in_file(args.config, "tokenizer"):
            cfg.data.tokenizer = base
    elif not _in_file(args.config, "tokenizer") and not any(o.startswith("data.tokenizer=") for o in overrides):
        from ..models import registry

        if registry.describe_kind(name) == "hub":
            cfg.data.tokenizer = name
    return cfg


def _in_file(path, key: str) -> bool:
    if path is None:
        return False
    import yaml

    d = yaml.safe_load(open(path)) or {}
    return key in (d.get("data") or {})


def has_stages(path) -> bool:
    if path is None:
        return False
    import yaml

    try:
        d = yaml.safe_load(open(path))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(d, dict) and "stages" in d


def run(args) -> int:
    from ..plan.estimate import memory_line
    from ..train.loop import train

    if has_stages(args.config):
        from ..train.stages import train_stages

        train_stages(args.config, [*args.overrides, *alias_overrides(args)], preflight=memory_line)
        return 0
    cfg = tuning_config(args, "sft")
    train(cfg, preflight=memory_line)
    return 0

