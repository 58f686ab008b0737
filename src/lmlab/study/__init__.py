"""Studies: many runs from one file, run by an executor, with the run folders as the only state.

    study = load_study("examples/studies/swelu-vs-baselines.yaml")     # one Cell per run, validated
    print(format_plan(study, *plan(study)))                             # what --dry-run prints
    results = run_study(study, "local", max_parallel=2)                 # {cell name: finished | failed | ...}

An executor is anything with `run(study, echo) -> {cell name: outcome}`:
    local   LocalExecutor    a queue on this machine handing out disjoint GPU groups (study/local.py)
    slurm   SlurmExecutor    submitit job arrays, requeued with an exact-resume checkpoint (study/slurm.py)
    ray     RayExecutor      one Ray task per run with num_gpus (study/ray.py; Ray is optional)
Each one asks the run folder what to do (study/state.py): skip finished runs, resume unfinished ones, start new
ones. So re-running a study, with any executor, finishes it.
"""

from __future__ import annotations

from pathlib import Path

from .plan import format_plan, plan
from .spec import Cell, Study, load_study, study_from_dict
from .state import State, cell_state

EXECUTORS = ("local", "slurm", "ray")


def make_executor(name: str = "local", **kw):
    """The executor called `name`; keyword arguments go to its constructor (max_parallel, gpus, launcher, ...)."""
    from ..errors import ConfigError

    if name == "local":
        from .local import LocalExecutor

        return LocalExecutor(**kw)
    if name == "slurm":
        from .slurm import SlurmExecutor

        return SlurmExecutor(**kw)
    if name == "ray":
        from .ray import RayExecutor

        return RayExecutor(**kw)
    raise ConfigError(f"--executor: unknown executor {name!r}; allowed: {', '.join(EXECUTORS)}")


def run_study(study: Study, executor="local", *, echo=print, **kw) -> dict[str, str]:
    """Run every unfinished cell of `study`; returns {cell name: finished | failed | stopped | ...}."""
    ex = make_executor(executor, **kw) if isinstance(executor, str) else executor
    if hasattr(ex, "check"):  # an executor that cannot run here says so before anything is written
        ex.check()
    write_study_file(study)
    return ex.run(study, echo=echo)


def write_study_file(study: Study) -> None:
    """The study file beside its runs (out_dir/study.yaml): `lmlab report` reads price and hardware from it."""
    import yaml

    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = study.text or yaml.safe_dump({"name": study.name, "hardware": study.hardware,
                                         "price_per_hour": study.price_per_hour}, sort_keys=False)
    (out / "study.yaml").write_text(text)


__all__ = ["EXECUTORS", "Cell", "State", "Study", "cell_state", "format_plan", "load_study", "make_executor",
           "plan", "run_study", "study_from_dict", "write_study_file"]
