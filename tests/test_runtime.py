"""lmlab.runtime's process-wide settings for CPU training."""

from __future__ import annotations

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
