"""Selective-scan benchmarks: training speed, scan vs rest of the mixer, memory, cached generation, GPU.

    python bench/bench_scan.py             # everything that runs here (HF baseline at the real size: minutes)
    python bench/bench_scan.py --quick     # HF baseline on a shorter sequence, extrapolated (stated)
    python bench/bench_scan.py --sections train,mixer
    python bench/bench_scan.py --sections train,mixer --backends cpu --threads 2   # one backend, before/after

Prints tables; asserts nothing about time. CPU sections use 2 threads (override with --threads).
The GPU section runs only when CUDA is available.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from _common import table

from lmlab.models import MambaSWELUConfig, MambaSWELUForCausalLM
from lmlab.models import scan as scan_lib
from lmlab.models.mamba import MambaMixer

SMALL = dict(vocab_size=8192, d_model=256, n_layers=4, dense_hidden=512, max_seq_len=1024)


def timed(fn, reps: int, warmup: int = 1, sync=lambda: None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def train_step_fn(model, ids, opt, autocast_device=None):
    def step():
        if autocast_device:
            with torch.autocast(autocast_device, dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
        else:
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_mamba(vocab: int, hidden: int, layers: int):
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=16)
    return MambaForCausalLM(cfg)


# ------------------------------------------------------------------------------------------ sections
def section_train(args) -> None:
    """Full training step (forward, backward, AdamW) of the small config, batch 4 × 256, fp32."""
    b, l = 4, 256
    torch.manual_seed(0)
    ids = torch.randint(0, SMALL["vocab_size"], (b, l))
    rows = []
    results = {}
    for backend in [x for x in ("ref", "chunked", "cpu") if x in args.backends]:
        model = MambaSWELUForCausalLM(MambaSWELUConfig(**SMALL, scan_backend=backend))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        reps, warm = (1, 0) if backend == "ref" else (args.reps, 1)
        ts = timed(train_step_fn(model, ids, opt), reps, warm)
        results[backend] = b * l / min(ts)
        rows.append([backend, f"{b}×{l}", f"{min(ts):.3f}", f"{statistics.median(ts):.3f}",
                     f"{results[backend]:,.0f}"])
    if "hf" not in args.backends:
        table("Training step, CPU fp32, vocab 8192, d 256, 4 layers (steps/s as tokens/s)",
              ["scan backend", "batch", "best s/step", "median s/step", "tokens/s"], rows)
        return
    # transformers' Mamba (no CUDA kernels: its slow path), same sizes
    hl = 64 if args.quick else l
    model = hf_mamba(SMALL["vocab_size"], SMALL["d_model"], SMALL["n_layers"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = timed(train_step_fn(model, ids[:, :hl], opt), 1, 0)[0]
    t_full = t * l / hl  # its time is linear in the sequence length (a loop over time)
    results["hf"] = b * l / t_full
    note = f"measured at {b}×{hl}, ×{l // hl} extrapolated (--quick)" if hl != l else "measured"
    rows.append(["transformers MambaForCausalLM", f"{b}×{hl}", f"{t_full:.1f}", "-",
                 f"{results['hf']:,.1f} ({note})"])
    table("Training step, CPU fp32, vocab 8192, d 256, 4 layers (steps/s as tokens/s)",
          ["scan backend", "batch", "best s/step", "median s/step", "tokens/s"], rows)
    print(f"\nfast (cpu) / transformers: {results['cpu'] / results['hf']:,.0f}×;  "
          f"cpu / ref: {results['cpu'] / results['ref']:,.1f}×")


def _stub_scan(u, delta, A, B, C, D=None, z=None, **k):
    """Stands in for the scan to time / measure the rest of the mixer: same inputs used, no recurrence."""
    return u * D[None, :, None] + (delta + B.sum(1, keepdim=True) + C.sum(1, keepdim=True)) * 0.0 + z


def _mixer_times(backend: str, x: torch.Tensor, reps: int) -> tuple[float, float, float]:
    """(scan fwd+bwd, rest of the mixer fwd+bwd, whole mixer fwd+bwd) in seconds, best of `reps`."""
    mixer = MambaMixer(x.shape[-1], scan_backend=backend)
    captured = {}
    real = scan_lib.selective_scan

    def capture(*a, **k):
        captured.update(args=a, kwargs=k)
        return real(*a, **k)

    scan_lib.selective_scan = capture
    try:
        mixer(x)
    finally:
        scan_lib.selective_scan = real

    def leaf(t):
        return t.detach().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t

    scan_args = [leaf(t) for t in captured["args"]]
    scan_kwargs = {k: leaf(v) for k, v in captured["kwargs"].items()}
    t_full = min(timed(lambda: mixer(x).sum().backward(), reps))
    t_scan = min(timed(lambda: scan_lib.selective_scan(*scan_args, **scan_kwargs).sum().backward(), reps))
    scan_lib.selective_scan = _stub_scan
    try:
        t_rest = min(timed(lambda: mixer(x).sum().backward(), reps))
    finally:
        scan_lib.selective_scan = real
    return t_scan, t_rest, t_full


def section_mixer(args) -> None:
    """One MambaMixer at d_model 512 (d_inner 1024), batch 4 × 1024: scan fwd+bwd vs everything else."""
    b, l, d = 4, 1024, 512
    torch.manual_seed(0)
    x = torch.randn(b, l, d, requires_grad=True)
    rows = []
    for backend in [x for x in ("cpu", "chunked") if x in args.backends]:
        t_scan, t_rest, t_full = _mixer_times(backend, x, args.reps)
        rows.append([backend, f"{t_scan * 1e3:.0f}", f"{t_rest * 1e3:.0f}", f"{t_full * 1e3:.0f}",
                     f"{t_scan / t_rest:.2f}"])
    table(f"Mixer forward+backward, d_model {d} (d_inner {2 * d}), batch {b}×{l}, CPU fp32 (ms)",
          ["scan backend", "scan fwd+bwd", "rest of mixer (proj + conv + gates)", "whole mixer",
           "scan / rest"], rows)


def _memory_child(backend: str) -> None:
    torch.set_num_threads(2)
    b, l, d = 4, 1024, 512
    torch.manual_seed(0)
    mixer = MambaMixer(d, scan_backend="cpu" if backend == "none" else backend)
    x = torch.randn(b, l, d, requires_grad=True)
    if backend == "none":  # the rest of the mixer alone: the scan replaced by a cheap stub
        scan_lib.selective_scan = _stub_scan
    if backend == "cpu":  # build / load the kernel before the baseline
        scan_lib.resolve_backend("cpu", "cpu")
        from lmlab.models.scan_cpu import cpu_kernel_available

        cpu_kernel_available()
    before = _rss_now()
    t0 = time.perf_counter()
    mixer(x).sum().backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"backend": backend, "before": before, "peak": peak, "seconds": dt}))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def section_memory(args) -> None:
    """Peak memory of one mixer's fwd+bwd at batch 4 × 1024, d_model 512, each backend in a fresh process."""
    b, l, d, n = 4, 1024, 1024, 16
    bldn = b * l * d * n * 4
    rows, base = [], None
    for backend in ["none", "cpu", "chunked", "ref"]:
        res = subprocess.run([sys.executable, __file__, "--memory-child", backend],
                             capture_output=True, text=True)
        if res.returncode != 0:
            rows.append([backend, "failed: " + res.stderr.strip()[-200:], "", "", ""])
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        extra = r["peak"] - r["before"]
        if backend == "none":
            base = extra
            rows.append(["(no scan: stub)", f"{extra / 2**20:,.0f}", "-", "-", f"{r['seconds']:.1f}"])
            continue
        rows.append([backend, f"{extra / 2**20:,.0f}", f"{(extra - base) / 2**20:,.0f}",
                     f"{(extra - base) / bldn:.2f}", f"{r['seconds']:.1f}"])
    table(f"Memory, one mixer fwd+bwd, batch {b}×{l}, d_model 512 (d_inner {d}, n {n}), fp32; "
          f"one (B,L,D,N) fp32 tensor = {bldn / 2**20:,.0f} MiB",
          ["scan backend", "peak RSS − baseline, MiB", "scan's share (− stub row), MiB", "in (B,L,D,N) units",
           "fwd+bwd s"], rows)


