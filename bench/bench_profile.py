"""Where a training step's time goes, against what the matmuls alone would cost on this machine.

    python bench/bench_profile.py                     # the bar: mamba-swelu-small, 4 × 256, fp32, 2 threads
    python bench/bench_profile.py --precision bf16    # the same step under CPU bf16 autocast
    python bench/bench_profile.py --model llama-small --seq 1024 --batch 1
    python bench/bench_profile.py --compare           # fp32 and bf16, fused and reference CPU paths

The matmul-bound limit is the step's Linear FLOPs (6 · N_linear per token: forward, and the two matmuls of the
backward; the LM head counts, the embedding lookup does not) at the fp32 `torch.mm` rate measured in the same
process on a 2048² product (the better of a measurement before the steps and one after), so the "% of limit"
column reads the same on any machine. The per-operation table
is torch.profiler's self-CPU time grouped into the step's parts (matmuls, scan, SWELU, conv, gates, norms,
embedding, loss, optimizer, the rest); its total is a little above the unprofiled step time. Prints markdown
tables (docs/benchmarks.md keeps them); asserts nothing about time.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections import defaultdict

import torch
from _common import table
from torch import nn

from lmlab.config import TrainConfig
from lmlab.models import build_config, build_model

try:
    from lmlab.models import kernels_cpu
except ImportError:  # an lmlab from before the fused CPU kernels (to measure the step it had)
    kernels_cpu = None
from lmlab.runtime import Runtime
from lmlab.train.optim import make_optimizer_from
from lmlab.train.step import apply_update, compute_gradients

# aten op name → the step's part it belongs to (first match wins); the rest is "other"
PARTS = [
    ("optimizer", ("_foreach_", "_fused_adam", "adamw", "clip_grad", "norm_except")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "_log_softmax", "_LinearCrossEntropySum",
              "_LinearTokenLogps", "logsumexp")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkl", "mkldnn")),
    ("scan", ("selective_scan", "_CppScan", "_CppProjectedScan", "_ScanFunction")),
    ("swelu", ("swelu", "_SWELU")),
    ("conv", ("conv", "lmlab::causal_conv", "_CausalConv")),
    ("norm", ("layer_norm", "_LayerNorm", "rms_norm", "native_layer_norm")),
    ("embedding", ("embedding",)),
    ("gates (silu/softplus/exp)", ("silu", "softplus", "aten::exp", "sigmoid")),
    ("copies (copy/cat/contiguous/transpose)", ("copy_", "aten::cat", "contiguous", "clone", "aten::to",
                                                 "_to_copy", "transpose", "permute", "aten::t", "split",
                                                 "narrow", "slice", "view", "reshape", "expand")),
    ("elementwise (add/mul/sum/fill)", ("aten::add", "aten::mul", "aten::sum", "aten::sub", "aten::div",
                                        "aten::fill_", "aten::zero", "aten::ones", "aten::zeros", "aten::where",
                                        "aten::neg", "aten::sign", "aten::abs", "aten::pow", "aten::clamp",
                                        "aten::empty", "aten::masked", "aten::rsub", "aten::mean")),
]


def part_of(name: str) -> str:
    low = name.lower()
    for part, keys in PARTS:
        if any(k.lower() in low for k in keys):
            return part
    return "other"


def mm_rate(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n × n × n torch.mm in `dtype`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)  # the best of `reps`: the rate the machine reaches


def linear_params(model: nn.Module) -> int:
    """Parameters that take part in a matmul: every Linear weight (the LM head too, tied or not)."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    head = model.get_output_embeddings()
    if head is not None and not isinstance(head, nn.Linear):
        n += head.weight.numel()
    return n


