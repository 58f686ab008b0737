"""`lmlab doctor RUN`: read a run folder and say, in plain words and with numbers, what is going wrong.

Each check looks at what the run recorded (metrics.jsonl, run.json, checkpoints/, the disk) and returns
Findings. A healthy run returns none. Thresholds are module constants so they can be read and tuned.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from ..runs import checkpoints
from .gpu import BENIGN_THROTTLE
from .runread import RunReader, applied_records, dir_size, finite, num
from .status import ENDED_EARLY, fmt_bytes, fmt_duration, fmt_num, fmt_rate, status_word

# Spikes in the logged records (each a mean over train.log_every steps): robust statistics over a window of
# records after the LR warmup, so that a healthy run's ordinary variation (grad norms that grow early on, a
# skewed tail) is not called a spike. Calibrated on healthy runs of every family and on injected spikes
# (docs/monitoring.md has the table).
SPIKE_WINDOW = 64           # records in the rolling window a value is compared against
SPIKE_MIN_HISTORY = 16      # records (after warmup) before spike detection starts
SPIKE_MADS = 8.0            # a spike is above median + 8 robust σ (1.4826 · MAD) of the window ...
SPIKE_MIN_RATIO = {"loss": 1.25, "grad_norm": 3.0}  # ... and at least this many times the window median
RISE_RATIO = 1.10           # smoothed loss 10 % above its minimum: rising
STALL_MIN_DROP = 0.01       # the last half of the run gained less than 1 % of its loss ...
STALL_SIGMAS = 2.0          # ... or less than 2 standard errors of the noise: not learning any more
STALL_LEARNED = 0.10        # a run that fell by 10 % or more before that has plateaued (a note), else stalled
GAP_NOTE, GAP_WARN = 0.5, 1.0   # val - train: < 0.5 fine, > 1.0 overfitting
VAL_RISE_RATIO = 1.05       # last val loss 5 % above the best one: overfitting
THROUGHPUT_DROP = 0.25      # recent tokens/s 25 % below the run's own earlier level
GPU_UTIL_LOW = 50.0         # % mean utilisation: input-bound below this
MEM_HIGH = 0.95             # fraction of GPU memory / RAM in use
DISK_LOW_FRACTION = 0.05    # free space below 5 % ...
DISK_CHECKPOINTS = 2        # ... or below the size of two checkpoints
STALE_FACTOR = 2.0          # last checkpoint older than 2x the expected interval
STALE_FLOOR_S = 600.0       # never call a checkpoint stale before 10 minutes
STALE_DEFAULT_S = 2 * 3600  # when the save interval is unknown
SYSTEM_WINDOW = 30          # recent system records looked at


# every finding code, in the order findings of one severity are listed: causes before their symptoms
CODES = ("dead", "nan", "guard_stop", "stalled", "rising", "overfitting", "spikes", "plateau", "gap", "throughput",
         "gpu_util", "gpu_memory", "ram", "throttle", "no_checkpoint", "stale_checkpoint", "disk", "cpu_bf16")


@dataclass
class Finding:
    code: str       # one of CODES
    severity: str   # error | warning | note
    message: str    # what is happening, with numbers
    advice: str     # what to do about it

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "advice": self.advice}


def _train_losses(r: RunReader) -> list[tuple[int, float]]:
    return [(int(num(x.get("step")) or 0), num(x.get("loss"))) for x in r.train if num(x.get("loss")) is not None]


def _cfg(r: RunReader, section: str, key: str):
    v = (r.config.get(section) or {}).get(key) if isinstance(r.config, dict) else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _guard_events(r: RunReader) -> list[dict]:
    return [e for e in r.events if e.get("event") == "guard"]


def _nonfinite_guard(e: dict) -> bool:
    vals = [num(e.get("loss")), num(e.get("grad_norm"))]
    return any(v is not None and not math.isfinite(v) for v in vals) or \
        str(e.get("reason", "")).startswith(("loss is", "gradient norm is"))


def _last_streak(events: list[dict]) -> list[dict]:
    """The guard events of the run's last streak of bad steps in a row (what a stop under `skip` ends)."""
    out: list[dict] = []
    for e in events:
        step = int(num(e.get("step")) or 0)
        if out and step - int(num(out[-1].get("step")) or 0) > 1:
            out = []
        out.append(e)
    return out


