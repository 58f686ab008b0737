"""MambaSWELU end to end on this machine: training tokens/s, and generation with the recurrent cache
against recomputing the whole context for every new token.

    python bench/bench_lm.py                    # tiny and small, 2 threads, contexts 64 256 1024
    python bench/bench_lm.py --sizes mamba-swelu-tiny --threads 1 --contexts 64 1024

Prints markdown tables (docs/benchmarks.md keeps them); asserts nothing about time. Both generation
paths run in the same process on the same weights, so their ratio is what to read; the absolute
numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from _common import table

from lmlab.models import build_config, build_model
from lmlab.runtime import Runtime
from lmlab.train.objectives import Pretrain
from lmlab.train.step import apply_update, compute_gradients


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def train_tokens_per_s(model, batch: int, seq: int, reps: int) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
    batches = [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}]
    rt, objective = Runtime(device=torch.device("cpu"), precision="fp32"), Pretrain(cfg=None)

    def step():  # the trainer's step
        compute_gradients(model, objective, batches, rt, optimizer=opt)
        apply_update(opt)

    return batch * seq / median_time(step, reps)


@torch.no_grad()
def decode_seconds_per_token(model, context: int, new: int) -> float:
    """Median time of one cached decoding step after a prompt of `context` tokens (prefill not counted)."""
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    cache = model.new_cache()
    logits = model(prompt, cache=cache).logits
    times = []
    for _ in range(new):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        logits = model(tok, cache=cache).logits
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:] if len(times) > 4 else times)


@torch.no_grad()
def recompute_seconds_per_token(model, context: int, reps: int) -> float:
    """One new token without a cache costs a forward over the whole context."""
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    return median_time(lambda: model(ids).logits[:, -1].argmax(-1), reps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["mamba-swelu-tiny", "mamba-swelu-small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), fp32")

    train_rows, gen_rows = [], []
    for size in args.sizes:
        cfg = build_config(size, overrides={"max_seq_len": max(2 * max(args.contexts), args.seq)})
        model = build_model(cfg)
        n = sum(p.numel() for p in model.parameters())
        backend = model.blocks[0].mixer.scan_backend
        from lmlab.models.scan import resolve_backend

        backend = resolve_backend(backend, "cpu")
        tps = train_tokens_per_s(model, args.batch, args.seq, args.reps)
        train_rows.append([size, f"{n:,}", backend, f"{args.batch} x {args.seq}", f"{tps:,.0f}"])
        for ctx in args.contexts:
            cached = decode_seconds_per_token(model, ctx, args.new_tokens)
            full = recompute_seconds_per_token(model, ctx, max(2, args.reps // 2))
            gen_rows.append([size, ctx, f"{cached * 1e3:.2f}", f"{1 / cached:,.0f}", f"{full * 1e3:.1f}",
                             f"{1 / full:,.1f}", f"{full / cached:,.1f}x"])
    table("Training (forward + backward + AdamW step)",
          ["model", "parameters", "scan", "batch", "tokens/s"], train_rows)
    table("Generation, batch 1: recurrent cache vs recomputing the context",
          ["model", "context", "cache ms/token", "cache tokens/s", "recompute ms/token", "recompute tokens/s",
           "speed-up"], gen_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
