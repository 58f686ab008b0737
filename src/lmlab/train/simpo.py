"""Simple preference optimisation (`train.objective=simpo`; Meng, Xia and Chen, 2024, "SimPO: Simple Preference
Optimization with a Reference-Free Reward"): the implicit reward is the length-averaged log-probability of a
reply, scaled by β, and the chosen reply must win by a margin γ. No reference model.

    ℓ(y|x) = log π_θ(y|x) / |y|                                    (reply tokens and end-of-turn)
    loss = −log σ(β·ℓ(y_w) − β·ℓ(y_l) − γ)                          β = finetune.simpo_beta, γ = finetune.simpo_gamma

Defaults as the paper's: β = 2.0, γ/β = 0.5 (γ = 1.0), the same numbers as TRL's CPOTrainer with
loss_type="simpo", simpo_gamma=γ, cpo_alpha=0. Metrics (sums over pairs): rewards/chosen = β·ℓ(y_w),
rewards/rejected = β·ℓ(y_l), rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (ℓ).
Data: as DPO's (lmlab.train.dpo).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ipo import PairObjective, pair_metrics
from .objectives import Batch


def simpo_terms(avg_w: torch.Tensor, avg_l: torch.Tensor, beta: float,
                gamma: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, summed metrics) from per-pair length-averaged log-probabilities (b,)."""
    loss = -F.logsigmoid(beta * (avg_w - avg_l) - gamma).sum()
    return loss, pair_metrics(beta, avg_w, avg_l, avg_w, avg_l)


class SimPO(PairObjective):
    name = "simpo"
    uses_reference = False

    def hyper(self) -> dict[str, float]:
        return {"beta": self.cfg.finetune.simpo_beta, "gamma": self.cfg.finetune.simpo_gamma}

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy, n, _ = self.pair_logps(model, batch, reference=False)
        b = batch["chosen_input_ids"].shape[0]
        avg = policy / n.clamp(min=1)
        return simpo_terms(avg[:b], avg[b:], self.cfg.finetune.simpo_beta, self.cfg.finetune.simpo_gamma)