def check_nan(r: RunReader) -> list[Finding]:
    """Divergence: a non-finite loss or grad norm (in the guard's events, which name the step itself, or in the
    logged means), or a stop by the guard. Advice: resume from the saved good state with the learning rate the
    trainer suggests (train.lr / 2)."""
    s = r.state
    bad = None  # (step, what)
    for x in applied_records(r.train):  # a window the guard skipped whole logs NaN: nothing was applied
        for key in ("loss", "grad_norm"):
            v = num(x.get(key))
            if v is not None and not math.isfinite(v):
                bad = (int(num(x.get("step")) or 0), f"{key.replace('_', ' ')} is {v}")
                break
        if bad is not None:
            break
    guard_stop = s.status in ("stopped", "failed") and (any(
        e.get("action") == "stop" for e in _guard_events(r)) or str(s.stop_reason or "").startswith("guard"))
    if bad is not None or guard_stop or s.diverged:  # a NaN step the guard skipped and the run went on: fine
        for e in _guard_events(r):
            step = int(num(e.get("step")) or 0)
            if _nonfinite_guard(e) and (bad is None or step < bad[0]):
                bad = (step, str(e.get("reason") or "loss is nan"))
                break
    if bad is None:
        for e in r.events:  # the trainer's end-of-run check: weights not finite (train.guard=off)
            if e.get("event") == "diverged":
                bad = (int(num(e.get("step")) or 0), str(e.get("reason") or "the weights are not finite"))
                break
    if bad is None and not guard_stop:
        return []
    if bad is None:  # stopped by the guard for spikes: the first bad step of the streak that ended the run
        streak = _last_streak(_guard_events(r))
        bad = (int(num(streak[0].get("step")) or 0), streak[0].get("reason") or "") if streak else (s.step, "")
    step, what = bad
    lr = _cfg(r, "train", "lr")
    if lr is None:
        lrs = [num(x.get("lr")) for x in r.train if finite(num(x.get("lr")))]
        lr = max(lrs) if lrs else None
    cmd = s.resume_command if s.resume_command and "train.lr=" in s.resume_command else \
        f"lmlab resume {r.path}" + (f" train.lr={lr / 2:g}" if lr else "")
    ckpts = checkpoints(r.path)
    if guard_stop:
        code = "nan" if what.startswith(("loss is", "gradient norm is")) else "guard_stop"
        head = f"The guard stopped the run: {what} at step {step:,}" if what else \
            f"The guard stopped the run at step {step:,}"
        saved = f"the good state it saved ({ckpts[-1].name})" if ckpts else "the start (no checkpoint was saved)"
        return [Finding(code, "error", head + (f" ({s.stop_reason})." if s.stop_reason and what not in
                                                  s.stop_reason else "."),
                        f"Resume from {saved} with half the learning rate: `{cmd}`. If it recurs, lengthen "
                        f"train.warmup_steps, set train.grad_clip (e.g. 1.0) or train in bf16 rather than fp16.")]
    before = [c for c in ckpts if c.step < step]
    where = f"checkpoint {before[-1].name}" if before else "the start (no checkpoint before it)"
    return [Finding("nan", "error", f"The run diverged: {what} at step {step:,}.",
                    f"Resume from {where} with half the learning rate: `{cmd}`. If it recurs, lengthen "
                    f"train.warmup_steps, set train.grad_clip (e.g. 1.0) or train in bf16 rather than fp16.")]


