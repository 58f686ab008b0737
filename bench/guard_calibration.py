"""Calibrate the step guard's spike rule: false positives on healthy runs, detection of injected spikes.

    python bench/guard_calibration.py [--steps 400] [--seeds 1] [--families mamba-swelu,llama,inl] [--traces DIR]

1. Healthy runs (train.guard=off, log_every=1) of the smallest model of each family on the stdlib corpus
   (CPU, small batch) record every step's loss and gradient norm (metrics.jsonl). Traces are cached in
   --traces; a second call only replays them.
2. Each rule is replayed on every trace as the guard would run it (a flagged step under `skip` does not enter
   the window of rules that exclude bad steps): its flags on a healthy trace are false positives.
3. Injected spikes: at 30 random steps after the guard's warm-up of each trace, one at a time, the step's
   loss and gradient norm are multiplied by a factor (a bad batch: both rise), or only the gradient norm
   (an outlier gradient that clipping bounds). Detection is the share of injected steps the rule flags.

The rules:
    lmlab (before)  loss or grad norm > mean + 6σ (σ ≥ 1 % of the mean) of the last 128 applied steps, after 64
    OLMo-core       |z| > 6 of loss or grad norm (sample σ) over the last 128 steps, flagged ones included,
                    after 64 (olmo_core.optim.SkipStepOptimizer.get_step_factor)
    llm-foundry     loss ≥ 2 × the window mean for 5 steps in a row (flags the 5th; its loss-spike callback)
    lmlab (now)     lmlab.train.guard.Guard as it is in this tree (train.grad_clip=1: a gradient-norm spike
                    counts only with the loss above mean + 3σ too)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
from collections import deque
from pathlib import Path

from _common import table

FAMILIES = {"mamba-swelu": "mamba-swelu-tiny", "llama": "llama-tiny", "inl": "inl-tiny"}
FACTORS = (1.5, 3.0, 10.0)


# ------------------------------------------------------------------------------------------------- traces
def record(model: str, seed: int, steps: int, out: Path, tok: Path) -> list[tuple[float, float]]:
    from lmlab.config import load_config
    from lmlab.train.loop import train

    cfg = load_config(None, [
        f"model.name={model}", "data.source=stdlib", f"data.tokenizer={tok}", "data.seq_len=128",
        "data.max_docs=2000", "train.batch_size=8", f"train.max_steps={steps}", "train.lr=3e-3",
        "train.warmup_steps=40", "train.guard=off", "train.log_every=1", f"train.eval_every={steps}",
        "train.eval_batches=2", f"train.save_every={steps}", "train.sample_tokens=2", "train.progress=false",
        f"train.seed={seed}", "train.threads=1", "train.system_every=0", f"run.out_dir={out}",
        f"run.name={model}-{seed}-{steps}"])
    run = train(cfg, echo=lambda *a, **k: None)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in recs if r["kind"] == "train"]


# -------------------------------------------------------------------------------------------------- rules
def before_rule(trace, window=128, warmup=64, sigma=6.0):
    losses, norms, flags = deque(maxlen=window), deque(maxlen=window), []
    for loss, norm in trace:
        bad = False
        if len(losses) >= warmup:
            for v, h in ((loss, losses), (norm, norms)):
                m = sum(h) / len(h)
                s = math.sqrt(sum((x - m) ** 2 for x in h) / len(h))
                bad |= v > m + sigma * max(s, 0.01 * abs(m))
        flags.append(bad)
        if not bad:
            losses.append(loss)
            norms.append(norm)
    return flags


def olmo_rule(trace, window=128, sigma=6.0):
    losses, norms, flags = deque(maxlen=window + 1), deque(maxlen=window + 1), []
    for loss, norm in trace:
        losses.append(loss)
        norms.append(norm)
        bad = False
        if len(losses) >= max(20, window // 2):
            for h in (losses, norms):
                prev = list(h)[:-1]
                m, s = statistics.fmean(prev), statistics.stdev(prev)
                bad |= abs(h[-1] - m) > sigma * s
        flags.append(bad)
    return flags


def foundry_rule(trace, window=100, factor=2.0, patience=5):
    hist, run, flags = deque(maxlen=window), 0, []
    for loss, _ in trace:
        high = len(hist) >= window // 2 and loss >= factor * statistics.fmean(hist)
        run = run + 1 if high else 0
        flags.append(run >= patience)
        if not high:
            hist.append(loss)
    return flags


def lmlab_rule(trace):
    from lmlab.config import TrainConfig
    from lmlab.train.guard import Guard

    g = Guard.from_config(TrainConfig(guard_max_skips=10**9))
    return [g.check(i + 1, loss, norm).action != "apply" for i, (loss, norm) in enumerate(trace)]


RULES = {"lmlab (before)": before_rule, "OLMo-core": olmo_rule, "llm-foundry": foundry_rule, "lmlab (now)": lmlab_rule}


def injected(trace, at: int, loss_factor: float, norm_factor: float, length: int = 1):
    out = list(trace)
    for i in range(at, min(len(out), at + length)):
        out[i] = (out[i][0] * loss_factor, out[i][1] * norm_factor)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--traces", default=os.path.join(tempfile.gettempdir(), "lmlab-guard-traces"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(args.traces)
    root.mkdir(parents=True, exist_ok=True)
    traces: dict[str, list] = {}
    for family, model in FAMILIES.items():
        if family not in args.families.split(","):
            continue
        for seed in range(args.seeds):
            f = root / f"{model}-{seed}-{args.steps}.json"
            if not f.is_file():
                tok = root / "tokenizer"
                if not tok.is_dir():
                    from lmlab.data.tokenizer import train_bpe

                    train_bpe("stdlib", 4096, tok, max_chars=3_000_000)
                print(f"recording {model} seed {seed} ({args.steps} steps)", file=sys.stderr, flush=True)
                f.write_text(json.dumps(record(model, seed, args.steps, root / "runs", tok)))
            traces.setdefault(family, []).extend([json.loads(f.read_text())])
    rows = []
    rng = random.Random(0)
    for family, ts in traces.items():
        n = sum(len(t) for t in ts)
        first = [f"{ts[0][0][0]:.2f} → {ts[0][-1][0]:.2f}"]
        spots = [(k, rng.randrange(70, len(t) - 6)) for k, t in enumerate(ts) for _ in range(30)]
        for name, rule in RULES.items():
            fp = sum(sum(rule(t)) for t in ts)
            det = []
            for lf, nf, length in [(f, f, 1) for f in FACTORS] + [(1.0, 10.0, 1), (3.0, 3.0, 6)]:
                hit = sum(any(rule(injected(ts[k], at, lf, nf, length))[at:at + length]) for k, at in spots)
                det.append(f"{hit}/{len(spots)}")
            rows.append([family, name, f"{fp}/{n}", *det, *first])
    table(f"guard rules on healthy runs ({args.steps} steps × {args.seeds} seed(s) per family) and injected spikes",
          ["family", "rule", "false positives", *[f"loss+norm ×{f:g}" for f in FACTORS], "norm ×10 alone",
           "loss+norm ×3, 6 steps", "loss (healthy run)"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
