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

Each check reads two scalars on the host: one synchronisation per step while the guard is on.
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
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        if len(self.losses) < self.warmup:
            return None
        for name, value, history in (("loss", loss, self.losses), ("gradient norm", grad_norm, self.norms)):
            mean = sum(history) / len(history)
            std = math.sqrt(sum((h - mean) ** 2 for h in history) / len(history))
            limit = mean + self.sigma * max(std, 0.01 * abs(mean))  # a floor: a flat history is no hair trigger
            if value > limit:
                return f"{name} spike: {value:.4g} > {limit:.4g} (mean {mean:.4g} + {self.sigma:g}σ of the last " \
                       f"{len(history)} steps)"
        return None
