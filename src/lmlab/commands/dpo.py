"""lmlab dpo: preference-tune a model into a new run folder: DPO (frozen reference, sigmoid loss) by default, or
IPO, SimPO, ORPO (pairs) and KTO (unpaired desirable/undesirable examples) with --objective.

    lmlab dpo --model runs/sft --data pairs.jsonl --method lora --steps 200 finetune.dpo_beta=0.1
    lmlab dpo --model runs/sft --data pairs.jsonl --objective orpo
"""

from __future__ import annotations

from .finetune import add_tuning_args, tuning_config

OBJECTIVES = ("dpo", "ipo", "simpo", "orpo", "kto")  # the preference objectives this command trains


def add_arguments(p) -> None:
    add_tuning_args(p, "preference pairs: prompt/chosen/rejected jsonl, chat pairs, oasst trees; for kto: "
                       "prompt/completion/label rows")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="train.objective (default: the -c file's, if it names one of these, else dpo)")


def objective_of(args) -> str:
    """--objective, else a preference objective named by the -c file (a recipe), else dpo."""
    if args.objective:
        return args.objective
    if args.config:
        import yaml

        try:
            d = yaml.safe_load(open(args.config)) or {}
        except (OSError, yaml.YAMLError):
            return "dpo"  # load_config names the problem with the file
        train = (d.get("train") if isinstance(d, dict) else None) or {}
        named = train.get("objective") if isinstance(train, dict) else None
        return named if named in OBJECTIVES else "dpo"
    return "dpo"


def run(args) -> int:
    from ..plan.estimate import memory_line
    from ..train.loop import train

    train(tuning_config(args, objective_of(args)), preflight=memory_line)
    return 0