def section_generate(args) -> None:
    """Per-token decoding time with the recurrent cache vs recomputing the whole context, batch 1."""
    torch.manual_seed(0)
    cfg = MambaSWELUConfig(**{**SMALL, "max_seq_len": 4096})
    model = MambaSWELUForCausalLM(cfg).eval()
    rows = []
    steps = 16
    with torch.no_grad():
        for ctx in [64, 128, 256, 512, 1024, 2048]:
            prompt = torch.randint(0, cfg.vocab_size, (1, ctx))
            cache = model.new_cache()
            logits = model(prompt, cache=cache).logits
            nxt = logits[:, -1].argmax(-1)
            model(nxt[:, None], cache=cache)  # warm
            t0 = time.perf_counter()
            for _ in range(steps):
                nxt = model(nxt[:, None], cache=cache).logits[:, -1].argmax(-1)
            per_tok = (time.perf_counter() - t0) / steps
            full = min(timed(lambda p=prompt: model(p).logits[:, -1].argmax(-1), 2 if ctx <= 512 else 1, 0))
            rows.append([ctx, f"{per_tok * 1e3:.2f}", f"{full * 1e3:.1f}", f"{full / per_tok:.0f}×"])
    table("Generation, small config, batch 1, CPU fp32, scan backend auto",
          ["context", "cached ms/token", "full recompute ms/token", "speed-up"], rows)


