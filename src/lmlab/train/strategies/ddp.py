"""`train.strategy=ddp` on several ranks: PyTorch DistributedDataParallel (the default). Every rank holds
weights, gradients and the optimizer state; gradients are averaged after the backward (not before the last
micro-batch of a step). Checkpoints: as one process (model.safetensors, the optimizer in trainer.pt)."""

from __future__ import annotations

import contextlib

import torch

from .single import Single


class DDP(Single):
    name = "ddp"

    def wrap(self, model: torch.nn.Module, optimizer=None) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        rt = self.rt
        return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)

    def no_sync(self, wrapped, last: bool):
        if last or not hasattr(wrapped, "no_sync"):
            return contextlib.nullcontext()
        return wrapped.no_sync()
