"""`train.strategy=fsdp`: PyTorch FSDP2 (`fully_shard`) on every block, then on the root. Weights, gradients and
optimizer state are split over ranks (ZeRO-3). `train.fsdp_reshard=false` keeps the gathered weights from the
forward to the backward (ZeRO-2-like: fewer all-gathers, more memory). On CUDA the weights compute in bf16 and
gradients are reduced in fp32 (`MixedPrecisionPolicy`); on CPU everything stays fp32. Scalar parameters (SWELU
k, λ; INL κ), which FSDP2 cannot shard, stay replicated and their gradients are averaged by a hook.

Checkpoints are `torch.distributed.checkpoint` (DCP) folders (dcp/: model and optimizer, each rank its shards),
which load on any number of ranks, one process included: one process is not sharded (the plain model trains)
and still reads and writes DCP checkpoints. `unsharded_model` gathers the whole model for the HF export.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ...errors import ConfigError, LmlabError
from ...fsutil import first_line
from ...runtime import Runtime
from .base import blocks_of
from .single import Single


class FSDP(Single):
    name = "fsdp"
    shard_dir = "dcp"
    reshards = True

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.rt.precision == "fp16":
            raise ConfigError("train.precision: fsdp runs in bf16 or fp32, not fp16 (no gradient scaler for "
                              "sharded gradients); use train.precision=bf16")
        model = super().prepare(model)  # compile first: the compiled blocks are what is sharded
        if self.rt.distributed:
            shard(model, self.rt, reshard_after_forward=self.cfg.train.fsdp_reshard)
        return model

    # ----------------------------------------------------------------------------------------- checkpoints
    def _state_dicts(self) -> dict:
        """Model and optimizer state keyed by parameter name, each rank holding its shards (DTensors)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def save_shards(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state_dicts(), checkpoint_id=str(folder), no_dist=not _distributed())

    def load_shards(self, folder: Path) -> None:
        """A DCP folder written on any number of ranks, into this rank's shards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = self._state_dicts()  # the layout to fill: this run's shards
        dcp.load(sd, checkpoint_id=str(folder), no_dist=not _distributed())
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    @classmethod
    def read_weights(cls, folder: Path, into: dict[str, torch.Tensor]) -> None:
        """The model part of a DCP folder written on any number of ranks, in this one process (no group)."""
        import torch.distributed.checkpoint as dcp

        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled", category=UserWarning)
                dcp.load({"model": into}, checkpoint_id=str(folder), no_dist=True)
        except Exception as e:  # noqa: BLE001 - DCP raises its own CheckpointException with one line per rank
            raise LmlabError(f"checkpoint {folder.parent}: its shards do not match the model: {first_line(e)}") \
                from None

    # ---------------------------------------------------------------------------------------------- export
    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def unsharded_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            return model
        full = self.full_state_dict(model)
        if not self.rt.is_main:
            return None
        import copy

        from ...models import registry

        plain = registry.build_model(copy.deepcopy(model.config)).to(self.rt.device)  # non-persistent buffers too
        missing, unexpected = plain.load_state_dict(full, strict=False)
        tied = set(getattr(plain, "_tied_weights_keys", None) or ())
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
        return plain


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard(model: torch.nn.Module, rt: Runtime, reshard_after_forward: bool = True) -> None:
    """FSDP2: `fully_shard` every block, then the root (embeddings, final norm, head, tied weights)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    if rt.device.type == "cuda" and rt.amp_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=rt.amp_dtype, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    scalars = {p for p in model.parameters() if p.dim() == 0}
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, ignored_params=scalars)
    for blk in blocks_of(model):
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    world = rt.world_size

    def average(p: torch.Tensor) -> None:  # each micro-batch: linear, so accumulation stays exact
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)

    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(average)
