"""The Slurm executor, through submitit: one job per cell, cells of the same shape in one job array.

Each job runs `CellJob`, which looks at the run folder (skip, resume or start, like the local executor) and runs
one process per node: a plain `python -m lmlab.cli` for one GPU, torchrun for several, and for several nodes
torchrun on every node (submitit starts one task per node, i.e. `srun torchrun ...`) meeting at a c10d rendezvous
on the job's first host. On preemption or time-out Slurm signals the job; submitit calls
`CellJob.__submitit_checkpoint__`, which sends SIGTERM to the trainer (it saves an exact-resume checkpoint at the
end of its step and exits) and hands back the same job, requeued: it resumes from that checkpoint.

The study file's `slurm:` mapping goes to submitit (`partition`, `timeout_min`, `account`, `qos`, `constraint`,
`mem_gb`, `cpus_per_task`, `array_parallelism`, ...; keys without a prefix are tried as submitit's generic ones
first, then as `slurm_<key>`). `cluster="debug"` or `"local"` runs the same jobs on this machine (tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import LmlabError
from .spec import Cell, Study
from .state import State, cell_state, command, outcome, prepare, tail

GENERIC = {"timeout_min", "nodes", "mem_gb", "tasks_per_node", "name", "stderr_to_stdout", "gpus_per_node",
           "cpus_per_task"}
RDZV_PORT = 29400


class CellJob:
    """What one Slurm job runs: move one cell forward (its run folder decides how). Picklable; checkpointable."""

    def __init__(self, cell: Cell, out_dir: str | Path, python: str = sys.executable, stop_timeout_s: float = 600):
        self.cell, self.out_dir, self.python, self.stop_timeout_s = cell, Path(out_dir), python, stop_timeout_s
        self._proc = None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._proc = None

    def __call__(self) -> str:
        cell = self.cell
        st = cell_state(cell.run_dir)
        if st.kind == "finished":
            return "finished"
        if st.kind in ("running", "blocked"):
            raise LmlabError(f"{cell.name}: {st.why}")
        env_info = _job_env()
        nodes = env_info.get("num_nodes", 1)
        rank = env_info.get("global_rank", 0)
        if rank == 0:
            log = prepare(cell, st, self.out_dir)
        else:  # other nodes join the rendezvous; the folder is rank 0's to create
            log = self.out_dir / ".cells" / f"{cell.name}.node{env_info.get('node', rank)}.out"
            st = State("resume") if st.kind == "resume" else st
        nproc = len(cell.gpus) if cell.gpus is not None else cell.gpus_per_run
        rdzv = f"{env_info['hostnames'][0]}:{RDZV_PORT}" if nodes > 1 else None
        cmd = command(cell, st, self.out_dir, nproc=nproc, nodes=nodes, rdzv=rdzv,
                      rdzv_id=str(env_info.get("job_id", cell.name)), python=self.python)
        with open(log, "ab") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rc = self._proc.wait()
        result = outcome(cell.run_dir, rc)
        if result == "failed":
            raise LmlabError(f"{cell.name}: exit {rc}; see {log}\n{tail(log)}")
        return result

    def __submitit_checkpoint__(self, *args, **kwargs):
        """Preempted or timed out: let the trainer checkpoint and stop, then requeue this same job."""
        from submitit.helpers import DelayedSubmission

        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()  # the last complete checkpoint still resumes exactly
        return DelayedSubmission(CellJob(self.cell, self.out_dir, self.python, self.stop_timeout_s), *args, **kwargs)

    checkpoint = __submitit_checkpoint__  # submitit looks for either name


def _job_env() -> dict:
    try:
        import submitit

        env = submitit.JobEnvironment()
        return {"num_nodes": env.num_nodes, "global_rank": env.global_rank, "node": env.node,
                "hostnames": env.hostnames, "job_id": env.job_id}
    except Exception:  # noqa: BLE001 - not inside a submitit job (called directly)
        return {"num_nodes": 1, "global_rank": 0, "node": 0, "hostnames": ["localhost"], "job_id": None}


class SlurmExecutor:
    name = "slurm"

    def __init__(self, *, cluster: str | None = None, folder: str | Path | None = None, max_parallel: int | None = None,
                 parameters: dict | None = None, wait: bool = True, python: str = sys.executable):
        self.cluster, self.folder, self.max_parallel = cluster, folder, max_parallel
        self.parameters, self.wait, self.python = dict(parameters or {}), wait, python

    def check(self) -> None:
        """Refuse, before anything is written, where jobs cannot go to Slurm: submitit missing, or (the cluster
        left to submitit to pick, or "slurm") no `sbatch` on PATH. `cluster="local"`/`"debug"` run the jobs here
        on purpose (tests); without Slurm nothing falls back to them silently."""
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise LmlabError("--executor slurm: needs submitit: pip install 'lmlab[study]'") from None
        if self.cluster in (None, "slurm") and shutil.which("sbatch") is None:
            raise LmlabError("--executor slurm: Slurm is not available on this machine (no sbatch on PATH); run "
                             "the study from a Slurm login node, or here with --executor local")

    def executor(self, study: Study, cell: Cell):
        self.check()
        import submitit

        ex = submitit.AutoExecutor(folder=Path(self.folder or Path(study.out_dir) / ".slurm" / "%j"),
                                   cluster=self.cluster)
        gpus = len(cell.gpus) if cell.gpus is not None else cell.gpus_per_run
        params = {"name": f"{study.name}", "nodes": cell.nodes, "tasks_per_node": 1, "gpus_per_node": gpus,
                  "timeout_min": 24 * 60}
        for k, v in {**study.slurm, **self.parameters}.items():
            params[k if k in GENERIC or k.startswith("slurm_") else f"slurm_{k}"] = v
        limit = self.max_parallel or study.max_parallel
        if limit and ex.cluster == "slurm":
            params.setdefault("slurm_array_parallelism", limit)
        ex.update_parameters(**params)
        return ex

    def submit(self, study: Study, echo=print) -> list:
        """Submit every unfinished cell; cells with the same GPUs and nodes share one job array. Returns the jobs."""
        groups: dict[tuple, list[Cell]] = {}
        for cell in study.cells:
            st = cell_state(cell.run_dir)
            if st.kind == "finished":
                echo(f"skipped   {cell.name} (already finished)")
                continue
            if st.kind in ("running", "blocked"):
                echo(f"{st.kind:<9} {cell.name}: {st.why}")
                continue
            key = (cell.gpus_per_run if cell.gpus is None else len(cell.gpus), cell.nodes)
            groups.setdefault(key, []).append(cell)
        jobs = []
        for cells in groups.values():
            ex = self.executor(study, cells[0])
            with ex.batch():
                batch = [(c, ex.submit(CellJob(c, study.out_dir, self.python))) for c in cells]
            for c, job in batch:
                echo(f"submitted {c.name} (job {job.job_id})")
            jobs += batch
        return jobs

    def run(self, study: Study, echo=print) -> dict[str, str]:
        jobs = self.submit(study, echo)
        results = {c.name: cell_state(c.run_dir).kind for c in study.cells}
        for c, _ in jobs:
            results[c.name] = "submitted"
        if not self.wait:
            return results
        for c, job in jobs:
            try:
                results[c.name] = job.result()
            except Exception as e:  # noqa: BLE001 - one failed run does not stop the others
                results[c.name] = "failed"
                echo(f"failed    {c.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            echo(f"{results[c.name]:<9} {c.name}")
        return results
