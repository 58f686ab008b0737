"""The step guard: before an update is applied, judge the step's loss and gradient norm.

    verdict = guard.check(step, loss, grad_norm)    → apply | skip | rollback | stop

Non-finite values are never applied and never enter the statistics. A spike is a loss or gradient norm
above mean + `sigma`·std (std at least 1 % of the mean) of the last `window` applied steps, once `warmup`
steps are in the window (defaults as OLMo-core: 6σ over 128 steps, active after 64). What a bad step
leads to is `train.guard`:

    skip      the update is not applied (parameters and optimizer state stay bitwise as they were);
              after `guard_max_skips` bad steps in a row the run stops
    rollback  reload the last checkpoint, multiply the LR by `guard_lr_factor`, keep the data position
              (the offending batches are not replayed); at most `guard_max_rollbacks` times, then stop
    stop      checkpoint the last good state and exit with the resume command
    off       apply everything (no checks, no host sync per step)

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
                 max_skips: int = 10, max_rollbacks: int = 3):
        self.policy, self.sigma, self.warmup = policy, sigma, warmup
        self.max_skips, self.max_rollbacks = max_skips, max_rollbacks
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.bad_in_a_row = 0
        self.rollbacks = 0

    @classmethod
    def from_config(cls, t) -> Guard:
        return cls(t.guard, window=t.guard_window, warmup=t.guard_warmup, sigma=t.guard_sigma,
                   max_skips=t.guard_max_skips, max_rollbacks=t.guard_max_rollbacks)

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

    def _problem(self, loss: float, grad_norm: float) -> str | None:
        limits = []
        if len(self.losses) >= self.warmup:
            for name, value, history in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.norms)):
                mean = sum(history) / len(history)
                std = math.sqrt(sum((h - mean) ** 2 for h in history) / len(history))
                limit = mean + self.sigma * max(std, 0.01 * abs(mean))  # a floor: a flat history is no hair trigger
                limits.append((name, value, mean, limit))
        return why_bad(loss, grad_norm, limits, self.sigma, len(self.losses))


def why_bad(loss: float, grad_norm: float, limits, sigma: float, count: int) -> str | None:
    """The guard's words for a bad step, or None: a non-finite value, else the first of `limits` ((name, value,
    mean, limit), …) exceeded. `Guard` and `DeviceGuard` both say it this way."""
    if not math.isfinite(loss):
        return f"loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm}"
    for name, value, mean, limit in limits:
        if value > limit:
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

    def _limit(self, history: torch.Tensor, filled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = self.slots < filled
        count = filled.clamp(min=1).to(torch.float64)
        mean = torch.where(mask, history, 0).sum() / count
        std = (torch.where(mask, history - mean, 0) ** 2).sum().div(count).sqrt()
        return mean, mean + self.host.sigma * torch.maximum(std, 0.01 * mean.abs())

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        g, size = self.host, self.losses.numel()
        loss, norm = loss.detach().to(torch.float64), grad_norm.detach().to(torch.float64)
        filled = self.applied.clamp(max=size)
        mean_l, lim_l = self._limit(self.losses, filled)
        mean_n, lim_n = self._limit(self.norms, filled)
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        spike = (filled >= g.warmup) & ((loss > lim_l) | (norm > lim_n))
        was_halted = self.halted.clone()
        good = finite & ~spike & ~was_halted
        slot = (self.applied % size).view(1)  # the oldest value, once the window is full
        for buf, value in ((self.losses, loss), (self.norms, norm)):
            buf.index_copy_(0, slot, torch.where(good, value, buf.index_select(0, slot)[0]).view(1))
        self.applied += good.long()
        self.streak = torch.where(good, 0, self.streak + 1)
        self.halted |= self.streak > g.max_skips
        bad = (~good).to(torch.float32)
        self.pending.append((step, torch.stack([bad.double(), loss, norm, mean_l, lim_l, mean_n, lim_n,
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
        for step, (bad, loss, norm, mean_l, lim_l, mean_n, lim_n, filled, halted) in zip(steps, rows, strict=True):
            if halted:  # after the stop: not applied, and not judged (the host guard never ran these steps)
                continue
            if not bad:
                g.bad_in_a_row = 0
                continue
            g.bad_in_a_row += 1
            reason = why_bad(loss, norm, [("loss", loss, mean_l, lim_l), ("gradient norm", norm, mean_n, lim_n)],
                             g.sigma, int(filled)) \
                or _spike("gradient norm", norm, mean_n, lim_n, g.sigma, int(filled))  # at the limit's last bit
            if g.bad_in_a_row > g.max_skips:
                reason = f"{reason}, {g.bad_in_a_row} bad steps in a row"
                verdict = Verdict("stop", reason, step=step)
            events.append((step, verdict.action if verdict.step == step else "skip", reason, loss, norm))
        return events, verdict


def skips_on_device(optimizer) -> bool:
    """Whether `optimizer.step` obeys a device flag to skip itself (`found_inf`: fused Adam/AdamW)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))
