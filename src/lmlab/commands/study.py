"""lmlab study: run a grid of training runs from one study file, resumably, on one machine or a cluster."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("study", help="study file (YAML): a base config plus a grid and/or a list of runs")
    p.add_argument("--dry-run", action="store_true",
                   help="print the runs, the planner's memory/time/cost for each and the schedule; write nothing")
    p.add_argument("--executor", default="local", choices=("local", "slurm", "ray"),
                   help="local: a queue on this machine (default); slurm: submitit job arrays; ray: Ray tasks")
    p.add_argument("--max-parallel", type=int, default=None,
                   help="runs at once (default: the study's max_parallel, else one per GPU group, 1 on CPU)")
    p.add_argument("--gpus", default=None, help="GPU ids to hand out, e.g. 0,1,2,3 (default: the study's gpus, "
                   "else every visible GPU)")
    p.add_argument("--out-dir", default=None, help="where the run folders go (default: the study's out_dir)")


def _gpus(text: str | None) -> list[int] | None:
    from ..errors import ConfigError

    if text is None:
        return None
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"--gpus: expected ids like 0,1,2,3, got {text!r}") from None


def run(args) -> int:
    from ..errors import ConfigError
    from ..study import format_plan, load_study, plan, run_study

    if args.max_parallel is not None and args.max_parallel < 1:
        raise ConfigError(f"--max-parallel: must be >= 1, got {args.max_parallel}")
    gpus = _gpus(args.gpus)
    study = load_study(args.study, out_dir=args.out_dir, gpus=gpus)
    if args.dry_run:
        rows, slots = plan(study, max_parallel=args.max_parallel)
        print(format_plan(study, rows, slots))
        return 0
    kw = {"max_parallel": args.max_parallel}
    if args.executor == "local":
        kw["gpus"] = gpus
    print(f"study     {study.name}: {len(study.cells)} runs in {study.out_dir} ({args.executor})", flush=True)
    results = run_study(study, args.executor, echo=lambda s: print(s, flush=True), **kw)
    counts: dict[str, int] = {}
    for v in results.values():
        counts[v] = counts.get(v, 0) + 1
    print("done      " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), flush=True)
    print(f"report    lmlab report {study.out_dir}", flush=True)
    return 0 if all(v == "finished" for v in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m lmlab.commands.study STUDY.yaml ...`: the same as `lmlab study`."""
    import sys

    from ..cli import COMMANDS, Parser
    from ..errors import LmlabError

    p = Parser(prog="lmlab study", description=COMMANDS["study"].help)
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except LmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


if __name__ == "__main__":
    raise SystemExit(main())