def _spikes(points: list[tuple[int, float]], min_ratio: float) -> list[tuple[int, float, float]]:
    """(step, value, window median) of each point above median + SPIKE_MADS robust σ of the previous
    SPIKE_WINDOW points and above `min_ratio` × that median. A spike never enters the window."""
    window: list[float] = []
    out = []
    for step, v in points:
        if not math.isfinite(v):
            continue
        if len(window) >= SPIKE_MIN_HISTORY:
            med = statistics.median(window)
            mad = statistics.median(abs(w - med) for w in window)
            if v > med + SPIKE_MADS * 1.4826 * mad and v > min_ratio * med:
                out.append((step, v, med))
                continue
        window.append(v)
        if len(window) > SPIKE_WINDOW:
            window.pop(0)
    return out


def check_spikes(r: RunReader) -> list[Finding]:
    warmup = _cfg(r, "train", "warmup_steps") or 0
    found = []
    for key, label in (("loss", "loss"), ("grad_norm", "grad norm")):
        pts = [(int(num(x.get("step")) or 0), num(x.get(key))) for x in r.train if num(x.get(key)) is not None]
        sp = _spikes([(st, v) for st, v in pts if st > warmup], SPIKE_MIN_RATIO[key])
        if sp:
            worst = max(sp, key=lambda t: t[1] / max(t[2], 1e-12))
            steps = ", ".join(f"{s:,}" for s, _, _ in sp[:5]) + (" …" if len(sp) > 5 else "")
            found.append((label, sp, worst, steps))
    if not found:
        return []
    msg = "; ".join(f"{len(sp)} {label} spike(s) at step(s) {steps} (worst {fmt_num(w[1])} against a recent median "
                    f"of {fmt_num(w[2])}, ×{w[1] / max(w[2], 1e-12):.1f})" for label, sp, w, steps in found)
    return [Finding("spikes", "warning", msg[0].upper() + msg[1:] + ".",
                    "Occasional spikes that recover are harmless; repeated ones mean the learning rate is too high "
                    "for this batch size. Lower train.lr, lengthen train.warmup_steps, make sure train.grad_clip "
                    "is set, and look at the data batches around those steps.")]


def check_trend(r: RunReader) -> list[Finding]:
    pts = [(s, v) for s, v in _train_losses(r) if math.isfinite(v)]
    if len(pts) < 20:
        return []
    smooth = [v for v in r.loss_smooth if v is not None]
    out = []
    i_min = min(range(len(smooth)), key=smooth.__getitem__)
    low, now = smooth[i_min], smooth[-1]
    steps = [s for s, _ in pts]
    if now > RISE_RATIO * low and now - low > 0.05 and len(smooth) - i_min >= 5:
        step_min = steps[min(i_min, len(steps) - 1)]
        out.append(Finding("rising", "warning",
                           f"Smoothed loss is rising: {low:.3f} at step {step_min:,}, {now:.3f} now at step "
                           f"{steps[-1]:,} (+{100 * (now / low - 1):.0f} %).",
                           "The run is getting worse. Stop it and resume from a checkpoint from before the rise "
                           "with a lower train.lr; check that the data is not repeating or corrupted."))
        return out
    return _stall(r, pts)


def _median_se(xs: list[float]) -> float:
    """Standard error of a median, from the robust σ (1.4826 · MAD): a spike does not inflate it."""
    med = statistics.median(xs)
    return 1.2533 * 1.4826 * statistics.median(abs(x - med) for x in xs) / math.sqrt(len(xs))


