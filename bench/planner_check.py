"""The planner's memory model against measured peaks: one real training step per configuration.

    python bench/planner_check.py            # CPU: fresh processes, peak resident memory
    python bench/planner_check.py --cuda     # the local GPU: torch.cuda.max_memory_allocated, bf16

Prints a markdown table (estimate / measured); asserts nothing. tests/test_estimate.py holds three
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

CPU_CASES = [
    ("mamba-swelu-tiny", 256, 8), ("mamba-swelu-tiny", 512, 16), ("mamba-swelu-small", 256, 8),
    ("mamba-swelu-small", 1024, 8), ("llama-tiny", 512, 4), ("llama-small", 1024, 8),
    ("inl-tiny", 256, 8), ("inl-tiny", 512, 16),
]
CUDA_CASES = [
    ("mamba-swelu-small", 1024, 16), ("mamba-swelu-124m", 1024, 8), ("llama-124m", 1024, 8),
    ("inl-small", 1024, 4), ("inl-medium", 1024, 2), ("llama-350m", 1024, 8),
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
    print("| model | seq × batch | estimate MiB | measured MiB | estimate / measured | activations model |")
    print("|---|---|---:|---:|---:|---|")
    for name, seq, batch in CUDA_CASES if args.cuda else CPU_CASES:
        m = measure_training_peak(name, seq_len=seq, micro_batch=batch, precision=precision, device=device,
                                  threads=args.threads)
        e = estimate(name, seq_len=seq, micro_batch=batch, precision=precision, hardware=hw)
        est = e.memory["total"] - (e.memory["overhead"] if args.cuda else 0)  # CUDA context is outside the allocator
        print(f"| {name} | {seq} × {batch} | {mib(est)} | {mib(m['peak_bytes'])} | {est / m['peak_bytes']:.2f} | "
              f"{e.activation_model} |", flush=True)


if __name__ == "__main__":
    main()
