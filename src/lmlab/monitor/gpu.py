"""System stats: GPUs through NVML, CPU and memory through /proc, sampled on a side thread.

    gpu_stats() -> [dict]          one dict per GPU (empty where there is no NVML or no GPU)
    host_stats() -> dict           CPU %, load, RAM, this process's RSS
    SystemSampler(callback, interval_s=10, gpu_uuids=cuda_uuids()).start() ... .stop()
                                   calls callback({"cpu_percent": …, "gpus": [...], …}) every interval
                                   from a daemon thread; the caller is never blocked

A GPU dict: index (NVML order = PCI bus order), uuid, pci_bus_id, name, util (%), mem_util (%),
mem_used and mem_total (bytes), temp (°C), power_w, power_limit_w, throttle (list of reasons).
A field NVML cannot give on a device is None. CUDA numbers devices fastest-first unless
CUDA_DEVICE_ORDER=PCI_BUS_ID; match a CUDA device to its row by UUID.

NVML comes from `nvidia-ml-py` (the module it installs is `pynvml`). Tests pass a source object of
their own (anything with `read() -> list[dict]`), e.g. FakeGpuSource.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# NVML clock-event ("throttle") reason bits -> words. "idle" and "app clocks" are benign.
THROTTLE_REASONS = {
    0x1: "idle",
    0x2: "app clocks",
    0x4: "power cap",
    0x8: "hw slowdown",
    0x10: "sync boost",
    0x20: "sw thermal",
    0x40: "hw thermal",
    0x80: "power brake",
    0x100: "display clocks",
}
BENIGN_THROTTLE = {"idle", "app clocks", "sync boost", "display clocks"}


def throttle_names(mask: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if mask & bit]


class NvmlSource:
    """Reads every GPU NVML sees, in PCI bus order. `available` is False where NVML cannot start."""

    def __init__(self):
        self.available = False
        self._nv = None
        self._handles: list = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pynvml
            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no library, no driver, no device: all mean "no GPU stats"
            return
        self._nv = pynvml
        self._handles = handles
        self.available = True

    def _get(self, fn: str, *args, default=None):
        try:
            return getattr(self._nv, fn)(*args)
        except Exception:  # noqa: BLE001 - NVML raises NotSupported etc. per field and per device
            return default

    def read(self) -> list[dict]:
        if not self.available:
            return []
        nv, out = self._nv, []
        for i, h in enumerate(self._handles):
            name = self._get("nvmlDeviceGetName", h)
            uuid = self._get("nvmlDeviceGetUUID", h)
            pci = self._get("nvmlDeviceGetPciInfo", h)
            util = self._get("nvmlDeviceGetUtilizationRates", h)
            mem = self._get("nvmlDeviceGetMemoryInfo", h)
            temp = self._get("nvmlDeviceGetTemperature", h, nv.NVML_TEMPERATURE_GPU)
            power = self._get("nvmlDeviceGetPowerUsage", h)
            limit = self._get("nvmlDeviceGetEnforcedPowerLimit", h)
            reasons = self._get("nvmlDeviceGetCurrentClocksEventReasons", h)
            if reasons is None:
                reasons = self._get("nvmlDeviceGetCurrentClocksThrottleReasons", h)
            bus = getattr(pci, "busId", None) if pci is not None else None
            out.append({
                "index": i,
                "uuid": _text(uuid),
                "pci_bus_id": _text(bus),
                "name": _text(name),
                "util": getattr(util, "gpu", None),
                "mem_util": getattr(util, "memory", None),
                "mem_used": getattr(mem, "used", None),
                "mem_total": getattr(mem, "total", None),
                "temp": temp,
                "power_w": power / 1000 if power is not None else None,
                "power_limit_w": limit / 1000 if limit is not None else None,
                "throttle": throttle_names(reasons) if reasons is not None else [],
            })
        return out

    def close(self) -> None:
        if self.available:
            self._get("nvmlShutdown")
            self.available = False


def _text(v: Any) -> str | None:
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return v


class FakeGpuSource:
    """A stand-in for NVML in tests and demos: returns the given GPU dicts (or successive frames of them)."""

    available = True

    def __init__(self, gpus: Sequence[dict] | Sequence[Sequence[dict]] = ()):
        frames = list(gpus)
        if frames and isinstance(frames[0], dict):
            frames = [frames]
        self._frames = [[_fake_defaults(i, g) for i, g in enumerate(f)] for f in frames] or [[]]
        self._i = 0

    def read(self) -> list[dict]:
        frame = self._frames[min(self._i, len(self._frames) - 1)]
        self._i += 1
        return [dict(g) for g in frame]


def _fake_defaults(i: int, g: dict) -> dict:
    base = {"index": i, "uuid": f"GPU-fake-{i:04d}", "pci_bus_id": f"00000000:{i + 1:02X}:00.0",
            "name": "Fake GPU", "util": 0, "mem_util": 0, "mem_used": 0, "mem_total": 24 << 30, "temp": 40,
            "power_w": 50.0, "power_limit_w": 450.0, "throttle": []}
    base.update(g)
    return base


_default_source: NvmlSource | None = None


def default_source() -> NvmlSource:
    """One NVML source per process (NVML init is not free)."""
    global _default_source
    if _default_source is None:
        _default_source = NvmlSource()
    return _default_source


def gpu_stats(source=None) -> list[dict]:
    """One dict per GPU, in PCI bus order; [] where there is no NVML or no GPU."""
    try:
        return list((source or default_source()).read())
    except Exception:  # noqa: BLE001 - a monitor never takes the caller down
        return []


def norm_uuid(u: Any) -> str:
    """NVML says 'GPU-1a2b…', torch says '1a2b…': compare them without prefix and case."""
    s = str(u or "").strip().lower()
    return s[4:] if s.startswith("gpu-") else s


def cuda_uuids(devices: Sequence[int] | None = None) -> list[str]:
    """NVML-style UUIDs ('GPU-…') of CUDA devices as this process numbers them (after CUDA_VISIBLE_DEVICES)."""
    import torch

    if not torch.cuda.is_available():
        return []
    ids = range(torch.cuda.device_count()) if devices is None else devices
    return [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in ids]


# CPU and memory -----------------------------------------------------------------------------------------
def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies from /proc/stat's aggregate line."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    vals = [float(x) for x in parts[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
    total = sum(vals[:8])  # guest time is already counted in user
    return total - idle, total


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields:
                    out[key] = int(fields[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class HostStats:
    """CPU utilisation between successive calls (whole machine and this process), load, RAM."""

    def __init__(self):
        self._cpu = _cpu_times()
        self._proc = (time.monotonic(), os.times())

    def read(self) -> dict:
        out: dict[str, Any] = {"cpu_percent": None, "proc_cpu_percent": None, "load1": None,
                               "cpu_count": os.cpu_count(), "ram_used": None, "ram_total": None, "rss": _rss()}
        cur = _cpu_times()
        if cur is not None and self._cpu is not None and cur[1] > self._cpu[1]:
            out["cpu_percent"] = round(100 * (cur[0] - self._cpu[0]) / (cur[1] - self._cpu[1]), 1)
        self._cpu = cur
        now, t = time.monotonic(), os.times()
        t0, pt = self._proc
        if now > t0:
            used = (t.user + t.system) - (pt.user + pt.system)
            out["proc_cpu_percent"] = round(100 * used / (now - t0), 1)
        self._proc = (now, t)
        try:
            out["load1"] = round(os.getloadavg()[0], 2)
        except (OSError, AttributeError):
            pass
        mem = _meminfo()
        if "MemTotal" in mem:
            out["ram_total"] = mem["MemTotal"]
            out["ram_used"] = mem["MemTotal"] - mem.get("MemAvailable", mem.get("MemFree", 0))
        return out


def host_stats() -> dict:
    """CPU % over the last 0.1 s, load, RAM and this process's RSS."""
    h = HostStats()
    time.sleep(0.1)
    return h.read()


