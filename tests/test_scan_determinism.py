"""The `cpu` scan is bitwise deterministic at any thread count, and so is training through it.

The C++ backward cuts the work into (batch row, channel group) items whose groups depend on the
shapes only, sums each group's dB, dC into its own buffer and reduces the buffers in a fixed order.
So the scan's outputs and every gradient must be equal to the bit at 1, 2 and 3 threads, whatever
thread ran which item; and two training runs at the same thread count must end with the same weights.
The rest of a model is torch, whose CPU kernels split work by thread count (a vectorised op runs its
scalar tail at each thread's boundary, MKL picks blocks per thread count): training is bitwise
repeatable at a fixed thread count, and is checked across thread counts only for the scan itself.
"""

import contextlib

import pytest
import torch
from test_scan import NAMES, make_inputs

from lmlab.models import build_config, build_model, scan_cpu
from lmlab.models import scan as S
from lmlab.models.scan_cpu import backward_groups, cpu_kernel_available

# (b, d, l, n, seq_idx, initial_state): l never a power of two; generic and unrolled (16) state sizes;
# groups of one and of several LANES-channel blocks (8, or 16 on AVX-512), uneven, with a short last block;
# documents starting inside and on CPU_CHUNK boundaries
CASES = [
    (2, 37, 130, 16, True, True),
    (3, 70, 77, 5, (1, 30, 64), True),
    (1, 200, 65, 16, False, False),
    (5, 9, 33, 16, True, False),
    (20, 100, 40, 16, True, True),
    (2, 1040, 130, 16, True, False),  # 1 MiB fp32 outputs: the backward streams whole lines of them
]


@pytest.fixture(autouse=True)
def _needs_kernel():
    if not cpu_kernel_available():
        pytest.skip("no C++ compiler: the cpu backend runs `chunked`")


@contextlib.contextmanager
def num_threads(k: int):
    old = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def scan_and_grads(kw, dtype=torch.float32):
    """Output, last state and the gradient of every input, for a fixed random functional of both."""
    leaves = {k: v.detach().to(dtype).requires_grad_() if k != "seq_idx" else v for k, v in kw.items()}
    y, last = S.selective_scan(**leaves, return_last_state=True, backend="cpu")
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=dtype)).sum()
    loss = loss + (last * torch.randn(last.shape, generator=g, dtype=dtype)).sum()
    names = [k for k in NAMES if k in leaves]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return {"y": y, "last": last, **{f"d{k}": gr for k, gr in zip(names, grads)}}


def assert_bitwise_equal(got: dict, want: dict, what: str):
    assert got.keys() == want.keys()
    for key, w in want.items():
        diff = (got[key].double() - w.double()).abs().max().item()
        assert torch.equal(got[key], w), f"{what}: {key} differs (max |diff| {diff:.3g})"


@pytest.mark.parametrize("lanes,want", [(8, [25, 5, 2, 1, 1, 2, 8, 4]), (16, [13, 3, 1, 1, 1, 2, 8, 4])])
def test_groups_depend_on_shapes_only(monkeypatch, lanes, want):
    # groups of LANES-channel blocks (8, or 16 on AVX-512): at most one group a block, about 32 (batch row, group)
    # items in all
    monkeypatch.setattr(scan_cpu, "LANES", lanes)
    shapes = [(1, 200), (2, 37), (5, 9), (64, 8), (100, 8), (20, 100), (4, 512), (8, 2048)]
    assert [backward_groups(b, d) for b, d in shapes] == want


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}l{}n{}".format(*c[:4]))
def test_cpu_scan_is_bitwise_equal_at_1_2_3_threads(case):
    kw = make_inputs(*case)
    with num_threads(1):
        want = scan_and_grads(kw)
    assert {"dA", "dB", "dC", "dD", "ddelta_bias"} <= want.keys() and ("dinitial_state" in want) == case[5]
    for k in (2, 3, 2):  # 2 twice: the assignment of items to threads may change from call to call
        with num_threads(k):
            assert_bitwise_equal(scan_and_grads(kw), want, f"{k} threads vs 1")


def test_cpu_scan_float64_is_bitwise_equal_at_1_and_3_threads():
    kw = make_inputs(2, 33, 70, 16, True, True)
    with num_threads(1):
        want = scan_and_grads(kw, torch.float64)
    with num_threads(3):
        assert_bitwise_equal(scan_and_grads(kw, torch.float64), want, "float64, 3 threads vs 1")


def train_tiny(threads: int, steps: int = 10) -> dict[str, torch.Tensor]:
    """AdamW steps on a tiny MambaSWELU with the cpu scan; packed documents (seq_idx) on odd steps."""
    with num_threads(threads):
        torch.manual_seed(0)
        cfg = build_config("mamba-swelu-tiny", vocab_size=97,
                           overrides=dict(d_model=32, dense_hidden=32, scan_backend="cpu"))
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(2)
        b, l = 3, 45
        seq_idx = (torch.arange(l) >= 19).long().expand(b, l)
        for step in range(steps):
            ids = torch.randint(0, 97, (b, l), generator=g)
            kw = {"seq_idx": seq_idx} if step % 2 else {}
            model(ids, labels=ids, **kw).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_twice_at_2_threads_gives_bitwise_equal_weights():
    first, second = train_tiny(2), train_tiny(2)
    assert_bitwise_equal(second, first, "second run at 2 threads vs the first")


@pytest.mark.slow
def test_the_8_lane_build_passes_the_kernel_tests_too(tmp_path):
    """On an AVX-512 machine the kernels are built 16 lanes wide; CPUs without it get the 8-lane code (AVX2 and
    the plain C++ loops). Built here with LMLAB_CXXFLAGS=-mno-avx512f into a cache of its own, that build must
    pass the same reference and determinism tests."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if "avx512f" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True:
        pytest.skip("this CPU builds the 8-lane kernels already")
    env = {**os.environ, "LMLAB_CXXFLAGS": "-mno-avx512f", "LMLAB_CACHE": str(tmp_path), "OMP_NUM_THREADS": "2"}
    lanes = subprocess.run([sys.executable, "-c", "from lmlab.models import scan_cpu as s; "
                            "assert s.cpu_kernel_available(); print(s.LANES)"],
                           env=env, capture_output=True, text=True, check=True).stdout.split()[-1]
    assert lanes == "8"
    here = Path(__file__).parent
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(here / "test_kernels_cpu.py"), str(here / "test_scan_determinism.py"),
                          str(here / "test_scan.py"), "-k", "not 8_lane", "-m", "not slow"],
                         env=env, capture_output=True, text=True, cwd=here.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
