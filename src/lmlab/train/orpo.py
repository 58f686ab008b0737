"""Odds-ratio preference optimisation (`train.objective=orpo`; Hong, Lee and Thorne, 2024, "ORPO: Monolithic
Preference Optimization without Reference Model"): supervised loss on the chosen reply plus a penalty that
raises the odds of the chosen reply over the rejected one, in one stage, without a reference model.

With ℓ(y|x) the length-averaged log-probability of a reply and odds(y) = p/(1 − p) for p = exp(ℓ):

    log_odds = (ℓ(y_w) − ℓ(y_l)) − (log(1 − exp ℓ(y_w)) − log(1 − exp ℓ(y_l)))
    loss = −ℓ(y_w) − λ·log σ(log_odds)                               λ = finetune.orpo_lambda (paper, TRL: 0.1)

The NLL term is the chosen reply's mean per token, summed over pairs (TRL averages it over every chosen
token of the batch instead; the two agree when replies have one length). Metrics (sums over pairs), named
as TRL's ORPOTrainer: rewards/chosen = λ·ℓ(y_w), rewards/rejected = λ·ℓ(y_l), rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, nll_loss, log_odds_ratio (log σ(log_odds)), log_odds_chosen.
Data: as DPO's (lmlab.train.dpo).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ipo import PairObjective, pair_metrics
from .objectives import Batch


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate near 0 and far below it (Mächler, 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_terms(avg_w: torch.Tensor, avg_l: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, summed metrics) from per-pair length-averaged log-probabilities (b,)."""
    log_odds = (avg_w - avg_l) - (log1mexp(avg_w) - log1mexp(avg_l))
    ratio = F.logsigmoid(log_odds)
    nll = -avg_w
    loss = (nll - lam * ratio).sum()
    metrics = pair_metrics(lam, avg_w, avg_l, avg_w, avg_l)
    metrics.update({"nll_loss": nll.detach().sum(), "log_odds_ratio": ratio.detach().sum(),
                    "log_odds_chosen": log_odds.detach().sum()})
    return loss, metrics


class ORPO(PairObjective):
    name = "orpo"
    uses_reference = False

    def hyper(self) -> dict[str, float]:
        return {"lambda": self.cfg.finetune.orpo_lambda}

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy, n, _ = self.pair_logps(model, batch, reference=False)
        b = batch["chosen_input_ids"].shape[0]
        avg = policy / n.clamp(min=1)
        return orpo_terms(avg[:b], avg[b:], self.cfg.finetune.orpo_lambda)
