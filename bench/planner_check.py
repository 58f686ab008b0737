"""The planner's memory model against measured peaks: one real training step per configuration.

    python bench/planner_check.py            # CPU: fresh processes, peak resident memory
    python bench/planner_check.py --cuda     # the local GPU: torch.cuda.max_memory_allocated, bf16

Prints a markdown table (estimate / measured); asserts nothing. tests/test_estimate.py holds four
of the CPU rows to within 15 %.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lmlab.plan.estimate import estimate
from lmlab.plan.hardware import cpu_hardware, hardware_from_device
from lmlab.plan.measure import measure_training_peak

# (model, sequence, batch, activation checkpointing)
CPU_CASES = [
    ("mamba-swelu-tiny", 256, 8, False), ("mamba-swelu-tiny", 512, 16, False), ("mamba-swelu-small", 256, 8, False),
    ("mamba-swelu-small", 1024, 8, False), ("llama-tiny", 512, 4, False), ("llama-small", 1024, 8, False),
    ("inl-tiny", 256, 8, False), ("inl-tiny", 512, 16, False),
    ("mamba-swelu-tiny", 512, 16, True), ("mamba-swelu-small", 1024, 8, True), ("llama-small", 1024, 8, True),
    ("inl-tiny", 512, 16, True),
]
CUDA_CASES = [
    ("mamba-swelu-small", 1024, 16, False), ("mamba-swelu-124m", 1024, 8, False), ("llama-124m", 1024, 8, False),
    ("inl-small", 1024, 4, False), ("inl-medium", 1024, 2, False), ("llama-350m", 1024, 8, False),
    ("mamba-swelu-124m", 1024, 8, True), ("inl-medium", 1024, 2, True),
]


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true", help="measure on the local GPU (bf16) instead of the CPU")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.cuda else "cpu"
    if args.cuda and not torch.cuda.is_available():
        raise SystemExit("--cuda: no CUDA device here")
    hw = hardware_from_device() if args.cuda else cpu_hardware()
    precision = "bf16" if args.cuda else "fp32"
    where = torch.cuda.get_device_name() if args.cuda else f"{platform.processor() or platform.machine()}, " \
                                                            f"{args.threads} threads"
    print(f"planner check on {where}, {precision}, {time.strftime('%Y-%m-%d')}\n")
    print("| model | seq × batch | checkpointing | estimate MiB | measured MiB | estimate / measured "
          "| activations model |")
    print("|---|---|---|---:|---:|---:|---|")
    for name, seq, batch, ckpt in CUDA_CASES if args.cuda else CPU_CASES:
        m = measure_training_peak(name, seq_len=seq, micro_batch=batch, precision=precision, device=device,
                                  threads=args.threads, checkpointing=ckpt)
        e = estimate(name, seq_len=seq, micro_batch=batch, precision=precision, hardware=hw, checkpointing=ckpt)
        est = e.memory["total"] - (e.memory["overhead"] if args.cuda else 0)  # CUDA context is outside the allocator
        ck = "yes" if ckpt else "no"
        peak = m["peak_bytes"]
        print(f"| {name} | {seq} × {batch} | {ck} | {mib(est)} | {mib(peak)} | {est / peak:.2f} | "
              f"{e.activation_model} |", flush=True)


if __name__ == "__main__":
    main()
