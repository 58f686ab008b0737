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
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                              grad_clip if grad_clip > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded (fsdp): a DTensor, made plain

    def step(self, optimizer, scaler: torch.amp.GradScaler | None = None, skip: torch.Tensor | None = None) -> None:
        """`skip`, a device flag from `guard.DeviceGuard` (1.0: do not apply), is obeyed by the fused optimizer
        step itself (`found_inf`), so deciding needs no host synchronisation."""
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        elif skip is not None:
            optimizer.found_inf, optimizer.grad_scale = skip, None  # read by torch's fused Adam/AdamW step
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def discard(self, optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()  # an fp16 overflow still lowers the scale, as scaler.step would have

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.rt is not None and not self.rt.is_main:
            return {}
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def unsharded_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        return model  # every rank holds the whole model
