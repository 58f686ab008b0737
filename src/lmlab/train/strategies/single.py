"""One process: the model is neither sharded nor wrapped (`train.strategy=ddp` on one process is this).

Checkpoints hold the whole model (model.safetensors) and the optimizer state in trainer.pt. The plain parts
(backward, clipping, the update, dropping a step) are what DDP and FSDP2 use too.
"""

from __future__ import annotations

import contextlib

import torch

from .base import Strategy, compile_blocks


class Single(Strategy):
    name = "single"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.cfg is not None and self.cfg.train.compile:
            compile_blocks(model)
        return self._placed(model)

    def wrap(self, model: torch.nn.Module, optimizer=None) -> torch.nn.Module:
        return model

    def no_sync(self, wrapped, last: bool):
        return contextlib.nullcontext()

    def backward(self, wrapped, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def clip(self, model: torch.nn.Module, wrapped, grad_clip: float) -> torch.Tensor:
        """The norm now; the scaling by `step`: inside torch's fused Adam/AdamW kernel where it can (its
        `grad_scale` divides every gradient as it reads it: one pass over the gradients fewer, and none at all
        when nothing is clipped), else as torch's clip_grad_norm_ does, before the update."""
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads or any(_sharded(g) for g in grads):  # fsdp: DTensor gradients, clipped by torch as they are
            self._clip = None
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # clip_grad_norm_'s total norm, to the bit: the norm of the per-tensor norms
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self._clip = (grads, norm, grad_clip) if grad_clip > 0 else None
        return norm

    def _apply_clip(self, optimizer, scaler) -> torch.Tensor | None:
        """The pending clip: the divisor for the fused step's `grad_scale`, or None after scaling the gradients
        here as clip_grad_norm_ does (another optimizer; an fp16 GradScaler, which owns `grad_scale`) or when no
        clipping was asked for."""
        pending, self._clip = getattr(self, "_clip", None), None
        if pending is None:
            return None
        grads, norm, max_norm = pending
        if scaler is None and _fused_adam(optimizer):
            return ((norm + 1e-6) / max_norm).clamp(min=1.0)  # 1 / clip_grad_norm_'s clamped coefficient
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return None

    def step(self, optimizer, scaler: torch.amp.GradScaler | None = None, skip: torch.Tensor | None = None) -> None:
        """`skip`, a device flag from `guard.DeviceGuard` (1.0: do not apply), is obeyed by the fused optimizer
        step itself (`found_inf`), so deciding needs no host synchronisation."""
        divisor = self._apply_clip(optimizer, scaler)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif skip is not None or divisor is not None:
            optimizer.found_inf, optimizer.grad_scale = skip, divisor  # read by torch's fused Adam/AdamW step
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def discard(self, optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        self._clip = None
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # an fp16 overflow still lowers the scale, as scaler.step would have

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.rt is not None and not self.rt.is_main:
            return {}
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def unsharded_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        return model  # every rank holds the whole model


def _sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")  # a DTensor


def _fused_adam(optimizer) -> bool:
    """torch's Adam/AdamW with the fused kernel, which reads `grad_scale` and `found_inf` (the for-each and
    single-tensor ones refuse them)."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))
