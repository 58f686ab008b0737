"""From nothing to a model that answers, on CPU: pretrain mamba-swelu-tiny on the standard library, instruction-
tune it on `stdlib-instruct`, answer a held-out prompt; held-out loss before and after; full vs LoRA vs QLoRA
tokens/s and peak memory (each measured in its own process).

    python bench/bench_finetune.py                      # ~10 minutes on 2 cores
    python bench/bench_finetune.py --pretrain-steps 100 --sft-steps 60    # a quick look

Prints markdown tables (docs/finetuning.md keeps them with the machine and date). Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import table


def sft_overrides(base: str, out: Path, steps: int, method: str, threads: int) -> list[str]:
    return [f"model.name={base}", f"data.tokenizer={base}", "train.objective=sft", f"finetune.method={method}",
            "data.source=stdlib-instruct", "data.seq_len=256", "data.val_fraction=0.03", "train.batch_size=8",
            f"train.max_steps={steps}", f"train.lr={1e-3 if method == 'full' else 3e-3}", "train.warmup_steps=20",
            "train.eval_every=100000", "train.eval_batches=8", "train.save_every=100000", "train.log_every=20",
            f"train.threads={threads}", "train.progress=false", "train.sample_tokens=8", "finetune.lora_rank=16",
            f"run.out_dir={out}", f"run.name=sft-{method}"]


def measure(base: str, method: str, steps: int, threads: int) -> dict:
    """Train `steps` SFT steps in this process; tokens/s (target and input) and peak RSS."""
    import torch

    from lmlab.config import load_config
    from lmlab.runtime import setup_runtime
    from lmlab.train.objectives import make_objective
    from lmlab.train.setup import build
    from lmlab.train.step import apply_update, compute_gradients

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, sft_overrides(base, Path(tmp), steps, method, threads))
        rt = setup_runtime("cpu", "fp32", threads)
        objective = make_objective(cfg)
        p = build(cfg, rt, objective)
        batches = [p.data.train.next() for _ in range(steps + 2)]
        for b in batches[:2]:  # warm-up
            compute_gradients(p.model, objective, [b], rt, optimizer=p.optimizer)
            apply_update(p.optimizer)
        t0, tokens = time.perf_counter(), 0
        for b in batches[2:]:
            compute_gradients(p.model, objective, [b], rt, optimizer=p.optimizer)
            apply_update(p.optimizer)
            tokens += b["input_ids"].numel()
        dt = time.perf_counter() - t0
        trainable = sum(x.numel() for x in p.model.parameters() if x.requires_grad)
        opt_bytes = sum(t.numel() * t.element_size() for s in p.optimizer.state.values() for t in s.values()
                        if torch.is_tensor(t))
    return {"method": method, "tok_s": tokens / dt, "trainable": trainable, "opt_mb": opt_bytes / 2**20,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def answer(model, tok, messages, max_new_tokens=80) -> str:
    import torch

    from lmlab.data.chat import ChatFormat
    from lmlab.generate import SamplingConfig, generate

    fmt = ChatFormat(tok, "plain")
    ids = torch.tensor([fmt.prompt_ids(messages)])
    out = generate(model, ids, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                              eos_id=fmt.end_of_turn_id))
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure-steps", type=int, default=8)
    ap.add_argument("--out", default=None, help="runs folder (default: a temporary one)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one method in a fresh process
    ap.add_argument("--base", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.base, args.measure, args.measure_steps, args.threads)))
        return

    import torch

    from lmlab.config import load_config
    from lmlab.eval.perplexity import validation_loss
    from lmlab.inference import load_for_inference
    from lmlab.runtime import setup_runtime
    from lmlab.train.loop import train
    from lmlab.train.sft import SFT

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-ft-"))
    quiet = lambda *a: None  # noqa: E731
    t0 = time.perf_counter()
    recipe = Path(__file__).resolve().parent.parent / "src" / "lmlab" / "recipes" / "quickstart.yaml"
    pre = train(load_config(recipe, [f"train.max_steps={args.pretrain_steps}", f"train.threads={args.threads}",
                                     "train.progress=false", f"run.out_dir={out}", "run.name=pretrain",
                                     "train.eval_every=100000", "train.save_every=100000"]), echo=quiet)
    t_pre = time.perf_counter() - t0
    base = str((pre / "final").resolve())
    cfg = load_config(None, sft_overrides(base, out, args.sft_steps, "full", args.threads))
    sft = train(cfg, echo=quiet)
    t_sft = time.perf_counter() - t0 - t_pre
    rt = setup_runtime("cpu", "fp32", args.threads)
    base_model, tok = load_for_inference(base, "cpu")
    tuned, _ = load_for_inference(str(sft), "cpu")
    objective = SFT(load_config(sft / "config.yaml"))
    data = objective.data(load_config(sft / "config.yaml"), tok, rt)
    before = validation_loss(base_model, objective, data.val(), rt)["val_loss"]
    after = validation_loss(tuned, objective, data.val(), rt)["val_loss"]
    from lmlab.data.instruct import load_instruct

    held = load_instruct("stdlib-instruct", val_fraction=0.03, seed=cfg.train.seed).val
    example = min(held, key=lambda e: len(e.messages[-1]["content"]))
    prompt = example.messages[:-1]
    a_base, a_tuned = answer(base_model, tok, prompt), answer(tuned, tok, prompt)
    t_all = time.perf_counter() - t0

    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, {args.threads} threads"
    print(f"# bench_finetune  {time.strftime('%Y-%m-%d')}  {host}  torch {torch.__version__}")
    table("From nothing to an answering model (CPU)", ["stage", "steps", "seconds"], [
        ["pretrain mamba-swelu-tiny on stdlib", args.pretrain_steps, f"{t_pre:.0f}"],
        ["SFT (full) on stdlib-instruct", args.sft_steps, f"{t_sft:.0f}"],
        ["total incl. evaluation and answers", "", f"{t_all:.0f}"]])
    table("Held-out stdlib-instruct loss (assistant tokens)", ["model", "loss", "ppl"], [
        ["pretrained base", f"{before:.3f}", f"{torch.tensor(before).exp():.1f}"],
        ["after SFT", f"{after:.3f}", f"{torch.tensor(after).exp():.1f}"]])
    print(f"\nheld-out prompt: {prompt[-1]['content']!r}")
    print(f"base:  {a_base[:300]!r}")
    print(f"tuned: {a_tuned[:300]!r}")
    print(f"reference: {example.messages[-1]['content'][:300]!r}")

    rows = []
    for method in ("full", "lora", "qlora"):
        r = subprocess.run([sys.executable, __file__, "--measure", method, "--base", base, "--threads",
                            str(args.threads), "--measure-steps", str(args.measure_steps)],
                           capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if r.returncode != 0:
            rows.append([method, "failed: " + r.stderr.strip().splitlines()[-1][:80], "", "", ""])
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append([method, f"{m['tok_s']:,.0f}", f"{m['trainable']:,}", f"{m['opt_mb']:.1f}", f"{m['rss_mb']:.0f}"])
    table(f"SFT step cost on mamba-swelu-tiny (seq 256 × batch 8, {args.measure_steps} steps, own process each)",
          ["method", "tokens/s", "trainable params", "optimizer state MiB", "peak RSS MiB"], rows)
    print(f"\nruns in {out}")


if __name__ == "__main__":
    main()
