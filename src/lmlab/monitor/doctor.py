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

from .gpu import BENIGN_THROTTLE
from .runread import RunReader, dir_size, finite, list_checkpoints, num
from .status import fmt_bytes, fmt_duration, fmt_num, fmt_rate

SPIKE_WINDOW = 32           # records in the rolling window a loss is compared against
SPIKE_MIN_HISTORY = 8       # records before spike detection starts
SPIKE_SIGMA = 6.0           # a spike is above mean + 6σ of the window ...
SPIKE_MIN_RATIO = 1.15      # ... and at least 15 % above the window mean
RISE_RATIO = 1.10           # smoothed loss 10 % above its minimum: rising
STALL_RATIO = 0.98          # recent loss still above 98 % of the starting loss: not learning
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


@dataclass
class Finding:
    code: str       # nan, spikes, rising, stalled, plateau, overfitting, gap, throughput, gpu_util, gpu_memory,
    #                 ram, throttle, no_checkpoint, stale_checkpoint, disk, dead
    severity: str   # error | warning | note
    message: str    # what is happening, with numbers
    advice: str     # what to do about it

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "message": self.message, "advice": self.advice}


def _train_losses(r: RunReader) -> list[tuple[int, float]]:
    return [(int(num(x.get("step")) or 0), num(x.get("loss"))) for x in r.train if num(x.get("loss")) is not None]


def check_nan(r: RunReader) -> list[Finding]:
    bad = None
    for x in r.train:
        for key in ("loss", "grad_norm"):
            v = num(x.get(key))
            if v is not None and not math.isfinite(v):
                bad = bad or (int(num(x.get("step")) or 0), key, v)
    for e in r.events:
        if e.get("event") == "diverged" and bad is None:
            bad = (int(num(e.get("step")) or 0), "loss", num(e.get("loss")))
    if bad is None:
        return []
    step, key, v = bad
    before = [c for c in list_checkpoints(r.path) if c.step < step]
    lrs = [num(x.get("lr")) for x in r.train if finite(num(x.get("lr")))]
    lr = max(lrs) if lrs else None
    where = f"checkpoint {before[-1].name}" if before else "the start (no checkpoint before it)"
    cmd = f"lmlab resume {r.path}" + (f" train.lr={lr / 2:.3g}" if lr else "")
    return [Finding("nan", "error", f"{key.replace('_', ' ')} became {v} at step {step:,}.",
                    f"Resume from {where} with half the peak learning rate: `{cmd}`. If it recurs, lengthen "
                    f"train.warmup_steps, set train.grad_clip (e.g. 1.0) or train in bf16 rather than fp16.")]


def _spikes(points: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    window: list[float] = []
    out = []
    for step, v in points:
        if not math.isfinite(v):
            continue
        if len(window) >= SPIKE_MIN_HISTORY:
            mean = statistics.fmean(window)
            sd = statistics.pstdev(window)
            if v > mean + SPIKE_SIGMA * sd and v > SPIKE_MIN_RATIO * mean:
                out.append((step, v, mean))
                continue  # a spike never enters the window
        window.append(v)
        if len(window) > SPIKE_WINDOW:
            window.pop(0)
    return out


def check_spikes(r: RunReader) -> list[Finding]:
    found = []
    for key, label in (("loss", "loss"), ("grad_norm", "grad norm")):
        pts = [(int(num(x.get("step")) or 0), num(x.get(key))) for x in r.train if num(x.get(key)) is not None]
        sp = _spikes(pts)
        if sp:
            worst = max(sp, key=lambda t: t[1] / max(t[2], 1e-12))
            steps = ", ".join(f"{s:,}" for s, _, _ in sp[:5]) + (" …" if len(sp) > 5 else "")
            found.append((label, sp, worst, steps))
    if not found:
        return []
    msg = "; ".join(f"{len(sp)} {label} spike(s) at step(s) {steps} (worst {fmt_num(w[1])} against a recent mean "
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
    k = max(3, len(pts) // 10)
    first = statistics.fmean(v for _, v in pts[:k])
    last = statistics.fmean(v for _, v in pts[-k:])
    if last >= STALL_RATIO * first:
        out.append(Finding("stalled", "warning",
                           f"Loss is not falling: {first:.3f} over the first {k} logs, {last:.3f} over the last {k} "
                           f"(step {steps[-1]:,}, {100 * (1 - last / first):+.1f} %).",
                           "Nothing is being learned. Check the learning rate (too small, or 0 after "
                           "warmup), that the data is tokenized as expected and not constant, and that the "
                           "parameters are trainable."))
    return out


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
    ckpts = list_checkpoints(r.path)
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
    ckpts = list_checkpoints(r.path)
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
    if not any(f.code == "nan" for f in out):
        out += check_trend(r)
    out += check_overfitting(r)
    out += check_throughput(r)
    out += check_system(r)
    out += check_checkpoints(r, now)
    out += check_disk(r)
    order = {"error": 0, "warning": 1, "note": 2}
    return sorted(out, key=lambda f: order.get(f.severity, 3))


def text_report(r: RunReader, findings: list[Finding]) -> str:
    s = r.state
    head = f"{s.name}: {s.status}, step {s.step:,}" + (f"/{s.total_steps:,}" if s.total_steps else "")
    if s.loss_smooth is not None:
        head += f", loss {fmt_num(s.loss_smooth)}"
    if s.val_loss is not None:
        head += f", val loss {fmt_num(s.val_loss)}"
    lines = [head]
    if not findings:
        lines.append("  ok  no problems found")
    for f in findings:
        lines.append(f"  {f.severity:<7} {f.message}")
        lines.append(f"          → {f.advice}")
    return "\n".join(lines)
