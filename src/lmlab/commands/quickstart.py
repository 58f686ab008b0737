"""lmlab quickstart: the whole loop in about two minutes on a 2-core CPU, with no network.

Trains `mamba-swelu-tiny` on the running interpreter's standard library (a real corpus of code and
English docstrings, read at run time) with lmlab's own BPE tokenizer (trained and cached on first
use), shows progress, checkpoints, exports an HF-format model, reports validation perplexity
against the unigram baseline of the same data, and prints a generated continuation.

With --finetune, a second act instruction-tunes that model on `stdlib-instruct`, reports the held-out
loss of base and tuned, and prints both models' answers to two held-out prompts side by side.
The settings are the recipe files recipes/quickstart.yaml and recipes/quickstart-sft.yaml.
"""

from __future__ import annotations

from pathlib import Path

from ._common import add_config_flags, alias_overrides

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPE, SFT_RECIPE = RECIPES / "quickstart.yaml", RECIPES / "quickstart-sft.yaml"  # the settings, as config files


def add_arguments(p) -> None:
    add_config_flags(p, ("--out",), overrides_help="dotted overrides of the recipe, e.g. train.max_steps=200 "
                                                   "(every key is listed below)",
                     epilog="The recipe (lmlab recipes show quickstart, or -c FILE) sets some keys away from these "
                            "defaults.")
    p.add_argument("--finetune", action="store_true",
                   help="second act: instruction-tune the result on stdlib-instruct and compare base vs tuned")


def run(args) -> int:
    import yaml

    from ..config import load_config
    from ..plan.estimate import memory_line
    from ..train.loop import train

    cfg = load_config(args.config or RECIPE, [*args.overrides, *alias_overrides(args)])
    print("lmlab quickstart: mamba-swelu-tiny on the Python standard library")
    print(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k in ("model", "data")},
                         default_flow_style=None, sort_keys=False).strip())
    run_dir = train(cfg, preflight=memory_line)
    if not args.finetune:
        print(f"\nnext:     lmlab generate {run_dir} -p 'def '\n          lmlab resume {run_dir} train.max_steps=1000"
              f"\n          lmlab quickstart --finetune   (adds instruction tuning and a base-vs-tuned comparison)")
        return 0
    base = run_dir / "final"
    print(f"\nlmlab quickstart, second act: instruction tuning {base} on stdlib-instruct")
    sft = load_config(SFT_RECIPE, [f"model.name={base}", f"data.tokenizer={base}", f"run.out_dir={cfg.run.out_dir}",
                                   f"run.name={run_dir.name}-sft"])
    tuned = train(sft, preflight=memory_line)
    second_act_report(base, tuned)
    print(f"\nnext:     lmlab chat {tuned}\n          lmlab compare {base} {tuned}")
    return 0


def second_act_report(base: Path, tuned: Path) -> None:
    """Held-out instruction loss of base and tuned, and both models' answers to two held-out prompts."""
    import json

    from ..data.examples import held_out_examples
    from ..generate import SamplingConfig
    from .compare import compare, render_text

    run = json.loads((tuned / "run.json").read_text())
    evals = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()
             if '"kind": "eval"' in line]
    evals = [e for e in evals if isinstance(e.get("val_loss"), (int, float))]  # no held-out data: no value
    if evals:
        print(f"held-out instruction loss: {evals[0]['val_loss']:.3f} after {evals[0]['step']} steps → "
              f"{evals[-1]['val_loss']:.3f} after {evals[-1]['step']} ({run.get('total_steps')} steps of tuning)")
    from ..config import load_config

    cfg = load_config(tuned / "config.yaml")  # the tuned run's own split
    held_out = sorted(held_out_examples(cfg), key=lambda e: len(e.messages[-1]["content"]))[:2]
    prompts = [{"prompt": e.messages[0]["content"], "reference": e.messages[-1]["content"]} for e in held_out]
    rows = compare(str(base), str(tuned), prompts, SamplingConfig(max_new_tokens=64, temperature=0.0))
    print(render_text(rows, ("base", "tuned")))
