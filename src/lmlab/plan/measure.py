"""Measure what one training step really takes, to hold the planner's memory model to the truth.

    measure_training_peak("mamba-swelu-small", seq_len=256, micro_batch=8)          # CPU, fresh process
    -> {"device": "cpu", "state_bytes": ..., "peak_bytes": ..., "params": ..., "seconds": ..., "loss": ...,
        "process_peak_bytes": ...}                                                   (the last on CPU only)

The step is the trainer's: logits, fp32 cross-entropy (chunked as train.chunked_loss and train.loss_chunk_mb
say, lmlab.train.losses), backward, AdamW (decay groups as in training),
gradients freed with `zero_grad(set_to_none=True)`. A first step allocates the optimizer states; the
second step is measured.

CPU: a fresh Python process with glibc told to hand every allocation above 64 KiB straight back to
the system (MALLOC_MMAP_THRESHOLD_), so the resident set follows live tensors; the peak resident set
of the second step (Linux `VmHWM`, reset through /proc/self/clear_refs) minus the resident set before
the model existed is the step's peak. CUDA: `torch.cuda.max_memory_allocated` over the second step
(the CUDA context and cuBLAS workspace are outside it; the planner's `overhead` line covers them).
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

from ..errors import ConfigError, LmlabError

_MMAP_THRESHOLD = "65536"


def measure_training_peak(model: str, *, seq_len: int, micro_batch: int, precision: str = "fp32",
                          device: str = "cpu", vocab_size: int | None = None,
                          overrides: dict[str, Any] | None = None, checkpointing: bool = False,
                          threads: int = 2, timeout: float = 900, trust_remote_code: bool = False,
                          chunked_loss: str = "auto", loss_chunk_mb: float = 256) -> dict[str, Any]:
    """Run two training steps of `model` (any name `lmlab estimate` takes) and report the second's peak."""
    spec = dict(model=model, seq_len=seq_len, micro_batch=micro_batch, precision=precision, device=device,
                vocab_size=vocab_size, overrides=overrides or {}, checkpointing=checkpointing, threads=threads,
                trust_remote_code=trust_remote_code, chunked_loss=chunked_loss, loss_chunk_mb=loss_chunk_mb)
    if device != "cpu":
        return _measure(spec)
    if not os.path.exists("/proc/self/clear_refs"):
        raise LmlabError("measuring CPU memory needs Linux (/proc/self/clear_refs)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": _MMAP_THRESHOLD, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-m", "lmlab.plan.measure", json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LmlabError(f"measuring {model}: the measuring process failed: {last}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) * 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..models import registry
    from ..runtime import Runtime
    from ..train.losses import LossChunking
    from ..train.objectives import Pretrain
    from ..train.optim import param_groups
    from ..train.step import apply_update, compute_gradients
    from .arch import load_model_config, meta_model

    dev = torch.device(spec["device"])
    cpu = dev.type == "cpu"
    if cpu:
        torch.set_num_threads(spec["threads"])
    precision = spec["precision"]
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision: measuring runs full training in fp32, bf16 or fp16, not {precision!r}")
    trust = bool(spec.get("trust_remote_code"))
    cfg, _, _ = load_model_config(spec["model"], spec["vocab_size"], spec["overrides"] or None, trust)
    torch.manual_seed(0)
    gc.collect()
    if cpu:
        base = _rss()
    else:
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
    if any(isinstance(cfg, f.config_cls) for f in registry.FAMILIES.values()):
        model = registry.build_model(cfg).to(dev)
    else:
        meta = meta_model(cfg, trust)  # the same class the planner analysed, now for real
        model = type(meta)(cfg).to(dev)
        del meta
    model.train()
    if spec["checkpointing"]:
        from ..train.setup import enable_activation_checkpointing

        enable_activation_checkpointing(model, spec["model"])  # as the trainer does it
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (spec["micro_batch"], spec["seq_len"] + 1), generator=gen).to(dev)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    rt, objective = Runtime(device=dev, precision=precision), Pretrain(cfg=None)
    objective.chunking = LossChunking(spec.get("chunked_loss", "auto"), spec.get("loss_chunk_mb", 256))

    def step() -> float:  # the trainer's step
        res = compute_gradients(model, objective, [batch], rt, optimizer=opt)
        apply_update(opt)
        return float(res.loss)

    step()  # allocates AdamW's states
    gc.collect()
    if cpu:
        state = _rss() - base
        _reset_hwm()
    else:
        torch.cuda.synchronize(dev)
        state = torch.cuda.memory_allocated(dev) - base
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    loss = step()
    if cpu:
        peak = _hwm() - base
    else:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    seconds = time.perf_counter() - t0
    out = {"device": str(dev), "params": registry.count_parameters(model), "vocab_size": V,
           "state_bytes": int(state), "peak_bytes": int(peak), "seconds": seconds, "loss": loss}
    if cpu:  # the whole process's peak resident set (weights and optimizer state included); KiB on Linux
        import resource

        out["process_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main() -> int:
    try:
        print(json.dumps(_measure(json.loads(sys.argv[1]))))
    except LmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
