"""The trainer: open a run, build its parts, restore a checkpoint, then a short loop that asks an objective
for the loss of each batch, lets a guard judge the step and tells the event sink what happened.

    lmlab pretrain → train(cfg)            a new run folder
    lmlab resume   → train(cfg, run_dir)   continue from its latest complete checkpoint

Seams (where later capabilities plug in, without touching the loop):
    objective   train/objectives.py   the loss of a batch, and the data it needs (pretrain, sft, dpo)
    guard       train/guard.py        apply, skip, roll back or stop each step (non-finite values, spikes)
    sink        monitor/events.py     every record and line the run leaves (metrics.jsonl, TB, train.log)
    strategy    train/strategies/     how the model is placed over ranks: one object per run (Parts.strategy)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..errors import ConfigError, LmlabError
from ..eval.perplexity import perplexity, validation_loss
from ..runtime import Runtime, setup_runtime
from . import checkpoint as ckpt
from .guard import APPLY, DeviceGuard, Guard, LastGood, Verdict, skips_on_device
from .objectives import Objective, make_objective
from .optim import lr_at, warmup_steps
from .run import Run, open_run
from .setup import Parts, build
from .step import apply_update, compute_gradients, discard_update

DEVICE_GUARD_ON = ("cuda",)  # device types where a skipping optimizer is judged by the device guard


class TrainingDiverged(LmlabError):
    exit_code = 3


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    last_val: float | None = None
    best_val: float | None = None
    skipped: int = 0  # steps the guard did not apply
    lr_scale: float = 1.0  # lowered by each guard rollback
    stale_evals: int = 0  # evaluations in a row without a new best (early stopping)
    guard: dict | None = None  # the guard's state at the last save (None: a checkpoint older than it)


def train(cfg: Config, run_dir: Path | None = None, *, echo=print, preflight=None, force: bool = False,
          rewrite_config: bool = False) -> Path:
    """Run (or continue, if `run_dir` has a checkpoint) a training run. Returns the run folder.

    `preflight(cfg, rt, model) -> str`, when given, adds a line before the first step (the CLI passes the
    planner's memory check, `lmlab.plan.estimate.memory_line`). A resume whose tokenizer, data, world size or
    tokens per step differ from the run's is refused unless `force`; one whose budget ends before its latest
    checkpoint is refused (`check_budget`), and one of a finished run whose budget ends at it does nothing.
    `rewrite_config` (a resume with changed settings) saves `cfg` as the run's config.yaml, once the run's lock
    is taken and the checks passed."""
    rt = setup_runtime(cfg.train.device, cfg.train.precision, cfg.train.threads)
    clean = False
    try:
        if run_dir is None and cfg.run.if_exists == "resume":
            run_dir = existing_run(cfg, rt)
            if run_dir is not None and _finished(run_dir, rt):  # a launcher that runs the command again
                if rt.is_main:
                    echo(_finished_line(run_dir))
                clean = True
                return run_dir
        objective = make_objective(cfg)
        parts = build(cfg, rt, objective, saved_tokenizer=Path(run_dir) / "tokenizer" if run_dir else None)
        latest = latest_valid_checkpoint(Path(run_dir) / runs.CHECKPOINTS, echo) if run_dir else None
        if latest is not None:  # before the folder is touched: a refusal leaves it as it was
            check_budget(cfg, parts.plan.total_steps, Path(run_dir), latest)
            if _step_of(latest) == parts.plan.total_steps and _finished(Path(run_dir), rt):
                if rt.is_main:  # its last step trained and exported: a second finish would only repeat it
                    echo(_finished_line(Path(run_dir)))
                clean = True
                return Path(run_dir)
        manifest = {"parameters": parts.params, "total_steps": parts.plan.total_steps,
                    "tokens_per_step": parts.plan.tokens_per_step, "world_size": rt.world_size,
                    "device": str(rt.device), **parts.data.manifest}
        if run_dir is not None and latest is not None and not force:
            check_same_run(Path(run_dir), manifest, resharded=parts.strategy.reshards)
        with open_run(cfg, rt, run_dir, tokenizer=parts.tokenizer, manifest=manifest, echo=echo,
                      resumed_from=_step_of(latest) if run_dir else None, rewrite_config=rewrite_config) as run:
            state = restore(cfg, rt, parts, latest)
            announce(cfg, rt, parts, run, state, latest)
            if preflight is not None and rt.is_main:
                run.sink.say(preflight(cfg, rt, parts.model))
            with system_stats(cfg, rt, run):
                try:
                    status = loop(cfg, rt, parts, objective, run, state, protect=(latest,) if latest else ())
                except TrainingDiverged:
                    clean = True  # every rank stops at the same step (the guard judges all-reduced values)
                    raise
            if status == "finished":  # finished only once exported: a run without final/ is not
                whole = parts.strategy.unsharded_model(parts.model)  # collective when the model is sharded
                if rt.is_main:
                    status = finish(cfg, rt, dataclasses.replace(parts, model=whole), run, state)
                status = rt.all_gather_object(status)[0]
            run.status = status
            if status == "diverged":
                clean = True
                raise TrainingDiverged(f"the weights are not finite at step {state.step} (train.guard=off lets "
                                       f"non-finite steps through); nothing exported: lower train.lr and start "
                                       f"again, or train with train.guard=skip")
        clean = True  # finished or stopped (a signal, seen by every rank at the same step)
        return run.dir
    finally:
        rt.shutdown(clean)


def loop(cfg: Config, rt: Runtime, p: Parts, objective: Objective, run: Run, s: TrainState,
         protect: tuple[Path, ...] = ()) -> str:
    """Train until the budget is spent ("finished") or a stop is asked for ("stopped")."""
    t, total = cfg.train, p.plan.total_steps
    guard = Guard.from_config(t)
    # skip on the device where the optimizer can (fused AdamW) and a host synchronisation costs (CUDA): none per
    # step; a strategy that steps its own state (DeepSpeed's engine) decides for itself. On the CPU the host guard
    # decides (it stops after too many skips at the step itself, the device guard only at the next log step).
    fast = DeviceGuard(guard, rt.device) if guard.policy == "skip" and p.scaler is None and skips_on_device(
        p.optimizer) and rt.device.type in DEVICE_GUARD_ON and not p.strategy.steps_itself else None
    if s.guard is not None:
        (fast or guard).load_state_dict(s.guard)
    elif s.step > 0 and guard.policy != "off":
        run.sink.say("guard     this checkpoint holds no guard state (written by an older lmlab): the spike "
                     "window starts empty")
    # the state before the last applied update, for a stop or rollback (deepspeed: its partitions are its own)
    last_good = LastGood(p.model, p.optimizer) if guard.policy != "off" and t.guard_keep and \
        not p.strategy.steps_itself else None
    guards = _Guards(guard, fast, last_good)
    window = _Window()
    p.model.train()
    with _StopFlag() as stop, run.sink.progress(total, s.step):
        while s.step < total:
            lr = s.lr_scale * lr_at(s.step, lr=t.lr, total=total, warmup=t.warmup_steps, schedule=t.schedule,
                                    min_ratio=t.min_lr_ratio)
            for group in p.optimizer.param_groups:
                group["lr"] = lr
            objective.before_step(p.model, s.step)
            batches = [p.data.train.next() for _ in range(t.grad_accum)]
            r = compute_gradients(p.model, objective, batches, rt, optimizer=p.optimizer, scaler=p.scaler,
                                  grad_clip=t.grad_clip, wrapped=p.wrapped, strategy=p.strategy)
            if fast is not None:  # decided on the device; what it did is read back at the next log step
                bad = fast.check(s.step + 1, r.loss, r.grad_norm)
                if last_good is not None:
                    last_good.keep(bad, s.step)
                apply_update(p.optimizer, skip=bad, strategy=p.strategy)
                verdict, applied = APPLY, bad == 0
            elif p.scaler is not None and bool(torch.isfinite(r.loss)) and not bool(torch.isfinite(r.grad_norm)):
                # fp16 loss-scale overflow: the scaler lowers its scale
                discard_update(p.optimizer, p.scaler, strategy=p.strategy)
                verdict, applied = APPLY, False
            else:
                verdict = guard.check(s.step + 1, r.loss, r.grad_norm)
                applied = verdict.apply
                if applied:
                    if last_good is not None:
                        last_good.keep(None, s.step)
                    apply_update(p.optimizer, p.scaler, strategy=p.strategy)
                else:
                    discard_update(p.optimizer, p.scaler, strategy=p.strategy)
                    s.skipped += 1
                    run.sink.event("guard", s.step + 1, f"guard {verdict.action} at step {s.step + 1}: "
                                   f"{verdict.reason}", action=verdict.action, reason=verdict.reason,
                                   loss=float(r.loss), grad_norm=float(r.grad_norm))
                    if verdict.action == "rollback":
                        if rollback(cfg, rt, p, run, s, last_good):
                            continue  # back to a checkpoint (deepspeed): its step, the data stream goes on
            s.step += 1
            run.step = s.step
            s.tokens += p.plan.tokens_per_step
            window.add(r, p.plan.tokens_per_step, applied)
            last = s.step == total
            if fast is not None and (last or any(s.step % every == 0 for every in (t.log_every, t.eval_every,
                                                                                   t.save_every))):
                verdict = _settle(fast, run, s)
            if verdict.action == "stop":
                _diverged(cfg, rt, p, run, s, protect, verdict, guards, window, lr)
            if s.step % t.log_every == 0 or last:
                log_train(run, rt, p, s, window, lr)
            else:
                run.sink.update(s.step)
            if s.step % t.eval_every == 0 or last:
                evaluate(cfg, rt, p, objective, run, s)
                window.restart()  # evaluation time does not count against tokens/s
                if t.early_stop_patience and s.stale_evals >= t.early_stop_patience and not last:
                    run.sink.event("early_stop", s.step, f"early stop at step {s.step}: no validation gain of "
                                   f"{t.early_stop_min_delta:g} in {s.stale_evals} evaluations", best=s.best_val)
                    if fast is not None and (verdict := _settle(fast, run, s)).action == "stop":
                        _diverged(cfg, rt, p, run, s, protect, verdict, guards, window, lr)
                    _save(cfg, rt, p, run, s, protect, guards)
                    return "finished"
            if rt.is_main and t.sample_every and s.step % t.sample_every == 0 and not last:
                write_samples(p.model, p.tokenizer, cfg, s.step, run.dir, rt)
            stopping = _stop_requested(stop, rt)
            if s.step % t.save_every == 0 or last or stopping:
                if fast is not None and (verdict := _settle(fast, run, s)).action == "stop":  # stopping: news
                    _diverged(cfg, rt, p, run, s, protect, verdict, guards, window, lr)
                _save(cfg, rt, p, run, s, protect, guards)
                window.restart()
            if stopping and not last:
                run.sink.event("stopped", s.step)
                run.sink.say(f"stopped at step {s.step:,}; continue with: lmlab resume {run.dir}")
                return "stopped"
    return "finished"


# ------------------------------------------------------------------------------------------- the loop's calls
def _settle(fast: DeviceGuard, run: Run, s: TrainState) -> Verdict:
    """What the device guard did since the last look: each bad step counted, one event each; `stop` after
    too many in a row."""
    events, verdict = fast.read()
    for step, action, reason, loss, grad_norm in events:
        s.skipped += 1
        run.sink.event("guard", step, f"guard {action} at step {step}: {reason}", action=action, reason=reason,
                       loss=loss, grad_norm=grad_norm)
    return verdict


@dataclass
class _Guards:
    """The loop's guard (the host's), the device guard when it decides instead, and the last good state."""

    host: Guard
    device: DeviceGuard | None
    last_good: LastGood | None

    def state_dict(self) -> dict:
        return (self.device or self.host).state_dict()

    def clear_streak(self) -> None:
        (self.device or self.host).clear_streak()


def _diverged(cfg: Config, rt: Runtime, p: Parts, run: Run, s: TrainState, protect: tuple[Path, ...],
              verdict: Verdict, guards: _Guards, window: _Window, lr: float) -> None:
    """The guard's stop: back to the last good state (the one before the last applied update: its next loss was
    judged good), save it as the checkpoint of this step, and raise with the resume command; run.json says
    `stopped`, why, and how to continue."""
    back = guards.last_good is not None and guards.last_good.restore()
    kept = f"the state after step {guards.last_good.step}" if back else "the current state"
    guards.clear_streak()  # a resume counts bad steps afresh
    if window.logged != s.step:  # the skipped count up to the stop, where status reads it
        log_train(run, rt, p, s, window, lr)
    _save(cfg, rt, p, run, s, protect, guards)
    when = f"at step {s.step}" if verdict.step in (None, s.step) else \
        f"at step {verdict.step} (read back at step {s.step}; nothing was applied in between)"
    command = f"lmlab resume {run.dir} train.lr={cfg.train.lr / 2:g}"
    run.status = "stopped"
    if rt.is_main:
        runs.write_manifest(run.dir, stop_reason=f"guard stop {when}: {verdict.reason}", resume_command=command,
                            skipped_steps=s.skipped)
    raise TrainingDiverged(f"{verdict.reason} {when}; the last good weights ({kept}, the newest whose next loss "
                           f"was good) are saved as step {s.step}: {command}")


class _Window:
    """Sums between two log lines: loss and metrics per applied step, tokens, wall time."""

    def __init__(self):
        self.loss = torch.zeros(())
        self.metrics: dict[str, torch.Tensor] = {}
        self.grad_norm = torch.tensor(float("nan"))  # the last applied step's
        self.steps, self.tokens, self.t0 = 0, 0, time.perf_counter()
        self.logged = -1  # the step of the last train record

    def add(self, r, tokens: int, applied: bool | torch.Tensor) -> None:
        """`applied`: a bool, or a 0-d bool tensor on the device (the device guard's verdict, not read here)."""
        self.tokens += tokens
        applied = torch.as_tensor(applied, device=r.loss.device)
        self.loss = self.loss.to(r.loss.device) + torch.where(applied, r.loss, 0)
        for k, v in r.metrics.items():
            self.metrics[k] = self.metrics.get(k, 0) + torch.where(applied, v, 0)
        self.steps = applied.long() + self.steps
        self.grad_norm = torch.where(applied, r.grad_norm, self.grad_norm.to(r.grad_norm.device))

    def restart(self) -> None:
        self.t0, self.tokens = time.perf_counter(), 0


def log_train(run: Run, rt: Runtime, p: Parts, s: TrainState, w: _Window, lr: float) -> None:
    steps = int(w.steps)
    n = max(1, steps)
    loss = float(w.loss) / n if steps else float("nan")
    dt = time.perf_counter() - w.t0
    tok_s = w.tokens / dt if dt > 0 else 0.0
    grad_norm = float(w.grad_norm)
    extra = {k: float(v) / n for k, v in w.metrics.items()} if steps else {}  # nothing applied: no metrics
    run.sink.log("train", s.step, tokens=s.tokens, loss=loss, lr=lr, grad_norm=grad_norm, tok_s=tok_s,
                 skipped=s.skipped, **extra)
    sw = swelu_values(p.model)
    if sw:
        run.sink.log("swelu", s.step, **{f"{n}.{k}": v for n, d in sw.items() for k, v in d.items()})
    run.sink.update(s.step, loss=loss, lr=lr, tok_s=tok_s, metrics=extra)
    more = "".join(f" {k} {v:.4g}" for k, v in extra.items())
    run.sink.text(f"step {s.step}/{p.plan.total_steps} loss {loss:.4f} lr {lr:.3g} grad_norm {grad_norm:.3f} "
                  f"tok/s {tok_s:,.0f}{more}")
    w.loss, w.metrics, w.steps, w.logged = torch.zeros(()), {}, 0, s.step
    w.restart()


def evaluate(cfg: Config, rt: Runtime, p: Parts, objective: Objective, run: Run, s: TrainState) -> None:
    res = validation_loss(p.model, objective, p.data.val(), rt)
    if res is None:  # no held-out targets: no value (not a perfect one), no best, no early stop
        if "no_val" not in run.warned:
            run.warned.add("no_val")
            run.sink.say("WARNING   no validation targets: validation loss is not measured (data.val_fraction)")
        return
    best = s.best_val
    s.last_val = res["val_loss"]  # the same on every rank (all-reduced), so every rank decides the same
    s.stale_evals = 0 if best is None or s.last_val < best - cfg.train.early_stop_min_delta else s.stale_evals + 1
    s.best_val = s.last_val if best is None else min(best, s.last_val)
    ppl = perplexity(s.last_val)
    run.sink.log("eval", s.step, tokens=s.tokens, **res, val_ppl=ppl)
    run.sink.text(f"eval step {s.step}: val_loss {s.last_val:.4f} ppl {ppl:.2f}")
    run.sink.note(f"step {s.step:>6}  val_loss {s.last_val:.4f}  ppl {ppl:,.2f}")


def _save(cfg: Config, rt: Runtime, p: Parts, run: Run, s: TrainState, protect: tuple[Path, ...],
          guards: _Guards | None = None) -> None:
    root = run.dir / runs.CHECKPOINTS
    if guards is not None:
        s.guard = guards.state_dict()
    state = {"state": asdict(s), "optimizer": p.optimizer.state_dict(),
             "scaler": p.scaler.state_dict() if p.scaler is not None else None,
             "loader": p.data.train.state_dict()}
    saved = ckpt.save_checkpoint(root, s.step, p.model, state, rt=rt, strategy=p.strategy)
    if rt.is_main:
        if s.last_val is not None:
            ckpt.record_best(root, s.step, s.last_val)
        ckpt.prune(root, cfg.train.keep_last, protect=protect)
    run.sink.event("checkpoint", s.step, path=saved.relative_to(run.dir).as_posix())


def restore(cfg: Config, rt: Runtime, p: Parts, latest: Path | None) -> TrainState:
    """Weights, optimizer, scaler, data position and RNG from `latest`; or the run's seeds for a fresh start."""
    if latest is None:
        torch.manual_seed(cfg.train.seed + rt.rank)  # dropout streams differ per rank, identical per run
        np.random.seed(cfg.train.seed + rt.rank)
        return TrainState()
    state, rng = ckpt.load_checkpoint(latest, p.model, rank=rt.rank, strategy=p.strategy)  # optimizer too
    if p.scaler is not None and state.get("scaler"):
        p.scaler.load_state_dict(state["scaler"])
    p.data.train.load_state_dict(state["loader"])
    if rng is not None:
        ckpt.set_rng_state(rng)
    return TrainState(**state["state"])


def rollback(cfg: Config, rt: Runtime, p: Parts, run: Run, s: TrainState, last_good: LastGood | None) -> bool:
    """Back to the last good state (the one before the last applied update, kept in memory) with a lower LR;
    the step counts as skipped and the data stream goes on. Where none is kept (deepspeed, train.guard_keep=false),
    back to the last checkpoint's weights, optimizer and RNG, and its step (then True: the loop goes on from
    there)."""
    scale = s.lr_scale * cfg.train.guard_lr_factor
    if last_good is not None:
        to = last_good.step if last_good.restore() else s.step  # nothing applied since the start: as it is
        s.lr_scale = scale
        run.sink.event("rollback", s.step + 1, f"rolled back to the state before step {to + 1}'s update, LR × "
                       f"{scale:g}", to_step=to, lr_scale=scale)
        run.sink.say(f"guard     rolled back to the state after step {to} (the last good one); LR now × {scale:g}")
        return False
    latest = latest_valid_checkpoint(run.dir / runs.CHECKPOINTS, run.sink.say)
    if latest is None:
        raise TrainingDiverged(f"the guard asked for a rollback at step {s.step + 1} but no checkpoint exists "
                               f"yet; lower train.lr or save earlier (train.save_every)")
    position = p.data.train.state_dict()
    back = restore(cfg, rt, p, latest)
    p.data.train.load_state_dict(position)
    skipped, guard = s.skipped, s.guard
    for f in dataclasses.fields(TrainState):
        setattr(s, f.name, getattr(back, f.name))
    s.lr_scale, s.skipped, s.guard = scale, skipped, guard
    run.sink.event("rollback", s.step, f"rolled back to {latest.name}, LR × {scale:g}", checkpoint=latest.name,
                   to_step=s.step, lr_scale=scale)
    run.sink.say(f"guard     rolled back to {latest.name}; LR now × {scale:g}")
    return True


RESUME_KEYS = {"tokenizer_fingerprint": "the tokenizer", "data_fingerprint": "the data",
               "world_size": "the number of ranks", "tokens_per_step": "the global batch (tokens per step)"}


def check_same_run(run_dir: Path, now: dict, resharded: bool = False) -> None:
    """Refuse to continue a run on other data, tokenizer, rank count or global batch: the data position and
    the optimizer state would silently mean something else."""
    before = runs.read_manifest(run_dir)
    keys = {k: v for k, v in RESUME_KEYS.items() if not (resharded and k == "world_size")}  # DCP reshards
    changed = [f"{what} ({before[k]} → {now[k]})" for k, what in keys.items()
               if k in before and k in now and before[k] != now[k]]
    if changed:
        raise LmlabError(f"{run_dir}: cannot resume exactly, changed: {'; '.join(changed)}; "
                         f"pass --force to continue anyway")


def check_budget(cfg: Config, total_steps: int, run_dir: Path, latest: Path) -> None:
    """Refuse a budget of `total_steps` that ends before `latest`, the checkpoint a resume of `run_dir` starts
    from: the run would be past its end before its first step. A budget that ends at it trains nothing and
    finishes the run there (its export), unless that is done already."""
    step = _step_of(latest)
    if step <= total_steps:
        return
    t = cfg.train
    advice = "give a larger value"
    if t.max_steps is not None:
        budget = f"train.max_steps={t.max_steps}"
    elif t.max_tokens is not None:
        budget = f"train.max_tokens={t.max_tokens} ({total_steps:,} steps)"
    elif t.token_ratio is not None:
        budget = f"train.token_ratio={t.token_ratio:g} ({total_steps:,} steps)"
    else:
        budget, advice = f"the default budget of {total_steps:,} steps", "set train.max_steps"
    raise ConfigError(f"{budget} is below step {step:,} of {run_dir}'s latest checkpoint ({latest}); {advice}")


def _finished_line(run_dir: Path) -> str:
    return (f"run       {run_dir} finished already; nothing to do (lmlab resume {run_dir} train.max_steps=N "
            f"trains on)")


def existing_run(cfg: Config, rt: Runtime) -> Path | None:
    """`run.if_exists=resume`: the folder out_dir/name when it holds a run (then it is continued as by `lmlab
    resume`), else None (a new run). Rank 0 looks, before any rank can create it; a config that differs from the
    run's own (run.* and log.* aside) is refused, naming the keys."""
    from ..config import load_config

    folder = Path(cfg.run.out_dir) / cfg.run.name
    found = rt.all_gather_object((folder / "config.yaml").is_file())[0]
    if not found:
        return None
    saved = load_config(folder / "config.yaml").to_dict()
    now = cfg.to_dict()
    changed = [f"{section}.{k} ({saved[section].get(k)!r} → {now[section].get(k)!r})"
               for section in now if section not in ("run", "log")
               for k in sorted(set(now[section]) | set(saved.get(section, {})))
               if now[section].get(k) != saved.get(section, {}).get(k)]
    if changed:
        raise LmlabError(f"{folder}: run.if_exists=resume, but the config differs from the run's config.yaml: "
                         f"{'; '.join(changed)}; continue it with lmlab resume {folder} train.KEY=VALUE, or pick "
                         f"another run.name")
    return folder


def _finished(run_dir: Path, rt: Runtime) -> bool:
    """Rank 0's reading, on every rank: run.json says finished and the export is there."""
    done = rt.is_main and (run_dir / "run.json").is_file() and (run_dir / "final").is_dir() and \
        runs.read_manifest(run_dir).get("status") == "finished"
    return bool(rt.all_gather_object(done)[0])


def latest_valid_checkpoint(root: Path, echo=print) -> Path | None:
    """The newest complete checkpoint whose files match their sha256; damaged ones are named and skipped."""
    for path in reversed(runs.list_checkpoints(root)):
        try:
            ckpt.verify(path)
            return path
        except LmlabError as e:
            echo(f"WARNING   {e}; falling back to the previous checkpoint")
    return None


def _step_of(path: Path | None) -> int:
    return runs.step_of(path) if path is not None else 0


def announce(cfg: Config, rt: Runtime, p: Parts, run: Run, s: TrainState, latest: Path | None) -> None:
    for line in p.plan.lines(cfg, rt) + p.data.lines:
        run.sink.say(line)
    t = cfg.train
    if (used := warmup_steps(t.warmup_steps, p.plan.total_steps)) < t.warmup_steps:
        run.sink.say(f"WARNING   train.warmup_steps={t.warmup_steps} is more than a tenth of the run's "
                     f"{p.plan.total_steps:,} steps: warming up over {used:,}")
    run.sink.say(f"run       {run.dir}")
    if latest is not None:
        run.sink.say(f"resumed   from {latest.name} (step {s.step:,}, {s.tokens:,} tokens)")
        run.sink.event("resume", s.step, f"resumed from {latest} at step {s.step}", checkpoint=latest.name,
                       tokens=s.tokens)
    else:
        if run.resuming:
            run.sink.say(f"no complete checkpoint in {run.dir / runs.CHECKPOINTS}; starting from step 0")
        run.sink.event("start", 0, f"start: {p.params:,} params, {p.plan.total_steps:,} steps", params=p.params,
                       total_steps=p.plan.total_steps)


def finish(cfg: Config, rt: Runtime, p: Parts, run: Run, s: TrainState) -> str:
    """Samples, the export, the summary: "finished"; or "diverged" (nothing exported, no samples) when the
    weights are not finite (train.guard=off lets non-finite steps through)."""
    from ..models.export import export

    if not finite_weights(p.model):
        reason = f"the weights are not finite at step {s.step}"
        run.sink.say(f"samples   none: {reason} (the run diverged); nothing exported")
        run.sink.event("diverged", s.step, f"diverged: {reason}", reason=reason)
        runs.write_manifest(run.dir, stop_reason=f"diverged: {reason} (train.guard=off)", skipped_steps=s.skipped)
        return "diverged"
    samples = write_samples(p.model, p.tokenizer, cfg, s.step, run.dir, rt)
    final = export(p.model, p.tokenizer, run.dir / "final")
    base = p.data.baseline_ppl()
    summary = {"step": s.step, "tokens": s.tokens, "val_loss": s.last_val,
               "val_ppl": perplexity(s.last_val) if s.last_val is not None else None, "unigram_ppl": base,
               "skipped_steps": s.skipped, "final": str(final)}
    run.sink.event("finished", s.step, **{k: v for k, v in summary.items() if k not in ("final", "step")})
    runs.write_manifest(run.dir, summary=summary)
    run.sink.say("")
    if s.last_val is not None and base is not None:
        r = base / summary["val_ppl"]
        verdict = f"{r:.1f}× lower" if r >= 1 else f"{1 / r:.1f}× higher: not yet better than counting tokens"
        run.sink.say(f"validation perplexity {summary['val_ppl']:,.2f}  (unigram baseline {base:,.2f} on the "
                     f"same data: {verdict})")
    run.sink.say(f"exported  {final}  (AutoModelForCausalLM.from_pretrained works on it)")
    for sample in samples[:2]:
        run.sink.say(f"sample    {sample['prompt']!r} → {sample['completion'][:160]!r}")
    return "finished"


@contextlib.contextmanager
def system_stats(cfg: Config, rt: Runtime, run: Run):
    """`kind: "system"` records (CPU, RAM, this run's GPUs from NVML) every `train.system_every` seconds from a
    side thread on rank 0: what `lmlab watch`/`status`/`doctor` read, and the run's heartbeat."""
    from ..monitor.gpu import SystemSampler, cuda_uuids

    uuids = rt.all_gather_object(cuda_uuids([rt.device.index or 0])[0] if rt.device.type == "cuda" else None)
    if not rt.is_main or cfg.train.system_every <= 0:
        yield
        return
    sampler = SystemSampler(lambda stats: run.sink.log("system", run.step, **stats), interval_s=cfg.train.system_every,
                            gpu_uuids=[u for u in uuids if u] or None, gpus=rt.device.type == "cuda")
    with sampler:
        yield


def finite_weights(model) -> bool:
    """Whether every parameter is finite (one host synchronisation)."""
    with torch.no_grad():
        flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def swelu_values(model) -> dict[str, dict[str, float]]:
    mods = model.swelu_modules() if hasattr(model, "swelu_modules") else {}
    return {name: {"k": float(m.k.detach()), "lam": float(m.lam.detach())} for name, m in mods.items()}


def write_samples(model, tokenizer, cfg: Config, step: int, run_dir: Path, rt: Runtime) -> list[dict]:
    """Generations on the fixed prompts, with their own RNG (the training RNG is not touched); none from a model
    whose weights are not finite (a diverged run: sampling would draw from NaN probabilities)."""
    from ..generate import SamplingConfig, generate

    if not finite_weights(model):
        return []

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


def _stop_requested(stop: _StopFlag, rt: Runtime) -> bool:
    return rt.any_rank(stop.requested)  # every rank stops at the same step; no GPU synchronisation

