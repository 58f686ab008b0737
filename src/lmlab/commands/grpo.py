"""lmlab grpo: reinforcement learning with verifiable rewards (GRPO) into a new run folder.

    lmlab grpo --model runs/sft --data arithmetic --steps 200 rl.num_generations=8 rl.beta=0.04
    lmlab grpo --model runs/sft --data tasks.jsonl rl.reward_funcs='[format, code]' rl.format_regex='(?s).*def .*'

Every rl.* key, with its default and meaning, is listed by `lmlab grpo --help` (read from lmlab.config.RLConfig).
"""

from __future__ import annotations

from .finetune import add_tuning_args, tuning_config

HELP = "reinforcement learning with verifiable rewards (GRPO): sample groups of answers, reward them, learn from " \
       "the better ones"


def config_key_help(section: str = "rl") -> list[tuple[str, str, str]]:
    """(key, default, comment) for every field of the config section `section`, from its source's comments."""
    import dataclasses
    import inspect
    import re

    from .. import config

    cls = {f.name: f.type for f in dataclasses.fields(config.Config)}[section]
    cls = getattr(config, cls) if isinstance(cls, str) else cls
    lines = inspect.getsource(cls).splitlines()
    out, current = [], None
    for line in lines:
        m = re.match(r"\s{4}(\w+): [^=]+= (.+?)(?:\s+# (.*))?$", line)
        if m:
            name, default, comment = m.groups()
            if "default_factory" in default:
                default = repr(getattr(cls(), name))
            current = [f"{section}.{name}", default, comment or ""]
            out.append(current)
        elif current is not None and (c := re.match(r"\s+#\s+(.*)", line)):
            current[2] += " " + c.group(1)
    allowed = config.CHOICES
    return [(k, d, c + (f" [{' | '.join(map(str, allowed[k]))}]" if k in allowed else "")) for k, d, c in out]


def add_arguments(p) -> None:
    import argparse
    import textwrap

    add_tuning_args(p, "prompt sets (data.source): arithmetic, stdlib-functions, or .jsonl rows of "
                       "prompt/answer/tests (default arithmetic)")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    rows = []
    for key, default, comment in config_key_help("rl"):
        rows.append(f"  {key} (default {default})")
        rows += textwrap.wrap(comment, 100, initial_indent="      ", subsequent_indent="      ")
    p.epilog = ("GRPO keys (KEY=VALUE; docs/rl.md explains the loss and its variants):\n" + "\n".join(rows) +
                "\n\ntrain.batch_size counts prompts per micro-batch (each sampled rl.num_generations times); the "
                "logs add\nreward, rewards/<fn>, reward_std, frac_reward_zero_std, kl, completion_length and "
                "clip_ratio;\nsample completions with their rewards go to RUN/samples_grpo.jsonl at each log step.")


def run(args) -> int:
    from ..plan.estimate import memory_line
    from ..train.loop import train

    if not args.data and not any(o.startswith("data.source=") for o in args.overrides) and not _has_source(args):
        args.overrides = [*args.overrides, "data.source=arithmetic"]
    train(tuning_config(args, "grpo"), preflight=memory_line)
    return 0


def _has_source(args) -> bool:
    if not args.config:
        return False
    import yaml

    d = yaml.safe_load(open(args.config)) or {}
    return "source" in (d.get("data") or {})
