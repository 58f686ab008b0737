"""The step guard: before an update is applied, judge the step's loss and gradient norm.

    verdict = guard.check(step, loss, grad_norm)    → apply | skip | rollback | stop

Non-finite values are never applied and never enter the statistics. A spike is a loss above mean +
`sigma`·std (std at least 1 % of the mean) of the last `window` applied steps, once `warmup` steps are in
the window (defaults as OLMo-core: 6σ over 128 steps, active after 64). A gradient norm above its own such
limit is a spike too; but where gradients are clipped (`clip` > 0: the update's size is bounded whatever the
norm) only while the loss is also above mean + `sigma`/2·std: on healthy runs most norm outliers come with an
ordinary loss (the steps after a spike, early training), and skipping them is what made the guard fire on
healthy runs (bench/guard_calibration.py, docs/training.md). What a bad step leads to is `train.guard`:

    skip      the update is not applied (parameters and optimizer state stay bitwise as they were);
              after `guard_max_skips` bad steps in a row the run stops
    rollback  back to the last good state (`LastGood`), multiply the LR by `guard_lr_factor`, keep the data
              position (the offending batches are not replayed); at most `guard_max_rollbacks` times, then stop
    stop      checkpoint the last good state and exit with the resume command
    off       apply everything (no checks, no host sync per step)

The last good state is the newest one whose next loss was judged good: the one before the last applied
update (an update is judged by the loss before it, so a destructive one passes and the step after it is the
first to look bad). `LastGood` keeps it in memory. The guard's own state (window, bad steps in a row,
rollbacks) goes into every checkpoint (`state_dict`), so a resumed run judges as the uninterrupted one.

`Guard.check` reads two scalars on the host: one synchronisation per step. With `skip` and an optimizer that
can skip on the device (fused AdamW: the trainer's optimizer on CUDA), `DeviceGuard` applies the same rule
without a host synchronisation: the window lives in device tensors, the verdict is a device flag the fused
optimizer step obeys (`found_inf`: parameters, moments and step count untouched), and what happened is read
back once per log step (`DeviceGuard.read`), where the events are written and the run stopped after too
many bad steps in a row. `tests/test_guard.py` holds the two to the same verdicts and the same weights.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

POLICIES = ("skip", "rollback", "stop", "off")


@dataclass(frozen=True)
class Verdict:
    action: str  # apply | skip | rollback | stop
    reason: str = ""
    step: int | None = None  # DeviceGuard's stop: the step it happened at (read back a few steps later)

    @property
    def apply(self) -> bool:
        return self.action == "apply"


APPLY = Verdict("apply")


class Guard:
    def __init__(self, policy: str = "skip", *, window: int = 128, warmup: int = 64, sigma: float = 6.0,
                 max_skips: int = 10, max_rollbacks: int = 3, clip: float = 0.0):
        self.policy, self.sigma, self.warmup, self.clip = policy, sigma, warmup, clip
        self.max_skips, self.max_rollbacks = max_skips, max_rollbacks
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.bad_in_a_row = 0
        self.rollbacks = 0

    @classmethod
    def from_config(cls, t) -> Guard:
        return cls(t.guard, window=t.guard_window, warmup=t.guard_warmup, sigma=t.guard_sigma,
                   max_skips=t.guard_max_skips, max_rollbacks=t.guard_max_rollbacks, clip=t.grad_clip)

    def check(self, step: int, loss: torch.Tensor | float, grad_norm: torch.Tensor | float) -> Verdict:
        if self.policy == "off":
            return APPLY
        loss, grad_norm = float(loss), float(grad_norm)
        reason = self._problem(loss, grad_norm)
        if reason is None:
            self.bad_in_a_row = 0
            self.losses.append(loss)
            self.norms.append(grad_norm)
            return APPLY
        self.bad_in_a_row += 1
        if self.policy == "stop":
            return Verdict("stop", reason)
        if self.policy == "rollback":
            if self.rollbacks >= self.max_rollbacks:
                return Verdict("stop", f"{reason}, after {self.rollbacks} rollbacks")
            self.rollbacks += 1
            self.losses.clear()
            self.norms.clear()
            return Verdict("rollback", reason)
        if self.bad_in_a_row > self.max_skips:
            return Verdict("stop", f"{reason}, {self.bad_in_a_row} bad steps in a row")
        return Verdict("skip", reason)

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so a resumed run judges its next steps as the uninterrupted one would:
        the window (oldest first), the bad steps in a row and the rollbacks taken."""
        return {"losses": list(self.losses), "norms": list(self.norms), "bad_in_a_row": self.bad_in_a_row,
                "rollbacks": self.rollbacks}

    def clear_streak(self) -> None:
        """Forget the bad steps in a row (what a stop saves: its resume counts afresh)."""
        self.bad_in_a_row = 0

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.norms.clear()
        self.losses.extend(float(v) for v in state["losses"])
        self.norms.extend(float(v) for v in state["norms"])
        self.bad_in_a_row, self.rollbacks = int(state["bad_in_a_row"]), int(state["rollbacks"])

    def _problem(self, loss: float, grad_norm: float) -> str | None:
        limits, gate = [], None
        if len(self.losses) >= self.warmup:
            for name, value, history in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.norms)):
                mean = sum(history) / len(history)
                std = max(math.sqrt(sum((h - mean) ** 2 for h in history) / len(history)), 0.01 * abs(mean))
                limits.append((name, value, mean, mean + self.sigma * std))  # std's floor: no hair trigger
                if name == "loss" and self.clip > 0:
                    gate = mean + self.sigma / 2 * std
        return why_bad(loss, grad_norm, limits, self.sigma, len(self.losses), gate)


