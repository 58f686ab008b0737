"""lmlab grpo: reinforcement learning with verifiable rewards (GRPO) into a new run folder.

    lmlab grpo --model runs/sft --data arithmetic --steps 200 rl.num_generations=8 rl.beta=0.04
    lmlab grpo --model runs/sft --data tasks.jsonl rl.reward_funcs='[format, code]' rl.format_regex='(?s).*def .*'

Every rl.* key, with its default and meaning, is listed by `lmlab grpo --help` (from lmlab.config.RLConfig).
"""

from __future__ import annotations

from .finetune import add_tuning_args, tuning_config


def add_arguments(p) -> None:
    add_tuning_args(p, "prompt sets: arithmetic, stdlib-functions, or .jsonl rows of prompt/answer/tests (default "
                       "arithmetic)",
                    epilog="GRPO (docs/rl.md explains the loss and its variants): train.batch_size counts prompts per "
                           "micro-batch\n(each sampled rl.num_generations times); the logs add reward, rewards/<fn>, "
                           "reward_std,\nfrac_reward_zero_std, kl, completion_length and clip_ratio; sample "
                           "completions with their rewards\ngo to RUN/samples_grpo.jsonl at each log step.")


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
