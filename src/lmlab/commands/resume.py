"""lmlab resume: continue a run from its latest complete checkpoint."""

from __future__ import annotations

from pathlib import Path

from ._common import add_config_flags


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder, e.g. runs/mamba-swelu-tiny-20261122-101500")
    p.add_argument("--force", action="store_true",
                   help="continue even if the tokenizer, data, number of ranks or global batch changed")
    add_config_flags(p, sections=("train", "log"), config_file=False,
                     overrides_help="change training settings on resume, e.g. train.lr=1.5e-4 after a loss spike, "
                                    "or train.max_steps=2000 to extend the run (the exact-resume guarantee then no "
                                    "longer holds); log.* (e.g. log.wandb=true) too",
                     epilog="A run continues with the values of its own config.yaml; an override changes it there.")


def run(args) -> int:
    from ..config import load_config
    from ..errors import ConfigError, LmlabError
    from ..plan.estimate import memory_line
    from ..train.loop import train

    run_dir = Path(args.run)
    if (run_dir / "stages.yaml").is_file():  # a multi-stage run: each stage is a run of its own
        from ..train.stages import SPEC, resume_stages

        if args.overrides:  # each stage's budget and settings come from the spec it was started with
            raise ConfigError(f"override {args.overrides[0]!r}: a multi-stage run continues with its own {SPEC} "
                              f"({run_dir / SPEC}); resume without overrides")
        resume_stages(run_dir, preflight=memory_line)
        return 0
    if not (run_dir / "config.yaml").is_file():
        raise LmlabError(f"{run_dir}: not an lmlab run folder (no config.yaml)")
    for o in args.overrides:
        if not o.startswith(("train.", "log.")):
            raise ConfigError(f"override {o!r}: only train.* and log.* settings can change on resume")
    cfg = load_config(run_dir / "config.yaml", args.overrides)
    # the changed config.yaml is written only once the run is ours (its lock) and the same run (a refusal
    # leaves the folder as it was)
    train(cfg, run_dir, preflight=memory_line, force=args.force, rewrite_config=bool(args.overrides))
    return 0