def why_bad(loss: float, grad_norm: float, limits, sigma: float, count: int, gate: float | None = None) -> str | None:
    """The guard's words for a bad step, or None: a non-finite value, else the first of `limits` ((name, value,
    mean, limit), …) exceeded; the gradient norm's only with the loss above `gate` (None: always). `Guard`
    and `DeviceGuard` both say it this way."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    for name, value, mean, limit in limits:
        if value > limit and (name == "loss" or gate is None or loss > gate):
            return _spike(name, value, mean, limit, sigma, count)
    return None


def _spike(name: str, value: float, mean: float, limit: float, sigma: float, count: int) -> str:
    return f"{name} spike: {value:.4g} > {limit:.4g} (mean {mean:.4g} + {sigma:g}σ of the last {count} steps)"


class DeviceGuard:
    """`Guard` with policy `skip`, decided on the device (no host synchronisation per step).

        bad = guard.check(step, loss, grad_norm)     a 0-d float tensor, 1.0 = do not apply
        apply_update(optimizer, skip=bad)            the fused optimizer step skips itself where bad is 1
        events, verdict = guard.read()               at log steps: (step, action, reason, loss, grad_norm)
                                                     of each bad step since the last read, and `stop`

    The verdicts are `Guard`'s (its sums are taken in another order: a value within the last bit of the limit
    may fall the other way). One difference of timing: more than `max_skips` bad steps in a row stop the run
    when they are read back, a few steps after the host guard would have stopped; from that step on nothing
    is applied, so the weights and optimizer state saved are the same last good ones, and the stop names the
    step it happened at.
    """

    def __init__(self, guard: Guard, device: torch.device):
        if guard.policy != "skip":
            raise ValueError(f"DeviceGuard decides skip only, not {guard.policy}")
        self.host = guard  # its settings and its count of bad steps in a row
        n = guard.losses.maxlen
        self.losses = torch.zeros(n, dtype=torch.float64, device=device)
        self.norms = torch.zeros(n, dtype=torch.float64, device=device)
        self.applied = torch.zeros((), dtype=torch.long, device=device)  # steps that entered the window
        self.slots = torch.arange(n, device=device)
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # bad steps in a row
        self.halted = torch.zeros((), dtype=torch.bool, device=device)  # past max_skips: nothing applies now
        self.pending: list[tuple[int, torch.Tensor]] = []

    def _limit(self, history: torch.Tensor, filled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, mean + σ·std, mean + σ/2·std) of the window."""
        mask = self.slots < filled
        count = filled.clamp(min=1).to(torch.float64)
        mean = torch.where(mask, history, 0).sum() / count
        std = torch.maximum((torch.where(mask, history - mean, 0) ** 2).sum().div(count).sqrt(), 0.01 * mean.abs())
        return mean, mean + self.host.sigma * std, mean + self.host.sigma / 2 * std

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        g, size = self.host, self.losses.numel()
        loss, norm = loss.detach().to(torch.float64), grad_norm.detach().to(torch.float64)
        filled = self.applied.clamp(max=size)
        mean_l, lim_l, gate = self._limit(self.losses, filled)
        mean_n, lim_n, _ = self._limit(self.norms, filled)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        norm_spike = (norm > lim_n) & (loss > gate) if g.clip > 0 else norm > lim_n
        spike = (filled >= g.warmup) & ((loss > lim_l) | norm_spike)
        was_halted = self.halted.clone()
        good = finite & ~spike & ~was_halted
        slot = (self.applied % size).view(1)  # the oldest value, once the window is full
        for buf, value in ((self.losses, loss), (self.norms, norm)):
            buf.index_copy_(0, slot, torch.where(good, value, buf.index_select(0, slot)[0]).view(1))
        self.applied += good.long()
        self.streak = torch.where(good, 0, self.streak + 1)
        self.halted |= self.streak > g.max_skips
        bad = (~good).to(torch.float32)
        self.pending.append((step, torch.stack([bad.double(), loss, norm, mean_l, lim_l, mean_n, lim_n, gate,
                                                filled.double(), was_halted.double()])))
        return bad

    def read(self) -> tuple[list[tuple[int, str, str, float, float]], Verdict]:
        """The bad steps since the last read, in order, with the action and reason `Guard` gives; and `stop`
        (naming its step) once more than `max_skips` steps in a row were bad, else apply. One host
        synchronisation."""
        if not self.pending:
            return [], APPLY
        steps = [s for s, _ in self.pending]
        rows = torch.stack([r for _, r in self.pending]).cpu().tolist()
        self.pending.clear()
        g, events, verdict = self.host, [], APPLY
        for step, (bad, loss, norm, mean_l, lim_l, mean_n, lim_n, gate, filled, halted) in zip(steps, rows,
                                                                                              strict=True):
            if halted:  # after the stop: not applied, and not judged (the host guard never ran these steps)
                continue
            if not bad:
                g.bad_in_a_row = 0
                continue
            g.bad_in_a_row += 1
            reason = why_bad(loss, norm, [("loss", loss, mean_l, lim_l), ("gradient norm", norm, mean_n, lim_n)],
                             g.sigma, int(filled), gate if g.clip > 0 else None) \
                or _spike("gradient norm", norm, mean_n, lim_n, g.sigma, int(filled))  # at the limit's last bit
            if g.bad_in_a_row > g.max_skips:
                reason = f"{reason}, {g.bad_in_a_row} bad steps in a row"
                verdict = Verdict("stop", reason, step=step)
            events.append((step, verdict.action if verdict.step == step else "skip", reason, loss, norm))
        return events, verdict

    def state_dict(self) -> dict:
        """`Guard.state_dict`'s fields (so either guard resumes the other's checkpoint), plus the device
        buffers as they are (slot order: a device guard resumes its own checkpoint bit for bit). Read after
        `read()`: nothing pending."""
        n = self.losses.numel()
        applied = int(self.applied)
        filled = min(applied, n)
        order = [(applied - filled + i) % n for i in range(filled)]  # oldest first
        losses, norms = self.losses.cpu(), self.norms.cpu()
        return {"losses": [float(losses[i]) for i in order], "norms": [float(norms[i]) for i in order],
                "bad_in_a_row": self.host.bad_in_a_row, "rollbacks": self.host.rollbacks,
                "device": {"losses": losses.clone(), "norms": norms.clone(), "applied": applied,
                           "streak": int(self.streak), "halted": bool(self.halted)}}

    def clear_streak(self) -> None:
        self.host.clear_streak()
        self.streak.zero_()
        self.halted.zero_()

    def load_state_dict(self, state: dict) -> None:
        self.host.load_state_dict(state)
        dev = state.get("device")
        if dev is not None and dev["losses"].numel() == self.losses.numel():
            self.losses.copy_(dev["losses"])
            self.norms.copy_(dev["norms"])
            applied, streak, halted = dev["applied"], dev["streak"], dev["halted"]
        else:  # the host guard's window (or another window size): oldest first from slot 0
            values = (list(state["losses"]), list(state["norms"]))
            k = min(len(values[0]), self.losses.numel())
            self.losses.zero_()
            self.norms.zero_()
            for buf, vals in zip((self.losses, self.norms), values, strict=True):
                buf[:k] = torch.tensor(vals[len(vals) - k:], dtype=torch.float64)
            applied, streak, halted = k, self.host.bad_in_a_row, self.host.bad_in_a_row > self.host.max_skips
        self.applied.fill_(applied)
        self.streak.fill_(streak)
        self.halted.fill_(halted)


