"""How the model is spread over ranks, applied from outside the model (model code knows nothing of ranks).

    model = prepare(model, cfg, rt)               before the optimizer exists: compile blocks, shard (fsdp)
    attach(model, optimizer, cfg)                 after: lets checkpoints find the optimizer (fsdp, deepspeed)
    wrapped = wrap(model, cfg, rt, optimizer)     what runs forward/backward; `model` keeps owning the parameters

`train.strategy`:
    ddp        PyTorch DistributedDataParallel (the default): every rank holds weights, gradients and the
               optimizer state; gradients are averaged after the backward. Checkpoints: one model.safetensors.
    fsdp       PyTorch FSDP2 (`fully_shard`) on every block, then on the root. Weights, gradients and optimizer
               state are split over ranks (ZeRO-3). `train.fsdp_reshard=false` keeps the gathered weights
               from the forward to the backward (ZeRO-2-like: fewer all-gathers, more memory). On CUDA the
               weights compute in bf16 and gradients are reduced in fp32 (`MixedPrecisionPolicy`); on CPU
               everything stays fp32. Checkpoints are `torch.distributed.checkpoint` (DCP) folders, which
               load on any number of ranks (one process included); `full_state_dict` gathers the whole
               model for the HF export. Scalar parameters (SWELU k, λ; INL κ), which FSDP2 cannot shard,
               stay replicated and their gradients are averaged by a hook.
    deepspeed  reserved (DeepSpeed ZeRO 1-2, `train.zero_stage`, `train.offload_optimizer`): refused with one
               line until the step drives a DeepSpeed engine; fsdp with fsdp_reshard=false is ZeRO-2.

`train.compile` compiles each block with `torch.compile`; the selective scan stays outside the graph
(`lmlab.models.scan.selective_scan` is `torch.compiler.disable`d: compiling its per-step loop unrolls it).
One process is never sharded or wrapped: a `fsdp` run resumed on one process trains the plain model and
still reads and writes DCP checkpoints.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import ConfigError
from ..runtime import Runtime

STRATEGIES = ("ddp", "fsdp", "deepspeed")
DCP_DIR = "dcp"  # the sharded model + optimizer inside a checkpoint folder

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (strategy, optimizer)


# ------------------------------------------------------------------------------------------------ building
def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated layers (lmlab's blocks, transformers' decoder layers): the unit of sharding and compiling."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found:
        names = set(getattr(model, "_no_split_modules", None) or ())
        found = [m for m in model.modules() if type(m).__name__ in names]
    return found


def prepare(model: torch.nn.Module, cfg: Config, rt: Runtime) -> torch.nn.Module:
    """Before the optimizer is made (its parameters must be the sharded ones): compile, then shard."""
    t = cfg.train
    if t.strategy == "deepspeed":
        _refuse_deepspeed()
    if t.compile:
        compile_blocks(model)
    if t.strategy == "fsdp":
        if rt.precision == "fp16":
            raise ConfigError("train.precision: fsdp runs in bf16 or fp32, not fp16 (no gradient scaler for "
                              "sharded gradients); use train.precision=bf16")
        if rt.distributed:
            shard(model, rt, reshard_after_forward=t.fsdp_reshard)
    return model


def compile_blocks(model: torch.nn.Module) -> None:
    """`torch.compile` each block in place (parameter names and checkpoints are unchanged)."""
    blocks = blocks_of(model)
    if not blocks:
        raise ConfigError(f"train.compile: no repeated blocks found in {type(model).__name__}")
    for blk in blocks:
        blk.compile()


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


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """Remember the optimizer of a model whose checkpoints this module writes (every strategy but ddp)."""
    if cfg.train.strategy != "ddp":
        _ATTACHED[model] = (cfg.train.strategy, optimizer)


def wrap(model: torch.nn.Module, cfg: Config, rt: Runtime, optimizer=None) -> torch.nn.Module:
    if not rt.distributed or cfg.train.strategy == "fsdp":  # fsdp: the sharded model runs itself
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def _refuse_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError("train.strategy: deepspeed is not installed; pip install deepspeed (or use "
                          "train.strategy=fsdp train.fsdp_reshard=false, the ZeRO-2 equivalent)") from None
    raise ConfigError("train.strategy: deepspeed is not wired into the trainer's step yet; use "
                      "train.strategy=fsdp train.fsdp_reshard=false (ZeRO-2) or train.strategy=fsdp (ZeRO-3)")


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_hooks(model: torch.nn.Module):
    """(strategy, optimizer) when this module writes the model's checkpoints, None for ddp (model.safetensors)."""
    return _ATTACHED.get(model)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def state_dict_for_save(model: torch.nn.Module, optimizer, rt: Runtime | None = None) -> dict:
    """Model and optimizer state keyed by parameter name, each rank holding its shards (DTensors)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_sharded(model: torch.nn.Module, optimizer, folder: Path, rt: Runtime) -> None:
    """Collective: every rank writes its shards into `folder` (shared by all ranks, on every node)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict_for_save(model, optimizer, rt), checkpoint_id=str(folder), no_dist=not _distributed())


def load_state_dicts(model: torch.nn.Module, optimizer, folder: Path, rt: Runtime | None = None) -> None:
    """Collective: read a DCP folder written on any number of ranks into this rank's shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    sd = state_dict_for_save(model, optimizer, rt)  # the layout to fill: this run's shards
    dcp.load(sd, checkpoint_id=str(folder), no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def full_state_dict(model: torch.nn.Module, rt: Runtime) -> dict[str, torch.Tensor]:
    """Collective: the whole model's weights on rank 0's CPU (an empty dict on the other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_model(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module | None:
    """Collective: a plain copy of a sharded model on rank 0 (None elsewhere), for export and samples;
    the model itself when it is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    full = full_state_dict(model, rt)
    if not rt.is_main:
        return None
    import copy

    from ..models import registry

    plain = registry.build_model(copy.deepcopy(model.config)).to(rt.device)  # non-persistent buffers included
    missing, unexpected = plain.load_state_dict(full, strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return plain
