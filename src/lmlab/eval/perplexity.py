"""Validation loss of a model under an objective: summed loss over the fixed validation batches divided
by their target count, summed over ranks. For next-token objectives this is nats per token, and
exp(loss) the perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


@torch.no_grad()
def validation_loss(model, objective, batches: Iterable[dict], rt) -> dict[str, float] | None:
    """{"val_loss": …, "val_<metric>": …} averaged per target unit over every rank's batches; None when no rank
    counted a single target (no held-out data: no value, rather than 0)."""
    was = model.training
    model.eval()
    # sums on the CPU in float64 (MPS has no float64); "loss" always present, so every rank reduces the same shape
    sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), dtype=torch.float64)}
    count = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(rt.device) for k, v in batch.items()}
        with rt.autocast():
            loss, metrics = objective.loss(model, batch)
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0) + v.detach().float().cpu().double()
        count += objective.count(batch).cpu().double()
    model.train(was)
    names = list(sums)
    total = rt.all_reduce_sum(torch.stack([count, *(sums[k] for k in names)]).to(rt.device)).cpu()
    if total[0] == 0:
        return None
    return {f"val_{k}": float(total[i + 1] / total[0]) for i, k in enumerate(names)}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
