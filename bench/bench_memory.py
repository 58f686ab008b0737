"""Peak memory of a training step with the chunked loss (lmlab.train.losses) and with the plain full-logits path.

    python bench/bench_memory.py                                   # mamba-swelu-124m, seq 1024, batch 1 and 2
    python bench/bench_memory.py --model mamba-swelu-small --batch 4 --variants off on:256 on:32 --threads 2

Each variant is measured by `lmlab.plan.measure.measure_training_peak` (what `lmlab estimate --measure` runs) in a
fresh process: the model (GPT-2 vocabulary unless --vocab), AdamW, and two of the trainer's steps (forward, loss,
backward, update) on random tokens, in fp32 on the CPU. It reports the process's peak resident set (`ru_maxrss`:
weights and optimizer state included), the peak of the second step above the resident set before the model
existed (Linux VmHWM, reset after the first step) and the second step's time and loss. Beside them: the
planner's total for the same step on a CPU (`lmlab estimate --hardware cpu`), and its activation figure for a
GPU step (bf16, batch 8 unless --gpu-batch) with the loss plain and chunked. Variants: `off`, `on:<MiB>`
(train.chunked_loss=on, train.loss_chunk_mb=<MiB>), `auto:<MiB>`. glibc hands allocations above 64 KiB back
to the system (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors. Times on a shared machine
are only comparable within one run (the ratio column).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from _common import table

MIB = 2 ** 20


def measure(model: str, seq: int, batch: int, vocab: int, variant: str, threads: int) -> dict:
    from lmlab.plan.measure import measure_training_peak
    from lmlab.train.losses import FASTER_CHUNKED_ON, LossChunking

    mode, _, mb = variant.partition(":")
    r = measure_training_peak(model, seq_len=seq, micro_batch=batch, vocab_size=vocab, threads=threads,
                              chunked_loss=mode, loss_chunk_mb=float(mb or 256))
    chunking = LossChunking(mode, float(mb or 256))
    chunked = mode == "on" or (mode == "auto" and ("cpu" in FASTER_CHUNKED_ON or chunking.wanted(batch * seq, vocab)))
    return {"maxrss": r["process_peak_bytes"], "step_peak": r["peak_bytes"], "seconds": r["seconds"],
            "loss": r["loss"], "chunk": chunking.chunk_tokens(vocab) if chunked else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mamba-swelu-124m")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--variants", nargs="+", default=["off", "on:256", "on:32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-batch", type=int, default=8)
    args = ap.parse_args()
    from lmlab.plan.estimate import estimate
    from lmlab.plan.hardware import cpu_hardware

    print("command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    rows, plan_rows = [], []
    for b in args.batch:
        plain = None
        for variant in args.variants:
            r = measure(args.model, args.seq, b, args.vocab, variant, args.threads)
            mode, _, mb = variant.partition(":")
            est = estimate(args.model, seq_len=args.seq, micro_batch=b, precision="fp32", hardware=cpu_hardware(),
                           vocab_size=args.vocab, chunked_loss=mode, loss_chunk_mb=float(mb or 256))
            plain = plain or r
            rows.append([b, variant, f"{r['chunk']:,}" if r["chunk"] else "plain", f"{r['maxrss'] / MIB:,.0f}",
                         f"{r['step_peak'] / MIB:,.0f}", f"{(r['step_peak'] - plain['step_peak']) / MIB:+,.0f}",
                         f"{est.memory['total'] / MIB:,.0f}", f"{est.memory['total'] / r['step_peak']:.2f}",
                         f"{r['seconds']:.1f}", f"{r['seconds'] / plain['seconds']:.2f}",
                         f"{r['loss']:.4f}"])
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