def section_gpu(args) -> None:
    if not torch.cuda.is_available():
        print("\n### GPU\n\nskipped: no CUDA device")
        return
    from lmlab.models.registry import build_config, count_parameters

    dev = "cuda"
    sync = torch.cuda.synchronize
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = min(timed(lambda: a @ a, 10, 3, sync))
    peak = 2 * 8192**3 / t
    b, l = args.gpu_batch, 1024
    rows = []
    cfg = build_config("mamba-swelu-124m")
    for backend in [scan_lib.resolve_backend("auto", dev), "triton", "chunked"]:
        if any(r[0] == backend for r in rows) or backend not in scan_lib.available_backends(dev):
            continue
        cfg.scan_backend = backend
        model = MambaSWELUForCausalLM(cfg).to(dev)
        params = count_parameters(model)
        ids = torch.randint(0, cfg.vocab_size, (b, l), device=dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        step = train_step_fn(model, ids, opt, "cuda")
        ts = timed(step, args.reps, 2, sync)
        tps = b * l / min(ts)
        rows.append([backend, f"{params / 1e6:.1f}M", f"{min(ts) * 1e3:.0f}", f"{tps:,.0f}",
                     f"{6 * params * tps / peak:.1%}"])
        if backend == rows[0][0]:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                sync()
            prof_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        del model, opt
        torch.cuda.empty_cache()
    # transformers' Mamba of about the same size (hidden 1024, layers chosen to match the parameter count)
    with torch.device("meta"):
        target = count_parameters(MambaSWELUForCausalLM(cfg))
        layers = min(range(4, 24),
                     key=lambda n: abs(count_parameters(hf_mamba(cfg.vocab_size, 1024, n)) - target))
    model = hf_mamba(cfg.vocab_size, 1024, layers).to(dev)
    params = count_parameters(model)
    ids = torch.randint(0, cfg.vocab_size, (b, l), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ts = timed(train_step_fn(model, ids, opt, "cuda"), 2, 1, sync)
    tps = b * l / min(ts)
    rows.append([f"transformers MambaForCausalLM ({layers} layers)", f"{params / 1e6:.1f}M",
                 f"{min(ts) * 1e3:.0f}", f"{tps:,.0f}", f"{6 * params * tps / peak:.1%}"])
    table(f"GPU training step, mamba-swelu-124m, bf16 autocast, batch {b}×{l} "
          f"({torch.cuda.get_device_name()}, measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s)",
          ["scan backend", "params", "ms/step", "tokens/s", "MFU"], rows)
    print("\nProfile of one step (top 15 by CUDA time):\n")
    print(prof_table)


SECTIONS = {"train": section_train, "mixer": section_mixer, "memory": section_memory,
            "generate": section_generate, "gpu": section_gpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="HF baseline on 64 tokens, extrapolated ×4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--backends", default="ref,chunked,cpu,hf",
                   help="comma list of the backends the train and mixer sections time (hf: transformers' Mamba)")
    p.add_argument("--gpu-batch", type=int, default=8)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.backends = {x.strip() for x in args.backends.split(",")}
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"# bench_scan  {time.strftime('%Y-%m-%d')}  torch {torch.__version__}  {cpu}, "
          f"{torch.get_num_threads()} threads  auto(cpu) = {scan_lib.resolve_backend('auto', 'cpu')}")
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        SECTIONS[name.strip()](args)
        print(f"\n({name}: {time.perf_counter() - t0:.0f} s; load average after: "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
