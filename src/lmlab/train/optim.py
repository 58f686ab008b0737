"""The optimizer (`train.optimizer`) with weight decay on matrices only, and the learning-rate schedules.

    adamw   torch AdamW: decoupled weight decay (p ← p − lr·wd·p, apart from the gradient); fused (one kernel over
            each parameter: on the CPU about 3.5× faster than the for-each form) on CUDA and the CPU, the for-each
            implementation (one op over every parameter at a time) elsewhere
    sgd     torch SGD with heavy-ball momentum `train.momentum` (0: plain SGD); its weight decay is SGD's own,
            coupled: wd·p is added to the gradient before the momentum (classic L2), on the same groups

Both leave biases, norms and the listed scalars/vectors without decay (`param_groups`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# parameter names (last component) that never decay, besides biases and norm weights
_NO_DECAY_NAMES = {"A_log", "D", "k_raw", "lam", "mu", "gamma", "phi"}


def _no_decay(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf in _NO_DECAY_NAMES or param.ndim < 2:
        return True  # biases, norms (1-D), SSM A_log/D, SWELU k/λ and other scalars/vectors
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay on matrices only, unless the model's config asks for decay on every parameter (the originals'
    recipe, `decay_all_parameters`)."""
    decay_all = bool(getattr(getattr(model, "config", None), "decay_all_parameters", False))
    decay, no_decay, seen = [], [], set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            (no_decay if not decay_all and _no_decay(full, p, module) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("adamw", "sgd")
FUSED_ADAMW_ON = ("cuda", "cpu")  # device types whose AdamW is torch's fused kernel


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float, device: torch.device, *, kind: str = "adamw",
                   momentum: float = 0.0) -> torch.optim.Optimizer:
    """`kind` adamw (fused on CUDA and the CPU, for-each elsewhere) or sgd."""
    groups = param_groups(model, weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}; one of {', '.join(OPTIMIZERS)}")
    fused = device.type in FUSED_ADAMW_ON
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True)


def make_optimizer_from(model: nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `train.*` (a TrainConfig) asks for."""
    return make_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps, device, kind=t.optimizer,
                          momentum=t.momentum)


def warmup_steps(warmup: int, total: int) -> int:
    """The warm-up actually used: `train.warmup_steps`, at most a tenth of the run (at least 1 step when asked
    for), so a short run is not spent warming up."""
    return min(warmup, max(1, total // 10)) if warmup > 0 else 0


def lr_at(step: int, *, lr: float, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """LR for optimizer step `step` (0-based): linear warmup (capped by `warmup_steps`), then cosine / linear
    decay / constant."""
    warmup = warmup_steps(warmup, total)
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    min_lr = lr * min_ratio
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return lr - (lr - min_lr) * progress
    raise ValueError(f"unknown schedule {schedule!r}")
