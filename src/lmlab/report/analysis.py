"""Numbers derived across runs: seed groups (mean ± std), power-law fits, budget comparisons, prices."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .collect import BUDGET_KEYS, Run


@dataclass
class Group:
    label: str
    runs: list[Run]

    def values(self, fn) -> list[float]:
        out = []
        for r in self.runs:
            v = fn(r)
            if isinstance(v, int | float) and math.isfinite(v):
                out.append(float(v))
        return out


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1); std is None for fewer than two values."""
    if not values:
        return None, None
    m = float(np.mean(values))
    return m, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def seed_groups(runs: list[Run]) -> list[Group]:
    """Runs whose configs differ only by train.seed (and names, folders, threads) form one group."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.config_key(), []).append(r)
    return [Group(_common_label([r.name for r in rs]), rs) for rs in groups.values()]


def _common_label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    prefix = re.sub(r"[-_.]*(s|seed)?$", "", prefix)
    return prefix or names[0]


@dataclass
class PowerLaw:
    """L = a · T^(−alpha) [· N^(−beta)], fit by least squares in log space."""

    a: float
    alpha: float
    beta: float | None
    r2: float
    n: int

    def predict(self, tokens, params=None):
        out = self.a * np.asarray(tokens, dtype=float) ** (-self.alpha)
        if self.beta is not None and params is not None:
            out = out * np.asarray(params, dtype=float) ** (-self.beta)
        return out

    def formula(self) -> str:
        s = f"L = {self.a:.4g} · T^(−{self.alpha:.4g})"
        return s + (f" · N^(−{self.beta:.4g})" if self.beta is not None else "")


def fit_power_law(tokens: list[float], losses: list[float], params: list[float] | None = None) -> PowerLaw | None:
    """Fit final loss against tokens (and parameters, when they vary). None when there are too few distinct
    points: two token counts for L(T), three runs and two sizes for L(T, N)."""
    t, y = np.asarray(tokens, float), np.asarray(losses, float)
    ok = (t > 0) & (y > 0) & np.isfinite(t) & np.isfinite(y)
    use_n = params is not None and len({p for p, k in zip(params, ok) if k}) >= 2
    if use_n:
        n = np.asarray(params, float)
        ok &= n > 0
    if use_n and (ok.sum() < 3 or len(np.unique(n[ok])) < 2):
        use_n = False
    if len(np.unique(t[ok])) < 2:
        return None
    cols = [np.ones(ok.sum()), -np.log(t[ok])] + ([-np.log(n[ok])] if use_n else [])
    x = np.stack(cols, axis=1)
    ly = np.log(y[ok])
    if np.linalg.matrix_rank(x) < x.shape[1]:
        return None
    coef, *_ = np.linalg.lstsq(x, ly, rcond=None)
    if not np.all(np.isfinite(coef)) or abs(coef[0]) > 700:  # ill-conditioned: nearly equal budgets or sizes
        return None
    pred = x @ coef
    ss_res = float(((ly - pred) ** 2).sum())
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLaw(a=float(math.exp(coef[0])), alpha=float(coef[1]), beta=float(coef[2]) if use_n else None,
                    r2=r2, n=int(ok.sum()))


def budget_groups(runs: list[Run]) -> list[list[Run]]:
    """Sets of runs that differ only in their token budget (and seed), with at least two budgets, by tokens."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.config_key(ignore=BUDGET_KEYS), []).append(r)
    out = []
    for rs in groups.values():
        if len({r.tokens for r in rs}) >= 2:
            out.append(sorted(rs, key=lambda r: (r.tokens or 0, r.name)))
    return out


def resolve_price(price: float | None = None, hardware: str | None = None, run_hardware: str | None = None
                  ) -> tuple[float | None, str]:
    """Price per GPU-hour and where it came from: the given price, else the planner's table for `hardware` (or
    the run's recorded GPU), else None."""
    from ..plan.hardware import HARDWARE

    if price is not None:
        if price < 0:
            raise ConfigError(f"--price-per-hour: must be >= 0, got {price}")
        return float(price), "given"
    for name in (hardware, run_hardware):
        if not name:
            continue
        if str(name).lower() == "cpu":
            return None, "cpu (no GPU-hour price)"
        hw = HARDWARE.get(str(name).lower())
        if hw is None:
            hw = next((h for h in HARDWARE.values() if h.label.lower() == str(name).lower()), None)
        if hw is None and name == hardware:
            raise ConfigError(f"--gpu: unknown hardware {name!r}; choose from {', '.join(HARDWARE)}")
        if hw is not None:
            return hw.price_per_hour, f"{hw.name} (planner table)"
    return None, "unknown"
