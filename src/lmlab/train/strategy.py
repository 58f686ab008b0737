"""How the model is spread over ranks, applied from outside the model (model code knows nothing of ranks).

    wrapped = wrap(model, cfg, rt)     what runs forward/backward; `model` keeps owning the parameters

`train.strategy` ddp (PyTorch DistributedDataParallel) is the default; one process is never wrapped.
"""

from __future__ import annotations

import torch

from ..config import Config
from .runtime import Runtime


def wrap(model: torch.nn.Module, cfg: Config, rt: Runtime) -> torch.nn.Module:
    if not rt.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