def _stall(r: RunReader, pts: list[tuple[int, float]]) -> list[Finding]:
    """Not learning any more: over the last half of the run (after the warmup), the median loss of its second
    half is not lower than that of its first half by STALL_MIN_DROP of it and by STALL_SIGMAS standard errors.
    A run that fell by STALL_LEARNED before that has plateaued (a note); one that never did is stalled."""
    warmup = _cfg(r, "train", "warmup_steps") or 0
    body = [(s, v) for s, v in pts if s > warmup] or pts
    tail = body[len(body) // 2:]
    if len(tail) < 8:
        return []
    a, b = [v for _, v in tail[:len(tail) // 2]], [v for _, v in tail[len(tail) // 2:]]
    ma, mb = statistics.median(a), statistics.median(b)
    se = math.hypot(_median_se(a), _median_se(b))
    drop = ma - mb
    if drop >= STALL_MIN_DROP * abs(ma) and drop >= STALL_SIGMAS * se:
        return []
    k = max(3, len(pts) // 10)
    first = statistics.fmean(v for _, v in pts[:k])
    learned = (first - mb) / abs(first) if first else 0.0
    span = f"steps {tail[0][0]:,}–{tail[-1][0]:,}"
    change = f"{ma:.3f} → {mb:.3f} ({100 * (mb / ma - 1):+.1f} %, noise ±{se:.3f})" if ma else f"{ma:.3f} → {mb:.3f}"
    if learned >= STALL_LEARNED:
        return [Finding("plateau", "note",
                        f"Loss has flattened over the last half of the run: {change} over {span}, after falling "
                        f"from {first:.3f}.",
                        "More steps at this learning rate will gain little: the run is near what this model and "
                        "data give at this schedule. A larger model, more data or a decaying schedule goes further.")]
    vocab = _cfg(r, "data", "vocab_size")
    uniform = ""
    if vocab and abs(mb - math.log(vocab)) < 0.05 * math.log(vocab):
        uniform = f" That is the loss of a uniform guess over {int(vocab):,} tokens (ln {int(vocab):,} = " \
                  f"{math.log(vocab):.2f}): the model predicts nothing."
    return [Finding("stalled", "warning",
                    f"Loss is not falling: {change} over {span}; {first:.3f} at the start.{uniform}",
                    "Nothing is being learned. Check the learning rate (too small, too large for the batch, or 0 "
                    "after warmup), that the data is tokenized as expected and not constant, and that the "
                    "parameters are trainable.")]


def _train_ema_at(r: RunReader, step: float) -> float | None:
    best = None
    for x, sm in zip(r.train, r.loss_smooth):
        if (num(x.get("step")) or 0) <= step and sm is not None:
            best = sm
    return best


def check_overfitting(r: RunReader) -> list[Finding]:
    evals = [(num(e.get("step")) or 0, num(e.get("val_loss"))) for e in r.evals if finite(num(e.get("val_loss")))]
    if not evals:
        return []
    out = []
    step, val = evals[-1]
    train = _train_ema_at(r, step)
    best_step, best_val = min(evals, key=lambda t: t[1])
    rising = len(evals) >= 3 and val > VAL_RISE_RATIO * best_val and best_step < step
    gap = val - train if train is not None else None
    best_hint = f"the best validation loss was {best_val:.3f} at step {int(best_step):,}"
    if rising or (gap is not None and gap > GAP_WARN):
        parts = []
        if gap is not None:
            parts.append(f"validation loss {val:.3f} is {gap:.2f} above the training loss {train:.3f}")
        if rising:
            parts.append(f"it has risen {100 * (val / best_val - 1):.0f} % since {best_hint}")
        out.append(Finding("overfitting", "warning", f"Overfitting at step {int(step):,}: " + "; ".join(parts) + ".",
                           f"The model is memorising the training data. Use the checkpoint nearest step "
                           f"{int(best_step):,} (checkpoints/best.json), and train on more (or more varied) data, "
                           f"for fewer steps, or with more weight decay / dropout."))
    elif gap is not None and gap > GAP_NOTE:
        out.append(Finding("gap", "note",
                           f"Validation loss {val:.3f} is {gap:.2f} above the training loss {train:.3f} at step "
                           f"{int(step):,} (under 0.5 is normal, over 1.0 is overfitting).",
                           "Keep an eye on it; if the gap keeps growing, stop at the best validation checkpoint."))
    return out


def check_throughput(r: RunReader) -> list[Finding]:
    recs = r.train[r.segment_start():]
    pts = [(int(num(x.get("step")) or 0), num(x.get("tok_s"))) for x in recs if finite(num(x.get("tok_s")))]
    pts = [(s, v) for s, v in pts if v > 0]
    if len(pts) < 10:
        return []
    body = pts[2:]  # the first logs include compilation and warm-up
    half = len(body) // 2
    before = statistics.median(v for _, v in body[:half])
    k = max(3, len(body) // 5)
    recent = statistics.median(v for _, v in body[-k:])
    if before <= 0 or recent >= (1 - THROUGHPUT_DROP) * before:
        return []
    since = next((s for s, v in body[half:] if v < (1 - THROUGHPUT_DROP) * before), body[-k][0])
    hint = _throttle_hint(r)
    return [Finding("throughput", "warning",
                    f"Throughput dropped from {fmt_rate(before)} to {fmt_rate(recent)} tokens/s "
                    f"(−{100 * (1 - recent / before):.0f} %) since about step {since:,}.",
                    (hint + " " if hint else "") + "Look for another process on the same GPU, thermal or power "
                    "throttling, a slow or full disk, or swapping (RAM); restarting from the last checkpoint "
                    "clears memory fragmentation.")]


def check_cpu_precision(r: RunReader) -> list[Finding]:
    """A run training in fp32 on this machine's CPU, where bf16 is the faster choice (`runtime.cpu_bf16_faster`)."""
    import socket

    from ..runtime import cpu_bf16_faster

    m, train = r.manifest, r.config.get("train") or {}
    if str(m.get("device")) != "cpu" or m.get("host") != socket.gethostname() or train.get("precision") not in (
            "auto", "fp32", None):
        return []
    faster = cpu_bf16_faster()
    if faster is None:
        return []
    return [Finding("cpu_bf16", "note", f"This run trains in fp32 on a CPU where bf16 is faster ({faster}).",
                    "train.precision=bf16 runs the matmuls in bf16 under autocast (the scan, SWELU and the loss stay "
                    "fp32): faster here, with loss curves within noise of fp32 (docs/benchmarks.md, "
                    "bench/bench_profile.py --compare). `lmlab resume RUN train.precision=bf16` switches this run.")]


def _recent_system(r: RunReader) -> list[dict]:
    return r.system[-SYSTEM_WINDOW:]


def _per_gpu(recs: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for rec in recs:
        for g in rec.get("gpus") or []:
            key = str(g.get("uuid") or g.get("index"))
            by.setdefault(key, []).append(g)
    return by


def _label(g: dict) -> str:
    return f"GPU {g.get('index', '?')}" + (f" ({g['name']})" if g.get("name") else "")


def _throttle_hint(r: RunReader) -> str:
    out = []
    for samples in _per_gpu(_recent_system(r)).values():
        reasons = [set(g.get("throttle") or []) - BENIGN_THROTTLE for g in samples]
        hit = [x for x in reasons if x]
        if hit and len(hit) >= len(samples) / 2:
            names = sorted(set().union(*hit))
            out.append(f"{_label(samples[-1])} reports {', '.join(names)} throttling")
    return "; ".join(out) + "." if out else ""


def check_system(r: RunReader) -> list[Finding]:
    recs = _recent_system(r)
    if len(recs) < 3:
        return []
    out = []
    per = _per_gpu(recs)
    low, full, hot = [], [], []
    for samples in per.values():
        utils = [num(g.get("util")) for g in samples if finite(num(g.get("util")))]
        if len(utils) >= 3 and statistics.fmean(utils) < GPU_UTIL_LOW:
            low.append((samples[-1], statistics.fmean(utils)))
        fr = [num(g.get("mem_used")) / num(g.get("mem_total")) for g in samples
              if finite(num(g.get("mem_used"))) and finite(num(g.get("mem_total"))) and num(g.get("mem_total")) > 0]
        if fr and max(fr) >= MEM_HIGH:
            full.append((samples[-1], max(fr)))
        reasons = [set(g.get("throttle") or []) - BENIGN_THROTTLE for g in samples]
        hit = [x for x in reasons if x]
        if hit and len(hit) >= len(samples) / 2:
            hot.append((samples[-1], sorted(set().union(*hit)), len(hit) / len(samples)))
    if low:
        gpus = ", ".join(f"{_label(g)} {u:.0f} %" for g, u in low)
        cpu = [num(x.get("cpu_percent")) for x in recs if finite(num(x.get("cpu_percent")))]
        cpu_txt = f" while the CPUs are {statistics.fmean(cpu):.0f} % busy" if cpu else ""
        out.append(Finding("gpu_util", "warning",
                           f"GPU utilisation is low: {gpus} on average over the last {len(recs)} samples{cpu_txt}. "
                           f"The run is input-bound: the GPU waits for data or for the host.",
                           "Pre-tokenize the data (lmlab reads memory-mapped shards), raise the micro-batch size, "
                           "use more data-loader workers, and avoid host syncs (.item(), printing) every step."))
    if full:
        gpus = ", ".join(f"{_label(g)} {100 * f:.0f} % of {fmt_bytes(num(g.get('mem_total')))}" for g, f in full)
        out.append(Finding("gpu_memory", "warning", f"GPU memory is nearly full: {gpus}.",
                           "One longer batch or a fragmented allocator will raise out-of-memory. Lower the "
                           "micro-batch size (keep the global batch with more gradient accumulation), or enable "
                           "activation checkpointing."))
    if hot:
        gpus = "; ".join(f"{_label(g)}: {', '.join(n)} in {100 * f:.0f} % of samples, "
                         f"{fmt_num(num(g.get('temp')), 3)} °C, {fmt_num(num(g.get('power_w')), 3)} W"
                         for g, n, f in hot)
        out.append(Finding("throttle", "warning", f"GPU clocks are being held back: {gpus}.",
                           "Check cooling and airflow (thermal) or the power limit (power cap); a throttled GPU "
                           "also slows every other rank of the run."))
    ram = [(num(x.get("ram_used")), num(x.get("ram_total"))) for x in recs]
    ram = [u / t for u, t in ram if finite(u) and finite(t) and t > 0]
    if ram and max(ram) >= MEM_HIGH:
        total = num(recs[-1].get("ram_total"))
        out.append(Finding("ram", "warning", f"Host memory is {100 * max(ram):.0f} % used (of {fmt_bytes(total)}).",
                           "The machine will swap or the kernel will kill the run. Use fewer data-loader workers, "
                           "memory-mapped data, or stop other jobs on this machine."))
    return out


def _save_every(r: RunReader) -> int | None:
    v = (r.config.get("train") or {}).get("save_every") if isinstance(r.config, dict) else None
    return int(v) if isinstance(v, (int, float)) and v > 0 else None


def check_checkpoints(r: RunReader, now: float) -> list[Finding]:
    s = r.state
    if s.status not in ("running", "stopped", "failed"):
        return []
    ckpts = checkpoints(r.path)
    every = _save_every(r)
    sps = s.steps_per_s
    interval = every / sps if every and sps else None
    if not ckpts:
        overdue = (every is not None and s.step > every) or (every is None and (s.elapsed_s or 0) > STALE_DEFAULT_S)
        if not overdue:
            return []
        sev = "error" if s.status == "failed" or s.alive is False else "warning"
        expect = f" although train.save_every is {every:,}" if every else ""
        return [Finding("no_checkpoint", sev,
                        f"No complete checkpoint at step {s.step:,}{expect}: a crash now loses the whole run.",
                        "Check train.log for save errors and the disk (free space, permissions); a folder "
                        "checkpoints/step-… without MANIFEST.json is an interrupted save.")]
    if s.status != "running" or s.alive is False:
        return []
    age = s.checkpoint_age_s or 0.0
    limit = max(STALE_FLOOR_S, STALE_FACTOR * interval) if interval else STALE_DEFAULT_S
    if age <= limit:
        return []
    expect = f"; at {sps:.2f} steps/s and train.save_every {every:,} one is due every {fmt_duration(interval)}" \
        if interval else ""
    return [Finding("stale_checkpoint", "warning",
                    f"The last checkpoint ({ckpts[-1].name}) is {fmt_duration(age)} old at step {s.step:,}{expect}.",
                    "Saving has stopped working or the loop is stuck: look at the end of train.log, the disk "
                    "space, and whether the process still advances (`lmlab status`).")]


def check_disk(r: RunReader) -> list[Finding]:
    s = r.state
    if s.disk_free is None or not s.disk_total:
        return []
    ckpts = checkpoints(r.path)
    size = dir_size(ckpts[-1].path) if ckpts else 0
    frac = s.disk_free / s.disk_total
    if frac >= DISK_LOW_FRACTION and s.disk_free >= DISK_CHECKPOINTS * size:
        return []
    need = f"; one checkpoint takes {fmt_bytes(size)}" if size else ""
    sev = "error" if size and s.disk_free < size else "warning"
    return [Finding("disk", sev, f"The disk holding the run is nearly full: {fmt_bytes(s.disk_free)} free of "
                                 f"{fmt_bytes(s.disk_total)} ({100 * frac:.1f} %){need}.",
                    "Free space now (old runs, caches) or lower train.keep_last; a save that fails for lack of "
                    "space stops the run.")]


def check_alive(r: RunReader, now: float) -> list[Finding]:
    s = r.state
    if s.status != "running" or s.alive is not False:
        return []
    last = f"; its last record is {fmt_duration(now - s.last_record)} old" if s.last_record else ""
    frm = f" from {s.last_checkpoint}" if s.last_checkpoint else " (there is no checkpoint: it starts over)"
    return [Finding("dead", "error",
                    f"run.json says running but its process (pid {s.pid} on {s.host}) is gone{last}. "
                    f"It crashed, was killed, or the machine restarted.",
                    f"Look at the end of train.log for the reason, then continue{frm}: `lmlab resume {r.path}`.")]


def diagnose(run: str | Path | RunReader, now: float | None = None) -> list[Finding]:
    """All findings for one run, most severe first. [] for a healthy run."""
    r = run if isinstance(run, RunReader) else RunReader(run)
    now = time.time() if now is None else now
    r.refresh(now)
    out: list[Finding] = []
    out += check_alive(r, now)
    out += check_nan(r)
    out += check_spikes(r)
    if not any(f.code in ("nan", "guard_stop") for f in out):
        out += check_trend(r)
    out += check_overfitting(r)
    out += check_throughput(r)
    out += check_system(r)
    out += check_checkpoints(r, now)
    out += check_disk(r)
    out += check_cpu_precision(r)
    order = {"error": 0, "warning": 1, "note": 2}
    rank = {c: i for i, c in enumerate(CODES)}
    return sorted(out, key=lambda f: (order.get(f.severity, 3), rank.get(f.code, len(CODES))))


def text_report(r: RunReader, findings: list[Finding]) -> str:
    s = r.state
    head = f"{s.name}: {status_word(s)}, step {s.step:,}" + (f"/{s.total_steps:,}" if s.total_steps else "")
    if s.loss_smooth is not None:
        head += f", loss {fmt_num(s.loss_smooth)}"
    if s.val_loss is not None:
        head += f", val loss {fmt_num(s.val_loss)}"
    lines = [head]
    if s.stop_reason and s.status in ENDED_EARLY and not any(f.code in ("nan", "guard_stop") for f in findings):
        lines.append(f"  {s.status:<7} {s.stop_reason}" + (f"; continue with: {s.resume_command}"
                                                            if s.resume_command else ""))
    if not findings:
        lines.append("  ok  no problems found")
    for f in findings:
        lines.append(f"  {f.severity:<7} {f.message}")
        lines.append(f"          → {f.advice}")
    return "\n".join(lines)
