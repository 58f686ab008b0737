"""lmlab dpo: preference-tune a model with DPO (frozen reference, sigmoid loss) into a new run folder.

    lmlab dpo --model runs/sft --data pairs.jsonl --method lora --steps 200 finetune.dpo_beta=0.1
"""

from __future__ import annotations

from .finetune import add_tuning_args, tuning_config

HELP = "preference-tune a model with DPO on chosen/rejected pairs (full, LoRA or QLoRA)"


def add_arguments(p) -> None:
    add_tuning_args(p, "preference pairs (data.source): prompt/chosen/rejected jsonl, chat pairs, oasst trees")


def run(args) -> int:
    from ..plan.estimate import memory_line
    from ..train.loop import train

    train(tuning_config(args, "dpo"), preflight=memory_line)
    return 0
