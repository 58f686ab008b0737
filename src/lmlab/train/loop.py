"""The pretraining loop. Setup, checkpoints, logging and evaluation are functions it calls.

    lmlab pretrain → train(cfg)            a new run folder
    lmlab resume   → train(cfg, run_dir)   continue from its latest complete checkpoint
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import runs
from ..config import Config, save_config
from ..data.loader import TokenBatches, document_ids, eval_batches
from ..errors import ConfigError, LmlabError
from ..generate import SamplingConfig, generate
from ..models.registry import count_parameters
from ..monitor.metrics import MetricsWriter
from . import checkpoint as ckpt
from .optim import lr_at, make_optimizer
from .progress import Progress
from .runtime import Runtime, setup_runtime
from .setup import build_corpus, build_model, build_tokenizer, make_plan


class TrainingDiverged(LmlabError):
    exit_code = 3


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, cfg: Config, rt: Runtime, eos_id: int) -> float:
    """Mean validation loss (nats/token) over the fixed validation windows, averaged over ranks."""
    was = model.training
    model.eval()
    total = torch.zeros(2, device=rt.device, dtype=torch.float64)
    for x, y in eval_batches(tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.train.eval_batches,
                             rt.rank, rt.world_size):
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits = _forward(model, x, cfg, eos_id)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(float(y.numel()), device=rt.device, dtype=torch.float64)])
    if rt.distributed:
        import torch.distributed as dist

        dist.all_reduce(total)
    model.train(was)
    return float(total[0] / total[1])


def _forward(model, x: torch.Tensor, cfg: Config, eos_id: int) -> torch.Tensor:
    if cfg.data.document_masking:
        return model(x, seq_idx=document_ids(x, eos_id)).logits
    return model(x).logits


def swelu_values(model) -> dict[str, dict[str, float]]:
    mods = model.swelu_modules() if hasattr(model, "swelu_modules") else {}
    return {name: {"k": float(m.k.detach()), "lam": float(m.lam.detach())} for name, m in mods.items()}


def write_samples(model, tokenizer, cfg: Config, step: int, run_dir: Path, rt: Runtime) -> list[dict]:
    """Generations on the fixed prompts, with their own RNG (the training RNG is not touched)."""
    gen = torch.Generator(device=rt.device).manual_seed(cfg.train.seed + step)
    sc = SamplingConfig(max_new_tokens=cfg.train.sample_tokens, temperature=0.8, top_k=50,
                        eos_id=tokenizer.eos_token_id)
    out = []
    for prompt in cfg.train.sample_prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], device=rt.device)
        if ids.numel() == 0:
            continue
        with rt.autocast():
            seq = generate(model, ids, sc, generator=gen)
        text = tokenizer.decode(seq[0, ids.size(1):].tolist(), skip_special_tokens=True)
        out.append({"step": step, "prompt": prompt, "completion": text})
    with open(run_dir / "samples.jsonl", "a") as f:
        for rec in out:
            f.write(json.dumps(rec) + "\n")
    return out


def export_final(model, tokenizer, run_dir: Path) -> Path:
    """Hugging Face format: config.json, model.safetensors, tokenizer files. Written atomically."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the end of the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: Config, run_dir: Path | None = None, *, echo=print) -> Path:
    """Run (or continue, if `run_dir` has a checkpoint) a pretraining run. Returns the run folder."""
    t = cfg.train
    rt = setup_runtime(t.device, t.precision, t.threads)
    say = echo if rt.is_main else (lambda *a, **k: None)
    resuming = run_dir is not None
    if run_dir is None:
        name = cfg.run.name or runs.default_name(cfg.model.name)
        run_dir = runs.create_run_dir(cfg.run.out_dir, name) if rt.is_main else Path(cfg.run.out_dir) / name
        cfg.run.name = name
    rt.barrier()
    run_dir = Path(run_dir)
    status = "failed"
    metrics = None
    try:
        tokenizer = build_tokenizer(cfg, rt, saved=run_dir / "tokenizer" if resuming else None)
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer!r} has no end-of-text token")
        corpus = build_corpus(cfg, tokenizer, rt)
        model = build_model(cfg, tokenizer)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model, cfg.model.name)
        if cfg.data.document_masking and "seq_idx" not in model.forward.__code__.co_varnames:
            raise ConfigError(f"data.document_masking: {type(model).__name__} cannot reset at document boundaries")
        params = count_parameters(model)
        plan = make_plan(cfg, params, rt.world_size)
        model.to(rt.device)

        if rt.is_main and not resuming:
            save_config(cfg, run_dir / "config.yaml")
            tokenizer.save_pretrained(run_dir / "tokenizer")
        ckpt_root = run_dir / "checkpoints"
        latest = ckpt.latest_checkpoint(ckpt_root) if resuming else None
        if resuming and latest is None and rt.is_main:
            say(f"no complete checkpoint in {ckpt_root}; starting from step 0")

        optimizer = make_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, rt.device)
        scaler = rt.grad_scaler()
        loader = TokenBatches(corpus.train, cfg.data.seq_len, t.batch_size, seed=t.seed,
                              rank=rt.rank, world_size=rt.world_size)
        step, tokens_seen, last_val, best_val = 0, 0, None, None
        if latest is not None:
            state, rng = ckpt.load_checkpoint(latest, model, rank=rt.rank)
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            loader.load_state_dict(state["loader"])
            step, tokens_seen = state["step"], state["tokens"]
            last_val, best_val = state.get("last_val"), state.get("best_val")
            if rng is not None:
                ckpt.set_rng_state(rng)
        else:
            torch.manual_seed(t.seed + rt.rank)  # dropout streams differ per rank, identical per run
            np.random.seed(t.seed + rt.rank)

        if rt.is_main:
            runs.start_manifest(run_dir, resumed_from=step if resuming else None)
            runs.write_manifest(run_dir, name=run_dir.name, model=cfg.model.name, parameters=params,
                                total_steps=plan.total_steps, tokens_per_step=plan.tokens_per_step,
                                data=corpus.manifest, tokenizer_fingerprint=corpus.manifest.get(
                                    "tokenizer_fingerprint"), data_fingerprint=corpus.fingerprint)
        metrics = MetricsWriter(run_dir, enabled=rt.is_main)
        for line in plan.lines(cfg, rt):
            say(line)
        say(f"data      {corpus.manifest.get('train_tokens', len(corpus.train)):,} train tokens, "
            f"{len(corpus.val):,} validation tokens ({corpus.dir})")
        say(f"run       {run_dir}")
        _warn_if_not_fitting(cfg, rt, say, model)
        if latest is not None:
            say(f"resumed   from {latest.name} (step {step:,}, {tokens_seen:,} tokens)")
            metrics.log("event", step, event="resume", checkpoint=latest.name, tokens=tokens_seen)
            metrics.text(f"resumed from {latest} at step {step}")
        else:
            metrics.log("event", step, event="start", params=params, total_steps=plan.total_steps)
            metrics.text(f"start: {params:,} params, {plan.total_steps:,} steps")

        train_model = model
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            train_model = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
        model.train()
        progress = Progress(plan.total_steps, start=step, enabled=rt.is_main and t.progress, echo=say)
        loss_sum = torch.zeros((), device=rt.device)
        loss_count = 0
        window_t0, window_tokens = time.perf_counter(), 0
        with _StopFlag() as stop, progress:
            while step < plan.total_steps:
                lr = lr_at(step, lr=t.lr, total=plan.total_steps, warmup=t.warmup_steps,
                           schedule=t.schedule, min_ratio=t.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for micro in range(t.grad_accum):
                    x, y = loader.next()
                    x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                    sync = contextlib.nullcontext()
                    if rt.distributed and micro < t.grad_accum - 1:
                        sync = train_model.no_sync()
                    with sync:
                        with rt.autocast():
                            logits = _forward(train_model, x, cfg, eos_id)
                        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
                        scaled = loss / t.grad_accum
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += loss.detach()
                    loss_count += 1
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           t.grad_clip if t.grad_clip > 0 else float("inf"))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += plan.tokens_per_step
                window_tokens += plan.tokens_per_step

                if step % t.log_every == 0 or step == plan.total_steps:
                    mean_loss = float(rt.all_reduce_mean(loss_sum / max(1, loss_count)))
                    if not math.isfinite(mean_loss):
                        metrics.log("event", step, event="diverged", loss=mean_loss)
                        raise TrainingDiverged(
                            f"loss is {mean_loss} at step {step}; resume from the last checkpoint with a lower "
                            f"LR: lmlab resume {run_dir} train.lr={t.lr / 2:g}")
                    dt = time.perf_counter() - window_t0
                    tok_s = window_tokens / dt if dt > 0 else 0.0
                    metrics.log("train", step, tokens=tokens_seen, loss=mean_loss, lr=lr,
                                grad_norm=float(grad_norm), tok_s=tok_s)
                    sw = swelu_values(model)
                    if sw:
                        metrics.log("swelu", step, **{f"{n}.{p}": v for n, d in sw.items() for p, v in d.items()})
                    progress.update(step, loss=mean_loss, lr=lr, tok_s=tok_s)
                    metrics.text(f"step {step}/{plan.total_steps} loss {mean_loss:.4f} lr {lr:.3g} "
                                 f"grad_norm {float(grad_norm):.3f} tok/s {tok_s:,.0f}")
                    loss_sum.zero_()
                    loss_count = 0
                    window_t0, window_tokens = time.perf_counter(), 0
                else:
                    progress.update(step)

                last = step == plan.total_steps
                if step % t.eval_every == 0 or last:
                    last_val = evaluate(model, corpus.val, cfg, rt, eos_id)
                    ppl = math.exp(min(last_val, 50))
                    metrics.log("eval", step, tokens=tokens_seen, val_loss=last_val, val_ppl=ppl)
                    metrics.text(f"eval step {step}: val_loss {last_val:.4f} ppl {ppl:.2f}")
                    progress.note(f"step {step:>6}  val_loss {last_val:.4f}  ppl {ppl:,.2f}")
                    window_t0 = time.perf_counter()  # eval time does not count against tokens/s
                if rt.is_main and t.sample_every and step % t.sample_every == 0 and not last:
                    write_samples(model, tokenizer, cfg, step, run_dir, rt)
                stopping = _stop_requested(stop, rt)
                if step % t.save_every == 0 or last or stopping:
                    _save(ckpt_root, step, model, optimizer, scaler, loader, tokens_seen, last_val, best_val, rt)
                    if last_val is not None and rt.is_main and ckpt.record_best(ckpt_root, step, last_val):
                        best_val = last_val
                    if rt.is_main:
                        ckpt.prune(ckpt_root, t.keep_last)
                    metrics.log("event", step, event="checkpoint", path=f"checkpoints/step-{step:08d}")
                    window_t0 = time.perf_counter()
                if stopping and not last:
                    metrics.log("event", step, event="stopped")
                    status = "stopped"
                    say(f"stopped at step {step:,}; continue with: lmlab resume {run_dir}")
                    return run_dir

        if rt.is_main:
            samples = write_samples(model, tokenizer, cfg, step, run_dir, rt)
            final = export_final(model, tokenizer, run_dir)
            base = unigram_baseline(corpus)
            summary = {"step": step, "tokens": tokens_seen, "val_loss": last_val,
                       "val_ppl": math.exp(min(last_val, 50)) if last_val is not None else None,
                       "unigram_ppl": base, "final": str(final)}
            metrics.log("event", step, event="finished",
                        **{k: v for k, v in summary.items() if k not in ("final", "step")})
            runs.write_manifest(run_dir, summary=summary)
            say("")
            if last_val is not None:
                r = base / summary["val_ppl"]
                verdict = f"{r:.1f}× lower" if r >= 1 else f"{1 / r:.1f}× higher: not yet better than counting tokens"
                say(f"validation perplexity {summary['val_ppl']:,.2f}  (unigram baseline {base:,.2f} on the "
                    f"same data: {verdict})")
            say(f"exported  {final}  (AutoModelForCausalLM.from_pretrained works on it)")
            for s in samples[:2]:
                say(f"sample    {s['prompt']!r} → {s['completion'][:160]!r}")
        status = "finished"
        return run_dir
    finally:
        if metrics is not None:
            metrics.close()
        if rt.is_main and (run_dir / "run.json").exists():
            runs.write_manifest(run_dir, status=status, ended=time.strftime("%Y-%m-%dT%H:%M:%S"))
        rt.shutdown()


