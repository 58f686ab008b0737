"""The Ray executor (optional: `pip install "ray[default]"`): one Ray task per cell with `num_gpus`.

Ray picks the node and the GPUs and sets CUDA_VISIBLE_DEVICES for the task; the task moves the cell forward as
every executor does (skip finished, resume unfinished, start new; `CellJob` in study/slurm.py) with one process,
or torchrun for several GPUs. The run folders must be on storage every Ray node sees. `address` (or the study's
`ray: {address: ...}`) joins a running cluster; without one a local Ray instance starts.
"""

from __future__ import annotations

import sys

from ..errors import LmlabError
from .spec import Study
from .state import cell_state


def _run_cell(job) -> str:
    return job()


class RayExecutor:
    name = "ray"

    def __init__(self, *, address: str | None = None, max_parallel: int | None = None, num_cpus: float = 1,
                 init_kwargs: dict | None = None, python: str = sys.executable):
        self.address, self.max_parallel, self.num_cpus = address, max_parallel, num_cpus
        self.init_kwargs, self.python = dict(init_kwargs or {}), python

    def run(self, study: Study, echo=print) -> dict[str, str]:
        try:
            import ray
        except ImportError:
            raise LmlabError('the ray executor needs Ray: pip install "ray[default]" (or use --executor local)') \
                from None
        from .slurm import CellJob

        if not ray.is_initialized():
            address = self.address or study.ray.get("address")
            ray.init(address=address, ignore_reinit_error=True, **self.init_kwargs)
        task = ray.remote(_run_cell)
        results = {c.name: cell_state(c.run_dir).kind for c in study.cells}
        limit = self.max_parallel or study.max_parallel
        inflight: dict = {}  # ref -> cell name

        def collect(ref) -> None:
            name = inflight.pop(ref)
            try:
                results[name] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - one failed run does not stop the others
                results[name] = "failed"
                echo(f"failed    {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                return
            echo(f"{results[name]:<9} {name}")

        for cell in study.cells:
            st = cell_state(cell.run_dir)
            if st.kind == "finished":
                echo(f"skipped   {cell.name} (already finished)")
                continue
            if st.kind in ("running", "blocked"):
                echo(f"{st.kind:<9} {cell.name}: {st.why}")
                continue
            if cell.nodes > 1:
                raise LmlabError(f"run {cell.name}: {cell.nodes} nodes; the ray executor runs one node per run")
            while limit and len(inflight) >= limit:
                done, _ = ray.wait(list(inflight), num_returns=1)
                collect(done[0])
            gpus = len(cell.gpus) if cell.gpus is not None else cell.gpus_per_run
            ref = task.options(num_gpus=gpus, num_cpus=self.num_cpus, max_retries=0).remote(
                CellJob(cell, study.out_dir, self.python))
            inflight[ref] = cell.name
            echo(f"submitted {cell.name} (num_gpus={gpus})")
        while inflight:
            done, _ = ray.wait(list(inflight), num_returns=1)
            collect(done[0])
        return results
