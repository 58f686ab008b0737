"""The one place that decides device, precision and distribution.

Under `torchrun` (WORLD_SIZE > 1) the process group is initialised here: NCCL on CUDA, gloo on CPU.
Model code never looks at ranks or autocast; the loop asks the Runtime.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import ConfigError, LmlabError
from .fsutil import error_line

# ended process groups, kept to the interpreter's exit so that no other holder destroys them with the GIL held
# (Runtime.shutdown)
_ENDED_GROUPS: list = []


@dataclass
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    _flags_group: object = field(default=None, repr=False, compare=False)  # gloo group for host-side flags
    owns_group: bool = False  # a one-rank group made for a single process (deepspeed): ended by shutdown

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def flags_group(self):
        """A gloo group beside the run's NCCL one (collective the first time: every rank asks together)."""
        if self._flags_group is None:
            self._flags_group = dist.new_group(backend="gloo")
        return self._flags_group

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (a stop asked for by a signal). Over gloo with a CPU tensor,
        also when the run's collectives are NCCL: asking costs no GPU synchronisation."""
        if not self.distributed:
            return flag
        group = None
        if dist.get_backend() != "gloo":
            group = self.flags_group()
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item() > 0)

    def all_gather_object(self, obj):
        """Every rank's `obj`, in rank order (small picklable values only: RNG states, flags)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def main_first(self, fn, *, others: bool = True):
        """Run `fn` on rank 0, then (with `others`) on every other rank: rank 0 makes what the others then
        read (a cache, the run folder). A failure on rank 0 reaches every rank, as the same one line, at
        this point instead of leaving them waiting at the next collective. Returns `fn`'s result (None on
        the other ranks without `others`)."""
        result = self.together(fn, ranks=(0,))
        if not self.is_main and others:
            result = fn()
        return result

    def together(self, fn, *, ranks: tuple[int, ...] | None = None):
        """Run `fn` on `ranks` (all by default), then learn, on every rank, whether it failed anywhere: a
        failure raises there as itself and on every other rank as one LmlabError line naming it."""
        result, failure = None, None
        if ranks is None or self.rank in ranks:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - shared with the other ranks, then raised again here
                failure = e
        if self.distributed:
            said = None
            if failure is not None:
                said = str(failure) if isinstance(failure, LmlabError) else error_line(failure)
            failed = [(r, m) for r, m in enumerate(self.all_gather_object(said)) if m is not None]
            if failure is None and failed:
                raise LmlabError(f"rank {self.rank} stops: rank {failed[0][0]} failed: {failed[0][1]}")
        if failure is not None:
            raise failure
        return result

    def shutdown(self, clean: bool = False) -> None:
        """End the process group. `clean` (every rank got here without an error): a barrier first, so that no
        rank leaves while another is still in a collective.

        The groups' Python objects are then kept until the interpreter exits (`_ENDED_GROUPS`). A gloo group's
        C++ destructor joins its worker threads, and a worker that is still retiring the last collective takes
        the GIL to free that collective's tensors. The Python object releases the GIL before it destroys the
        group, but a DDP wrapper's reducer, freed after this returns, does not: had it held the last reference,
        it would join those threads while holding the GIL they wait for, and the rank would hang at exit (seen
        about once in 15 two-rank runs)."""
        if (self.distributed or self.owns_group) and dist.is_initialized():
            if clean and self.distributed:  # gloo's timeout (30 min), also beside NCCL: rank 0 may be exporting
                dist.barrier(group=self.flags_group() if dist.get_backend() != "gloo" else None)
            _ENDED_GROUPS.extend(g for g in (dist.group.WORLD, self._flags_group) if g is not None)
            dist.destroy_process_group()


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' requested but no CUDA device is available; use auto or cpu")
        return torch.device("cuda", local_rank)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError("train.device: 'mps' requested but MPS is not available; use auto or cpu")
        return torch.device("mps")
    return torch.device("cpu")


def cpu_bf16() -> str | None:
    """The bf16 instructions of this CPU ("AMX", "AVX512-BF16"), or None where bf16 on the CPU is emulated.
    Read from /proc/cpuinfo's flags (Linux); torch's own probe elsewhere. Having them does not make bf16 the
    faster precision: `cpu_bf16_faster` decides that."""
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):  # noqa: SIM115 - read to the first flags line only
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    if not flags:
        try:
            flags = {"avx512_bf16"} if torch.backends.cpu.get_cpu_capability() == "AVX512_BF16" else set()
        except AttributeError:
            return None
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


# bf16 matmuls this many times faster than fp32's (as `cpu_bf16_matmul_speedup` reads them) make the CPU step
# clearly faster in bf16: mamba-swelu-small's step ran 2.0x faster where the probe read 3.7-4.0x (AMX), and 0.77x
# (slower) where it read 0.6x (oneDNN held to AVX512-BF16); docs/benchmarks.md
BF16_ADVICE_SPEEDUP = 1.5


def cpu_bf16_matmul_speedup() -> float:
    """How many times faster a 1,024³ `torch.mm` runs in bf16 than in fp32 on this CPU, at torch's current thread
    count (best of 3 each after a warm-up; 60-100 ms, measured once a thread count per process). With AMX it
    read 3.7-4.0x; with oneDNN's AVX512-BF16 kernels alone, on the same cores, 0.6x: slower than fp32."""
    return _matmul_speedup(torch.get_num_threads())