def _stop_requested(stop: _StopFlag, rt: Runtime) -> bool:
    if not rt.distributed:
        return stop.requested
    flag = torch.tensor(float(stop.requested), device=rt.device)
    import torch.distributed as dist

    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _save(root, step, model, optimizer, scaler, loader, tokens, last_val, best_val, rt: Runtime) -> None:
    state = {"step": step, "tokens": tokens, "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, "loader": loader.state_dict(),
             "last_val": last_val, "best_val": best_val}
    ckpt.save_checkpoint(root, step, model, state, rank=rt.rank, world_size=rt.world_size, barrier=rt.barrier)


def unigram_baseline(corpus) -> float:
    """Perplexity of a unigram model fit on the training split, on the validation split."""
    from ..data.shards import unigram_entropy

    return math.exp(unigram_entropy(np.asarray(corpus.val), corpus.vocab_size, ref=np.asarray(corpus.train)))


def enable_activation_checkpointing(model, name: str) -> None:
    """One checkpoint per layer (transformers' mechanism; non-reentrant, so dropout replays exactly)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.activation_checkpointing: {name} ({type(model).__name__}) does not support it")
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _warn_if_not_fitting(cfg: Config, rt: Runtime, say, model=None) -> None:
    """Print the planner's memory line for this device; a warning (never a stop) when it does not fit."""
    from ..plan.estimate import estimate_for_run, memory_fits

    try:
        fits, msg = memory_fits(estimate_for_run(cfg, rt, model))
    except Exception as e:  # noqa: BLE001 - the plan is advice; it must never stop a run
        print(f"warning: could not estimate memory: {e}", file=sys.stderr)
        return
    say(f"memory    {msg}" if fits else f"WARNING   {as_run_keys(msg)}")


def as_run_keys(text: str) -> str:
    """The planner's suggestions speak `lmlab estimate` flags; a run is changed with config keys."""
    for flag, key in ((r"--checkpointing", "train.activation_checkpointing=true"),
                      (r"--batch (\d+)", r"train.batch_size=\1"), (r"--grad-accum (\d+)", r"train.grad_accum=\1"),
                      (r"--hardware (\S+)", r"a GPU like \1")):
        text = re.sub(flag, key, text)
    return text