class LastGood:
    """The newest state whose next loss the guard judged good: the weights and optimizer state before the last
    applied update, kept (on the parameters' device) until a later step confirms that update.

        keep(bad, step)  before the update of step `step + 1` is applied: the current state (after `step`
                         updates) has just been judged good, so it is the newest confirmed one (`bad`, the
                         device guard's flag: keep only where it is 0; None: the host guard applies it)
        restore()        back to it (a guard stop or rollback); False when there is none (no update applied
                         since the run started or resumed: the current state is the last good one)
        step             the step count of the state kept

    A step whose loss is bad says the state it ran on (the one after the last applied update) is not good;
    the state before that update was confirmed by that update's own loss. Costs one copy of the trainable
    weights and the optimizer state, written at every applied step (device copies, no host synchronisation).
    """

    def __init__(self, model: torch.nn.Module, optimizer):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.layout: tuple | None = None  # which optimizer state tensors the copy holds
        self.copy: list[torch.Tensor] = []
        self.kept = False
        self._step: int | torch.Tensor = 0

    @property
    def step(self) -> int:
        return int(self._step)

    def _tensors(self) -> tuple[tuple, list[torch.Tensor]]:
        """The parameters and optimizer state tensors, as this rank holds them (a sharded DTensor's local shard,
        a view: copying into it writes the parameter)."""
        layout, tensors = [], []
        for i, p in enumerate(self.params):
            tensors.append(_local(p.detach()))
            for k, v in sorted(self.optimizer.state.get(p, {}).items()):
                if torch.is_tensor(v):
                    layout.append((i, k))
                    tensors.append(_local(v))
        return tuple(layout), tensors

    @torch.no_grad()
    def keep(self, bad: torch.Tensor | None, step: int) -> None:
        layout, tensors = self._tensors()
        if layout != self.layout:  # the optimizer's state appeared (its first step): a new copy
            self.layout, self.copy = layout, [t.clone() for t in tensors]
        elif bad is None:
            torch._foreach_copy_(self.copy, tensors)
        else:
            for c, t in zip(self.copy, tensors, strict=True):
                c.copy_(torch.where(bad.to(c.device) == 0, t, c))
        if bad is None or not self.kept:
            self._step = step
        else:
            self._step = torch.where(bad == 0, step, torch.as_tensor(self._step, device=bad.device))
        self.kept = True

    @torch.no_grad()
    def restore(self) -> bool:
        if not self.kept:
            return False
        layout, tensors = self._tensors()
        if layout != self.layout:  # the state appeared after the copy (a first step skipped on the device)
            self.optimizer.state.clear()
            layout, tensors = self._tensors()
        if layout != self.layout:
            return False
        torch._foreach_copy_(tensors, self.copy)
        return True


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # DTensor (fsdp): its shard on this rank


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step` obeys a device flag to skip itself (`found_inf`): fused Adam/AdamW only (the
    device guard is held to the host guard with them; sgd is judged on the host)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and \
        bool(getattr(optimizer, "_step_supports_amp_scaling", False))
