"""Does GRPO learn on a CPU? A tiny MambaSWELU is pretrained here on generated two-digit additions ("12+34=46"),
instruction-tuned (SFT) on a few examples of the answer format (User: 12+34 / Assistant: 46), then trained with
GRPO (format + exact-answer rewards) on the training prompts; the SFT model trained on for the same number of
extra steps is the baseline. Held-out prompts (never in the pretraining text, the SFT examples or the GRPO
prompts) are answered greedily before and after.

    OMP_NUM_THREADS=1 python bench/bench_grpo.py                 # ~10-15 minutes on a loaded 2-core CPU
    python bench/bench_grpo.py --pretrain-steps 100 --sft-steps 30 --grpo-steps 20    # a quick look

Prints markdown tables (docs/rl.md keeps them with the command and date). Never asserts a number.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from _common import table

COMMON = ["train.progress=false", "train.system_every=0", "train.sample_tokens=4", "finetune.template=plain"]


def held_out_score(model_dir: str, n_prompts: int, threads: int, temperature: float,
                   samples: int = 4) -> dict[str, float]:
    """The held-out prompts scored by the GRPO objective's own generation and rewards: greedy (the objective's
    validation) and sampled (`samples` completions per prompt at the rollout temperature, a fixed seed)."""
    from lmlab.config import load_config
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.runtime import setup_runtime
    from lmlab.train.grpo import GRPO
    from lmlab.train.setup import build_model

    cfg = load_config(None, [f"model.name={model_dir}", f"data.tokenizer={model_dir}", *prompt_keys(),
                             "train.objective=grpo", "finetune.template=plain", f"rl.temperature={temperature}"])
    rt = setup_runtime("cpu", "fp32", threads)
    obj = GRPO(cfg)
    tok = load_tokenizer(model_dir)
    obj.data(cfg, tok, rt)
    model = build_model(cfg, tok).eval()
    sums, n = {}, 0
    idx = list(range(min(n_prompts, len(obj.val_prompts))))
    with torch.no_grad():
        for lo in range(0, len(idx), 32):
            batch = {"val_index": torch.tensor(idx[lo: lo + 32])}
            _, metrics = obj.loss(model, batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += len(batch["val_index"])
        gen = torch.Generator().manual_seed(0)
        sampled = 0.0
        for lo in range(0, len(idx), 32):
            part = idx[lo: lo + 32]
            comps = obj._generate(model, [obj.val_ids[i] for i in part], samples, greedy=False, generator=gen)
            texts = [tok.decode(c, skip_special_tokens=True) for c in comps]
            total, _, _ = obj._score([obj.val_prompts[i] for i in part for _ in range(samples)], texts)
            sampled += float(total.sum())
    return {"reward": sums["reward"] / n, "accuracy": sums["rewards/answer"] / n, "format": sums["rewards/format"] / n,
            "sampled": sampled / (n * samples), "n": n}


def prompt_keys() -> list[str]:
    return ["data.source=arithmetic", "data.val_fraction=0.05", "rl.arithmetic_prompts=5000", "data.seq_len=64",
            "rl.max_completion_length=6"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--sft-steps", type=int, default=80)
    ap.add_argument("--sft-examples", type=int, default=128)
    ap.add_argument("--grpo-steps", type=int, default=120)
    ap.add_argument("--grpo-lr", type=float, default=5e-5)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--beta", type=float, default=0.04, help="rl.beta: KL to the SFT model (GRPO paper: 0.04)")
    ap.add_argument("--eval-prompts", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from lmlab.config import load_config
    from lmlab.data.prompts import load_prompts
    from lmlab.data.tokenizer import train_bpe
    from lmlab.train.loop import train

    out = Path(a.out or tempfile.mkdtemp(prefix="bench-grpo-"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    prompts = load_prompts(load_config(None, prompt_keys()))
    train_set = prompts.train
    held = {p.text() for p in prompts.val}
    assert not held & {p.text() for p in train_set}
    # the pretraining text: the training problems as "a+b=c" lines, in documents of 50 (the corpus splits by
    # document); the chat layout of the prompts is left for SFT to teach
    lines = [f"{p.text()}={p.answer}\n" for p in train_set]
    (out / "arith.txt").write_text("".join(lines))
    (out / "arith.jsonl").write_text("".join(json.dumps({"text": "".join(lines[i: i + 50])}) + "\n"
                                             for i in range(0, len(lines), 50)))
    tok_dir = out / "tok"
    if not tok_dir.is_dir():
        train_bpe(str(out / "arith.txt"), 300, tok_dir)
    quiet = dict(echo=lambda *x: None)
    thr = f"train.threads={a.threads}"

    t0 = time.perf_counter()
    base = train(load_config(None, [
        "model.name=mamba-swelu-tiny", f"data.source={out / 'arith.jsonl'}", f"data.tokenizer={tok_dir}",
        "data.seq_len=64", "data.val_fraction=0.02", "train.batch_size=16", f"train.max_steps={a.pretrain_steps}",
        "train.lr=2e-3", "train.warmup_steps=30", f"train.eval_every={a.pretrain_steps}", "train.eval_batches=4",
        "train.guard=off",  # the loss falls off a cliff when the sums click: not a spike to skip
        "model.dropout=0.0", "train.log_every=10", thr, *COMMON, f"run.out_dir={out}", "run.name=base"]), **quiet)
    t_pre = time.perf_counter() - t0

    rows = [{"instruction": p.text(), "output": p.answer} for p in train_set[: a.sft_examples]]
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def sft(model: Path, steps: int, name: str) -> Path:
        return train(load_config(None, [
            f"model.name={model}", f"data.tokenizer={model}", "train.objective=sft", f"data.source={out / 'sft.jsonl'}",
            "data.seq_len=64", "data.val_fraction=0.0", "finetune.packing=false", "train.batch_size=8",
            f"train.max_steps={steps}", "train.lr=1e-3", "train.warmup_steps=5", f"train.eval_every={steps}",
            "train.eval_batches=1", "train.log_every=10", thr, *COMMON, f"run.out_dir={out}", f"run.name={name}"]),
            **quiet)

    t0 = time.perf_counter()
    sft_run = sft(base / "final", a.sft_steps, "sft")
    t_sft = time.perf_counter() - t0
    before = held_out_score(str(sft_run / "final"), a.eval_prompts, a.threads, a.temperature)
    pre = held_out_score(str(base / "final"), a.eval_prompts, a.threads, a.temperature)

    t0 = time.perf_counter()
    every = max(1, a.grpo_steps // 6)
    grpo_run = train(load_config(None, [
        f"model.name={sft_run / 'final'}", f"data.tokenizer={sft_run / 'final'}", "train.objective=grpo",
        *prompt_keys(), "rl.num_generations=8", f"rl.temperature={a.temperature}", "rl.reward_funcs=[format, answer]",
        f"rl.beta={a.beta}",
        "rl.loss_type=dapo", "train.batch_size=8", f"train.max_steps={a.grpo_steps}", f"train.lr={a.grpo_lr}",
        "train.warmup_steps=5", "train.schedule=constant", f"train.eval_every={every}", "train.log_every=1",
        f"train.eval_batches={max(1, a.eval_prompts // 8)}", "train.weight_decay=0.0", thr, *COMMON,
        f"run.out_dir={out}", "run.name=grpo"]), **quiet)
    t_grpo = time.perf_counter() - t0
    after = held_out_score(str(grpo_run / "final"), a.eval_prompts, a.threads, a.temperature)

    t0 = time.perf_counter()
    sft_more = sft(sft_run / "final", a.grpo_steps, "sft-more")
    t_more = time.perf_counter() - t0
    baseline = held_out_score(str(sft_more / "final"), a.eval_prompts, a.threads, a.temperature)

    events = [json.loads(x) for x in (grpo_run / "metrics.jsonl").read_text().splitlines()]
    train_ev = [e for e in events if e["kind"] == "train"]
    eval_ev = [e for e in events if e["kind"] == "eval"]
    curve = []
    for e in eval_ev:
        window = [t for t in train_ev if e["step"] - every < t["step"] <= e["step"]]
        mean = sum(t["reward"] for t in window) / max(1, len(window))
        acc = sum(t["rewards/answer"] for t in window) / max(1, len(window))
        curve.append([e["step"], f"{mean:.3f}", f"{acc:.3f}", f"{e['val_reward']:.3f}",
                      f"{e['val_rewards/answer']:.3f}", f"{e['val_rewards/format']:.3f}"])
    from lmlab.models import registry
    from lmlab.models.hf import load_model

    params = registry.count_parameters(load_model(str(base / "final")))
    print(f"bench_grpo: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{a.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; mamba-swelu-tiny with a "
          f"{300}-token BPE: {params:,} parameters")
    print(f"data: {len(train_set):,} training problems (pretraining text and GRPO prompts), {len(prompts.val):,} "
          f"held out, {a.eval_prompts} of them scored; SFT on {a.sft_examples} examples")
    table("GRPO reward curve (train: mean over the steps since the previous row; held-out: greedy)",
          ["step", "train reward", "train accuracy", "held-out reward", "held-out accuracy", "held-out format"],
          curve)
    table("Held-out prompts before and after (exact answer; reward = format + answer, max 2)",
          ["model", "steps after SFT", "greedy accuracy", "greedy format", "greedy reward",
           f"sampled reward (T={a.temperature:g}, 4 per prompt)", "time (s)"],
          [[name, steps, f"{r['accuracy']:.3f}", f"{r['format']:.3f}", f"{r['reward']:.3f}", f"{r['sampled']:.3f}",
            f"{secs:.0f}"]
           for name, steps, r, secs in (("pretrained only", "-", pre, t_pre),
                                        (f"SFT ({a.sft_steps} steps)", 0, before, t_sft),
                                        ("SFT + SFT (baseline)", a.grpo_steps, baseline, t_more),
                                        ("SFT + GRPO", a.grpo_steps, after, t_grpo))])
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; run folders in {out}")


if __name__ == "__main__":
    main()