@functools.cache
def _matmul_speedup(threads: int) -> float:
    def best(dtype: torch.dtype) -> float:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(1024, 1024, generator=g).to(dtype) for _ in range(2))
        times = []
        for _ in range(4):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
        return min(times[1:])

    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return best(torch.float32) / best(torch.bfloat16)


def cpu_bf16_faster() -> str | None:
    """Where bf16 training is the faster choice on this CPU (it has bf16 instructions and its bf16 matmuls run at
    least BF16_ADVICE_SPEEDUP times fp32's), a phrase saying so for `lmlab doctor`, the planner and the fp16
    error; else None. The one place that decides it."""
    hardware = cpu_bf16()
    if hardware is None:
        return None
    speedup = cpu_bf16_matmul_speedup()
    return f"{hardware}; bf16 matmuls measured {speedup:.1f}x fp32's" if speedup >= BF16_ADVICE_SPEEDUP else None


def pick_precision(name: str, device: torch.device) -> str:
    """auto: fp32 on CPU/MPS, bf16 on GPUs that support it, fp16 (with loss scaling) on older GPUs. On CPU,
    bf16 runs the matmuls under autocast (the scan, SWELU's exp/pow and the loss stay fp32): faster than fp32
    where the CPU's bf16 matmuls are (`cpu_bf16_faster`), so `lmlab doctor` and the planner suggest it there."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name == "fp16" and device.type == "cpu":
        faster = cpu_bf16_faster()
        hint = (f"train.precision=bf16 is faster than fp32 on this CPU ({faster})" if faster
                else "fp32 is the fast choice on this CPU: its bf16 matmuls are not faster than fp32's")
        raise ConfigError(f"train.precision: fp16 is not supported on CPU; use fp32 or bf16 ({hint})")
    return name


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep large freed blocks for reuse instead of returning them to the OS.

    A training step allocates and frees the same large tensors every step. By default glibc maps blocks of 32 MiB
    and more afresh each time and gives freed memory at the top of its heap back, so each step writes into fresh
    pages and pays a page fault per 4 KiB: about 15,000 a step at mamba-swelu-small's 4 × 256 batch, 1–5 % of its
    CPU step. With the mmap threshold at 1 GiB and trimming off, the freed blocks are reused (no faults after
    the first steps); peak memory stays what the step needs, but the process keeps it until it exits. Applied by
    `setup_runtime` for CPU training; True when it took effect (glibc), False elsewhere (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def setup_runtime(device: str = "auto", precision: str = "auto", threads: int | None = None) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if threads is not None:
        torch.set_num_threads(threads)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        _init_process_group("nccl" if dev.type == "cuda" else "gloo", rank, world)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif dev.type == "cpu":
        keep_freed_memory()
    return Runtime(device=dev, precision=pick_precision(precision, dev), rank=rank,
                   local_rank=local_rank, world_size=world)


def _init_process_group(backend: str, rank: int, world: int) -> None:
    """The default process group, as `env://` would make it, except under torchrun's restarts
    (`--max-restarts`): there each attempt's keys get a prefix of their own. torchrun keeps its key-value
    store across attempts, and a restarted rank that reads a peer's address left by an earlier attempt fails
    with "Gloo connectFullMesh failed ... Connection refused" (every second restart, torch 2.13)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend=backend)
        return
    from torch.distributed.constants import default_pg_timeout

    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=not agent_hosts_it and rank == 0, timeout=default_pg_timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"lmlab/attempt-{attempt}", store),
                            rank=rank, world_size=world)
