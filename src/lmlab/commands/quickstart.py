"""lmlab quickstart: the whole loop in about three minutes on a 2-core CPU, with no network.

Trains `mamba-swelu-tiny` on the running interpreter's standard library (a real corpus of code and
English docstrings, read at run time) with lmlab's own BPE tokenizer (trained and cached on first
use), shows progress, checkpoints, exports an HF-format model, reports validation perplexity
against the unigram baseline of the same data, and prints a generated continuation.
"""

from __future__ import annotations

from pathlib import Path

from ._common import add_config_args

HELP = "train mamba-swelu-tiny on the Python standard library in ~3 minutes on a CPU (no network needed)"

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"  # the settings, as a config file


def add_arguments(p) -> None:
    add_config_args(p)
    p.add_argument("--out", default="runs", help="parent folder of the run (run.out_dir)")


def run(args) -> int:
    import yaml

    from ..config import load_config
    from ..plan.estimate import memory_line
    from ..train.loop import train

    cfg = load_config(args.config or RECIPE, [f"run.out_dir={args.out}", *args.overrides])
    print("lmlab quickstart: mamba-swelu-tiny on the Python standard library")
    print(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k in ("model", "data")},
                         default_flow_style=None, sort_keys=False).strip())
    run_dir = train(cfg, preflight=memory_line)
    print(f"\nnext:     lmlab generate {run_dir} -p 'def '\n          lmlab resume {run_dir} train.max_steps=1000")
    return 0
