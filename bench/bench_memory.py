"""Peak memory of a training step with the chunked loss (lmlab.train.losses) and with the plain full-logits path.

    python bench/bench_memory.py                                   # mamba-swelu-124m, seq 1024, batch 1 and 2
    python bench/bench_memory.py --model mamba-swelu-small --batch 4 --variants off on:256 on:32 --threads 2

Each variant runs in a fresh child process (this script with --child): the model (GPT-2 vocabulary unless
--vocab), AdamW, and two of the trainer's steps (lmlab.train.step: forward, loss, backward, update) on random
tokens, in fp32 on the CPU. The child reports its peak resident set (`ru_maxrss`: the whole process, weights and
optimizer state included), the peak of the second step above the resident set before the model existed (Linux
VmHWM, reset after the first step, as lmlab.plan.measure does) and the second step's time. Beside them: the
planner's total for the same step on a CPU (`lmlab estimate --hardware cpu`), and its activation figure for a
GPU step (bf16, batch 8 unless --gpu-batch) with the loss plain and chunked. Variants: `off`, `on:<MiB>`
(train.chunked_loss=on, train.loss_chunk_mb=<MiB>), `auto:<MiB>`. glibc hands allocations above 64 KiB back
to the system (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors. Times on a shared machine
are only comparable within one run (the ratio column).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time

from _common import table

MIB = 2 ** 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) * 1024


def child(spec: dict) -> dict:
    import gc

    import torch

    from lmlab.models import registry
    from lmlab.runtime import Runtime
    from lmlab.train.losses import LossChunking
    from lmlab.train.objectives import Pretrain
    from lmlab.train.optim import param_groups
    from lmlab.train.step import apply_update, compute_gradients

    torch.set_num_threads(spec["threads"])
    gc.collect()
    base = _rss()
    torch.manual_seed(0)
    model = registry.build_model(registry.build_config(spec["model"], vocab_size=spec["vocab"])).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"] + 1), generator=gen)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    objective = Pretrain(cfg=None)
    mode, _, mb = spec["variant"].partition(":")
    objective.chunking = LossChunking(mode, float(mb or 256))
    rt = Runtime(device=torch.device("cpu"), precision="fp32")
    losses = []
    for i in range(2):
        if i == 1:
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            t0 = time.perf_counter()
        res = compute_gradients(model, objective, [batch], rt, optimizer=opt)
        apply_update(opt)
        losses.append(float(res.loss))
    seconds = time.perf_counter() - t0
    step_peak = _hwm() - base
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    head = objective.chunking.head_for(model, ids[:, :-1].numel())
    return {"maxrss": maxrss, "step_peak": step_peak, "seconds": seconds, "losses": losses,
            "chunk": objective.chunking.chunk_tokens(spec["vocab"]) if head is not None else None,
            "params": registry.count_parameters(model)}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(spec["threads"])}
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        sys.exit(f"bench_memory: the child for {spec} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mamba-swelu-124m")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--variants", nargs="+", default=["off", "on:256", "on:32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-batch", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from lmlab.plan.estimate import estimate
    from lmlab.plan.hardware import cpu_hardware

    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    rows, plan_rows = [], []
    for b in args.batch:
        plain = None
        for variant in args.variants:
            spec = dict(model=args.model, seq=args.seq, batch=b, vocab=args.vocab, variant=variant,
                        threads=args.threads)
            r = run_child(spec)
            mode, _, mb = variant.partition(":")
            est = estimate(args.model, seq_len=args.seq, micro_batch=b, precision="fp32", hardware=cpu_hardware(),
                           vocab_size=args.vocab, chunked_loss=mode, loss_chunk_mb=float(mb or 256))
            plain = plain or r
            rows.append([b, variant, f"{r['chunk']:,}" if r["chunk"] else "plain", f"{r['maxrss'] / MIB:,.0f}",
                         f"{r['step_peak'] / MIB:,.0f}", f"{(r['step_peak'] - plain['step_peak']) / MIB:+,.0f}",
                         f"{est.memory['total'] / MIB:,.0f}", f"{est.memory['total'] / r['step_peak']:.2f}",
                         f"{r['seconds']:.1f}", f"{r['seconds'] / plain['seconds']:.2f}",
                         f"{r['losses'][1]:.4f}"])
            print(f"  {b} {variant}: {r}", file=sys.stderr)
    for variant in args.variants:
        mode, _, mb = variant.partition(":")
        est = estimate(args.model, seq_len=args.seq, micro_batch=args.gpu_batch, precision="bf16", hardware="h100",
                       vocab_size=args.vocab, chunked_loss=mode, loss_chunk_mb=float(mb or 256))
        loss = next(v for k, v in est.activation_items.items() if k.startswith(("logits", "loss")))
        plan_rows.append([variant, f"{est.loss_chunk:,}" if est.loss_chunk else "plain", f"{loss / MIB:,.0f}",
                          f"{est.memory['activations'] / MIB:,.0f}", f"{est.memory['total'] / MIB:,.0f}"])
    table(f"Peak memory of a {args.model} training step, seq {args.seq}, vocab {args.vocab:,}, fp32, CPU, "
          f"{args.threads} threads (MiB)",
          ["batch", "variant", "chunk (tokens)", "process peak (ru_maxrss)", "step peak", "vs plain",
           "planner (CPU)", "planner / step peak", "step s", "time vs plain", "loss (2nd step)"], rows)
    table(f"The planner's figure for a GPU step: {args.model}, seq {args.seq}, batch {args.gpu_batch}, bf16, h100 "
          f"(MiB)", ["variant", "chunk (tokens)", "loss", "activations", "total per GPU"], plan_rows)


if __name__ == "__main__":
    main()
