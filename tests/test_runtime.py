"""lmlab.runtime's process-wide settings for CPU training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates, writes and frees a 64 MiB tensor again and again, as a training step does, and prints the fewest
# minor page faults one round took (the kernel may still reclaim some idle pages between rounds).
PROBE = """
import resource, sys, torch
from lmlab.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
fewest = None
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 1024 * 1024)  # 64 MiB of float32
    x.fill_(1.0)
    del x
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    fewest = faults if fewest is None else min(fewest, faults)
print(applied, fewest)
"""


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_keep_freed_memory_stops_the_page_faults_of_a_reallocated_block():
    applied, faults = _probe("keep")
    if applied != "True":
        pytest.skip("not glibc")
    _, default_faults = _probe("default")
    pages = 64 * 1024 * 1024 // 4096
    assert default_faults >= pages // 2  # glibc maps a 64 MiB block afresh each time: a fault per page
    assert faults < pages // 20  # kept and reused: the pages are already there


def test_cpu_training_runtime_keeps_freed_memory(monkeypatch):
    from lmlab import runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    rt = runtime.setup_runtime("cpu", "fp32")
    assert rt.device.type == "cpu" and calls == [1]


# Two ranks end a gloo group the way `lmlab.train.loop.train` does, again and again: a DDP step, the last
# collective (all_gather_object), Runtime.shutdown, and only then the DDP wrapper freed with its reducer.
ENDINGS = """
import os, sys, torch, torch.distributed as dist
from torch import nn
from lmlab.runtime import Runtime
rank, folder, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
for i in range(rounds):
    store = dist.FileStore(os.path.join(folder, f"store-{i}"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    rt = Runtime(device=torch.device("cpu"), precision="fp32", rank=rank, local_rank=rank, world_size=2)
    model = nn.parallel.DistributedDataParallel(nn.Linear(8, 8))
    model(torch.randn(4, 8)).sum().backward()
    rt.all_gather_object("finished")
    rt.shutdown(clean=True)
    del model
print("ended", rounds)
"""


@pytest.mark.slow
def test_two_ranks_end_their_group_without_hanging_when_ddp_is_freed_last(tmp_path):
    """A gloo group's destructor joins its worker threads, which may still need the GIL to free the last
    collective's tensors; freed by a DDP reducer (which keeps the GIL) it hung about one ending in 15. 40 endings
    each on two ranks: a hang fails the test at its timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", ENDINGS, str(r), str(tmp_path), "40"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert all("ended 40" in o for o, _ in outs)
