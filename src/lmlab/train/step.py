"""One optimizer step, in two halves so a guard can decide between them:

    result = compute_gradients(model, objective, micro_batches, rt, ...)   forward + backward, clipped norm
    apply_update(optimizer, scaler)   or   discard_update(optimizer)       the update, or none at all

The loss of the step is the sum over every micro-batch and rank divided by the total number of target
units (tokens, pairs) of the step, so masked or short micro-batches weigh what their targets weigh. The
trainer, `lmlab estimate --measure` and the benchmarks all step through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime import Runtime
from . import strategies
from .objectives import Batch, Objective
from .strategies.base import Strategy


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss per target unit over the whole step (all micro-batches and ranks), detached
    count: torch.Tensor  # target units in the step, all ranks
    grad_norm: torch.Tensor  # total gradient norm before clipping
    metrics: dict[str, torch.Tensor]  # objective metrics, normalised like the loss


def compute_gradients(model, objective: Objective, batches: list[Batch], rt: Runtime, *,
                      optimizer=None, scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0,
                      wrapped=None, strategy: Strategy | None = None) -> StepResult:
    """Forward and backward over `batches` (this rank's micro-batches), then unscale and clip.

    `wrapped` is the model as a parallel strategy wraps it (DDP, a DeepSpeed engine): it runs forward/backward,
    while `model` owns the parameters. Gradients are left in `.grad` (DeepSpeed: in its ZeRO buffers) for the
    update, which sees them clipped (the strategy may fold the clip into it); the strategy's step hooks
    (`lmlab.train.strategies`) do what differs between strategies. `strategy`: the one that placed `model` (by
    default the one that prepared it).
    """
    wrapped = wrapped if wrapped is not None else model
    strategy = strategy if strategy is not None else strategies.of(model)
    batches = [{k: v.to(rt.device, non_blocking=True) for k, v in b.items()} for b in batches]
    count = rt.all_reduce_sum(torch.stack([objective.count(b) for b in batches]).sum().to(torch.float32))
    # DDP averages gradients over ranks; the sum over ranks / global count needs world_size × that mean
    scale = rt.world_size / count.clamp(min=1)
    loss_sum = torch.zeros((), device=rt.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with strategy.no_sync(wrapped, last):
            with rt.autocast():
                loss, metrics = objective.loss(wrapped, batch)
            scaled = loss * scale
            strategy.backward(wrapped, scaler.scale(scaled) if scaler is not None else scaled, last)
        loss_sum += loss.detach().float()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
    if scaler is not None:
        scaler.unscale_(optimizer)  # fp16: clip the true gradients
    grad_norm = strategy.clip(model, wrapped, grad_clip)  # deepspeed: its norm; it clips in its step
    total = rt.all_reduce_sum(torch.stack([loss_sum, *metric_sums.values()])) / count.clamp(min=1)
    return StepResult(loss=total[0], count=count, grad_norm=grad_norm.detach(),
                      metrics=dict(zip(metric_sums, total[1:], strict=True)))


def apply_update(optimizer, scaler: torch.amp.GradScaler | None = None, skip: torch.Tensor | None = None, *,
                 strategy: Strategy | None = None) -> None:
    """The update. `skip`, a device flag from `guard.DeviceGuard` (1.0: do not apply), is obeyed by the fused
    optimizer step itself (`found_inf`), so deciding needs no host synchronisation. DeepSpeed: the engine
    clips, steps its partitions and all-gathers the weights."""
    (strategy if strategy is not None else strategies.of(optimizer)).step(optimizer, scaler, skip)


def discard_update(optimizer, scaler: torch.amp.GradScaler | None = None, *,
                   strategy: Strategy | None = None) -> None:
    """Skip this step: parameters and optimizer state stay exactly as they were (DeepSpeed: the gradients in its
    buffers are dropped too)."""
    (strategy if strategy is not None else strategies.of(optimizer)).discard(optimizer, scaler)
