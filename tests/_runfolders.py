"""Hand-written run folders, for the states the real trainer cannot produce in a test (tests/fixture_runs.py has
the ones it can): a run alive and still training, GPU records, long histories with chosen pathologies (spikes, a
rising or stalled loss, overfitting, a throughput drop, stale or missing checkpoints).

    make_run(root, "healthy")   -> Path        see SCENARIOS for the names
    fake_disk(free, total)      -> a shutil.disk_usage stand-in
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

from lmlab.monitor.gpu import FakeGpuSource, SystemSampler

GB = 1 << 30
DiskUsage = namedtuple("DiskUsage", "total used free")


def fake_disk(free: float, total: float = 1000 * GB):
    return lambda path: DiskUsage(int(total), int(total - free), int(free))


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _local(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def write_run(root: Path, name: str, *, n_logs: int = 100, log_every: int = 10, total_steps: int = 2000,
              status: str = "running", alive: bool = True, dt: float = 2.0, now: float | None = None,
              loss=None, val=None, lr=None, grad_norm=None, tok_s=None, nan_at: int | None = None,
              save_every: int = 200, checkpoint_age: float | None = None, checkpoints: bool = True,
              gpus=None, eval_every_logs: int = 10, tokens_per_step: int = 4096, seed: int = 0,
              model: str = "mamba-swelu-tiny") -> Path:
    """Write run.json, config.yaml, metrics.jsonl, train.log and checkpoints/ as the trainer would.

    loss/val/lr/grad_norm/tok_s: functions of the log index i (0..n_logs-1) and the step.
    gpus: a function of i returning the GPU dicts a FakeGpuSource reports (None: no system records).
    """
    rng = random.Random(seed)
    now = time.time() if now is None else now
    path = Path(root) / name
    path.mkdir(parents=True)
    loss = loss or (lambda i, s: 2.0 + 6.0 * math.exp(-s / 400))
    lr = lr or (lambda i, s: 3e-4 * min(1.0, s / 100) * (0.55 + 0.45 * math.cos(math.pi * s / total_steps)))
    grad_norm = grad_norm or (lambda i, s: 0.6)
    tok_s = tok_s or (lambda i, s: 50_000.0)
    val = val or (lambda i, s, train: train + 0.1)
    t_start = now - (n_logs + 1) * dt - 1
    pid = os.getpid() if alive else dead_pid()
    manifest = {"name": name, "status": status, "pid": pid, "host": socket.gethostname(), "model": model,
                "started": _local(t_start), "total_steps": total_steps, "tokens_per_step": tokens_per_step,
                "parameters": 1_234_567,
                "sessions": [{"pid": pid, "host": socket.gethostname(), "started": _local(now if alive else t_start),
                              "resumed_from_step": None}]}
    if status != "running":
        manifest["ended"] = _local(now)
    (path / "config.yaml").write_text(f"train:\n  log_every: {log_every}\n  save_every: {save_every}\n")
    recs, log = [], []
    recs.append({"kind": "event", "step": 0, "time": round(t_start, 3), "event": "start", "total_steps": total_steps})
    ckpt_times = {}
    sampler = None
    for i in range(n_logs):
        step = (i + 1) * log_every
        t = round(t_start + (i + 1) * dt, 3)
        noise = 1 + 0.005 * rng.gauss(0, 1)
        li = loss(i, step) * noise
        rec = {"kind": "train", "step": step, "time": t, "tokens": step * tokens_per_step, "loss": li,
               "lr": lr(i, step), "grad_norm": grad_norm(i, step),
               "tok_s": tok_s(i, step) * (1 + 0.01 * rng.gauss(0, 1))}
        if nan_at is not None and i >= nan_at:
            rec["loss"] = "nan"
            recs.append(rec)
            recs.append({"kind": "event", "step": step, "time": t, "event": "diverged", "loss": "nan"})
            log.append(f"step {step}/{total_steps} loss nan")
            break
        recs.append(rec)
        log.append(f"step {step}/{total_steps} loss {li:.4f} lr {rec['lr']:.3g} tok/s {rec['tok_s']:,.0f}")
        if (i + 1) % eval_every_logs == 0:
            v = val(i, step, loss(i, step))
            recs.append({"kind": "eval", "step": step, "time": t, "tokens": step * tokens_per_step, "val_loss": v,
                         "val_ppl": math.exp(v)})
            log.append(f"eval step {step}: val_loss {v:.4f} ppl {math.exp(v):.2f}")
        if gpus is not None:
            sampler = SystemSampler(lambda s: None, gpu_source=FakeGpuSource(gpus(i)))
            stats = sampler.sample()
            stats.update(time=t, cpu_percent=35.0, ram_used=12 * GB, ram_total=64 * GB)
            recs.append({"kind": "system", "step": step, **stats})
        if checkpoints and step % save_every == 0:
            ckpt_times[step] = t
            recs.append({"kind": "event", "step": step, "time": t, "event": "checkpoint",
                         "path": f"checkpoints/step-{step:08d}"})
    if status == "finished":
        recs.append({"kind": "event", "step": recs[-1]["step"], "time": round(now, 3), "event": "finished"})
    with open(path / "metrics.jsonl", "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    (path / "train.log").write_text("".join(f"2025-01-01 00:00:00 {line}\n" for line in log))
    for step, t in ckpt_times.items():
        d = path / "checkpoints" / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * 4096)
        (d / "MANIFEST.json").write_text(json.dumps({"step": step, "files": {"model.safetensors": "0" * 64}}))
        mt = now - checkpoint_age if checkpoint_age is not None else t
        os.utime(d / "MANIFEST.json", (mt, mt))
    if status == "finished":
        (path / "final").mkdir()
    (path / "run.json").write_text(json.dumps(manifest, indent=1))
    return path


def healthy_gpus(i: int) -> list[dict]:
    return [{"util": 96, "mem_used": 14 * GB, "mem_total": 24 * GB, "temp": 68, "power_w": 380.0}] * 2


SCENARIOS = {
    # name: (write_run keyword arguments, the doctor finding it must produce)
    "healthy": ({"gpus": healthy_gpus}, None),
    "finished": ({"status": "finished", "gpus": healthy_gpus}, None),
    "nan": ({"status": "failed", "nan_at": 60}, "nan"),
    "spiky": ({"loss": lambda i, s: (2.0 + 6.0 * math.exp(-s / 400)) * (3.0 if i in (50, 75) else 1.0),
               "grad_norm": lambda i, s: 8.0 if i in (50, 75) else 0.6}, "spikes"),
    "rising": ({"loss": lambda i, s: 3.0 + 4.0 * math.exp(-s / 200) + (0.02 * (i - 60) if i > 60 else 0.0)},
               "rising"),
    "stalled": ({"loss": lambda i, s: 7.0, "lr": lambda i, s: 1e-7}, "stalled"),
    "overfitting": ({"status": "finished",
                     "val": lambda i, s, train: train + 0.1 + 0.02 * max(0, i - 40)}, "overfitting"),
    "gap": ({"val": lambda i, s, train: train + 0.7}, "gap"),
    "throughput": ({"tok_s": lambda i, s: 50_000.0 if i < 60 else 22_000.0}, "throughput"),
    "slow_gpu": ({"gpus": lambda i: [{"util": 31, "mem_used": 8 * GB, "mem_total": 24 * GB}]}, "gpu_util"),
    "gpu_memory": ({"gpus": lambda i: [{"util": 97, "mem_used": int(23.6 * GB), "mem_total": 24 * GB}]},
                   "gpu_memory"),
    "throttle": ({"gpus": lambda i: [{"util": 92, "temp": 91, "throttle": ["hw thermal"]}]}, "throttle"),
    "dead": ({"alive": False}, "dead"),
    "stale_checkpoint": ({"checkpoint_age": 3 * 3600}, "stale_checkpoint"),
    "no_checkpoint": ({"checkpoints": False}, "no_checkpoint"),
}


def make_run(root: Path, scenario: str, name: str | None = None, **overrides) -> Path:
    kwargs, _ = SCENARIOS[scenario]
    return write_run(root, name or scenario, **{**kwargs, **overrides})
