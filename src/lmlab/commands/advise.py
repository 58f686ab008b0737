"""lmlab advise: score a fine-tuning config, recipe or run against the rules of thumb (lmlab.plan.advise)."""

from __future__ import annotations

STYLE = {"good": "green", "warn": "yellow", "bad": "red", "n/a": "dim"}


def add_arguments(p) -> None:
    from ._common import add_config_flags, add_hardware_flags

    p.add_argument("subject", help="config file, run folder, or recipe name (see `lmlab recipes`)")
    add_config_flags(p, config_file=False, overrides_help="dotted overrides of the subject, e.g. train.lr=1e-5 "
                                                          "(every key is listed below)")
    add_hardware_flags(p, price=False, hardware_help="judges the batch by its memory and checks that the micro "
                                                     "batch fits", gpus_help="devices the run uses (default 1, or "
                                                                             "the run's own)")
    p.add_argument("--examples", type=int, help="training examples, for the epochs rule (default: the recipe's or "
                                                "the run's count)")
    p.add_argument("--pretrain-lr", type=float,
                   help="the base's pretraining LR (default: read from the base when it is an lmlab run)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")


def render(adv, out) -> None:
    from rich.table import Table

    from ..plan.advise import lr_text  # noqa: F401 - keeps the formatting helpers together

    size = f"{adv.params / 1e6:,.0f}M parameters" if adv.params else "size unknown"
    steps = f"{adv.steps:,} steps" if adv.steps else "no step budget"
    title = (f"lmlab advise: {adv.subject} — {adv.model} ({size}), {adv.objective} {adv.method}, {steps}, "
             f"effective batch {adv.effective_batch}")
    table = Table(title=title, title_justify="left")
    table.add_column("criterion")
    table.add_column("value", overflow="fold")
    table.add_column("verdict")
    table.add_column("score", justify="right")
    table.add_column("advice", overflow="fold")
    for c in adv.criteria:
        style = STYLE.get(c.verdict, "")
        table.add_row(c.name, c.value, f"[{style}]{c.verdict}[/]", "" if c.score is None else f"{c.score:.1f}",
                      c.advice)
    out.print(table)
    if adv.score is None:
        out.print("overall: nothing to score")
        return
    bad = [c.name for c in adv.criteria if c.verdict == "bad"]
    warn = [c.name for c in adv.criteria if c.verdict == "warn"]
    tail = (f"; fix first: {', '.join(bad)}" if bad else "") + (f"; check: {', '.join(warn)}" if warn else "")
    out.print(f"overall: {adv.score:.1f}/10{tail}")


def run(args) -> int:
    from ..plan.advise import advise_spec
    from ._common import console

    adv = advise_spec(args.subject, args.overrides, hardware=args.hardware, gpus=args.gpus, examples=args.examples,
                      pretrain_lr=args.pretrain_lr)
    if args.json:
        print(adv.to_json())
        return 0
    render(adv, console())
    return 0