class SystemSampler:
    """Calls `callback(stats)` every `interval_s` seconds from a daemon thread.

    stats = {"time": unix seconds, "cpu_percent", "proc_cpu_percent", "load1", "cpu_count",
             "ram_used", "ram_total", "rss", "gpus": [gpu dicts]}

    `gpu_uuids` keeps only this run's GPUs (a shared machine runs several jobs); None keeps all.
    The caller's thread never waits on NVML or /proc. An exception in the callback is kept in
    `last_error` and counted in `errors`; sampling continues. Use as a context manager or call
    start()/stop(). `sample()` takes one sample on the calling thread.
    """

    def __init__(self, callback: Callable[[dict], Any], interval_s: float = 10.0, gpu_source=None,
                 gpus: bool = True, gpu_uuids: Sequence[str] | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.callback = callback
        self.interval_s = interval_s
        self._gpu_source = gpu_source
        self._gpus = gpus
        self._only = {norm_uuid(u) for u in gpu_uuids} if gpu_uuids else None
        self._host = HostStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.errors = 0
        self.last_error: BaseException | None = None

    def sample(self) -> dict:
        stats: dict[str, Any] = {"time": round(time.time(), 3)}
        stats.update(self._host.read())
        gpus = gpu_stats(self._gpu_source) if self._gpus else []
        if self._only is not None:
            gpus = [g for g in gpus if norm_uuid(g.get("uuid")) in self._only]
        stats["gpus"] = gpus
        return stats

    def _loop(self) -> None:
        while True:
            try:
                self.callback(self.sample())
                self.samples += 1
            except Exception as e:  # noqa: BLE001 - the trainer must never die of a monitoring problem
                self.errors += 1
                self.last_error = e
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> SystemSampler:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="lmlab-system-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> SystemSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