class Step:
    """One optimizer step of next-token training through the trainer's own step (`compute_gradients`,
    `apply_update`): forward, loss (the pretraining objective's, chunked or plain as `chunked_loss` says),
    backward, clipping to 1.0, AdamW, for one micro-batch on one process."""

    def __init__(self, model, batch: int, seq: int, precision: str, chunked_loss: str = "auto", seed: int = 0):
        from lmlab.train.objectives import Pretrain

        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g)
        self.model, self.batch = model, {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
        self.opt = make_optimizer_from(model, TrainConfig(), torch.device("cpu"))  # the trainer's AdamW
        self.precision = precision
        self.rt = Runtime(device=torch.device("cpu"), precision=precision)  # its autocast: bf16 on CPU
        self.objective = Pretrain(None)
        try:
            from lmlab.train.losses import LossChunking

            self.objective.chunking = LossChunking(chunked_loss)
        except ImportError:  # an lmlab from before the chunked loss
            pass

    def __call__(self) -> float:
        r = compute_gradients(self.model, self.objective, [self.batch], self.rt, optimizer=self.opt, grad_clip=1.0)
        with torch.profiler.record_function("adamw"):
            apply_update(self.opt)  # with the clip: the strategy may fold it into the fused AdamW step
        return float(r.loss)


def profile_parts(step: Step) -> dict[str, float]:
    """Seconds per step of each part, from torch.profiler's self-CPU times over two steps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    parts = defaultdict(float)
    for e in prof.key_averages():
        parts[part_of(e.key)] += e.self_cpu_time_total / 2 / 1e6
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mamba-swelu-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--compare", action="store_true",
                    help="fp32 and bf16, each with the fused CPU kernels and with the torch reference paths, "
                         "their steps interleaved (no profile table)")
    ap.add_argument("--reference", action="store_true", help="the torch reference paths instead of the fused ones")
    ap.add_argument("--chunked-loss", choices=("auto", "on", "off"), default="auto",
                    help="train.chunked_loss for the step (auto: the trainer's default)")
    ap.add_argument("--malloc-default", action="store_true",
                    help="leave glibc's malloc as it is (the trainer keeps freed blocks: runtime.keep_freed_memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.malloc_default:
        try:
            from lmlab.runtime import keep_freed_memory
        except ImportError:  # an lmlab from before it
            pass
        else:
            keep_freed_memory()  # as setup_runtime does for CPU training

    variants = ([(p, f) for p in ("fp32", "bf16") for f in (False, True)] if args.compare
                else [(args.precision, not args.reference)])
    steps = []
    for precision, _ in variants:
        torch.manual_seed(0)
        model = build_model(build_config(args.model)).train()
        steps.append(Step(model, args.batch, args.seq, precision, args.chunked_loss))
    rates_before = mm_rate(torch.float32), mm_rate(torch.bfloat16)
    times = [[] for _ in variants]
    for rep in range(args.reps + 2):  # interleaved, so a busy moment slows every variant alike
        for i, (_, fused) in enumerate(variants):
            with contextlib.nullcontext() if fused else kernels_cpu.reference():
                t0 = time.perf_counter()
                steps[i]()
                if rep >= 2:  # two warm-up steps each
                    times[i].append(time.perf_counter() - t0)
    # the machine's rate: the better of a measurement before the steps and one after them (a busy moment, or the
    # clock after the steps' vector work, can lower either by 10 %)
    fp32_rate, bf16_rate = max(rates_before[0], mm_rate(torch.float32)), max(rates_before[1], mm_rate(torch.bfloat16))
    tokens = args.batch * args.seq
    n_lin = linear_params(steps[0].model)
    limit = fp32_rate / (6 * n_lin)  # tokens/s if the step were its fp32 matmuls alone
    rows = []
    for (precision, fused), ts in zip(variants, times):
        t = min(ts)
        rows.append([args.model, precision, "fused" if fused else "reference", f"{args.batch} × {args.seq}",
                     f"{n_lin / 1e6:.2f}M", f"{t * 1e3:.0f}", f"{tokens / t:,.0f}", f"{limit:,.0f}",
                     f"{100 * tokens / t / limit:.0f} %"])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
          f"2048² torch.mm: fp32 {fp32_rate / 1e9:.0f} GFLOP/s, bf16 {bf16_rate / 1e9:.0f} GFLOP/s "
          f"({bf16_rate / fp32_rate:.2f}×); best of {args.reps} steps\n")
    table("Training step against the fp32 matmul-bound limit",
          ["model", "precision", "CPU paths", "batch", "Linear params", "step ms", "tokens/s", "limit tokens/s",
           "of limit"], rows)
    if not args.compare:
        precision, fused = variants[0]
        with contextlib.nullcontext() if fused else kernels_cpu.reference():
            parts = profile_parts(steps[0])
        total = sum(parts.values())
        mm_ideal = 6 * n_lin * tokens / fp32_rate
        parts_rows = [[name, f"{sec * 1e3:.1f}", f"{100 * sec / total:.1f} %"]
                      for name, sec in sorted(parts.items(), key=lambda kv: -kv[1])]
        parts_rows.append(["(total, profiled)", f"{total * 1e3:.1f}", "100 %"])
        parts_rows.append(["(the Linear FLOPs at the fp32 mm rate)", f"{mm_ideal * 1e3:.1f}",
                           f"{100 * mm_ideal / total:.1f} %"])
        table(f"Where the step's time goes ({args.model}, {precision}, {'fused' if fused else 'reference'} CPU "
              f"paths, torch.profiler self-CPU, ms per step)", ["part", "ms", "share"], parts_rows)


if __name__ == "__main__":
    main()
