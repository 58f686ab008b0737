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
    deepspeed  DeepSpeed ZeRO (the optional extra `lmlab[deepspeed]`, imported only when chosen), under plain
               `torchrun`. `train.zero_stage=1` splits the optimizer state over ranks, `2` the gradients too;
               every rank keeps the whole weights. `train.offload_optimizer=true` keeps the fp32 master weights
               and optimizer state in CPU memory and steps them there. The client optimizer is lmlab's own
               (torch AdamW; no DeepSpeed op is built). bf16 on CUDA (DeepSpeed's bf16 weights, fp32 master),
               fp32 on CPU (`DS_ACCELERATOR=cpu`, gloo); no fp16, no LoRA. The step drives the engine through
               the hooks below (`backward`, `clip_grad_norm`, `optimizer_step`, `discard_gradients`): its own
               gradient norm and clipping, and a guard skip drops the gradients held in its buffers.
               Checkpoints: model.safetensors (the whole model, fp32) and zero/rank<r>.pt (that rank's fp32
               partition and optimizer state, tensors only): they resume exactly on the same number of ranks
               and are refused on another. One process runs a one-rank engine (offload works there too).

`train.compile` compiles each block with `torch.compile`; the selective scan stays outside the graph
(`lmlab.models.scan.selective_scan` is `torch.compiler.disable`d: compiling its per-step loop unrolls it).
One process is never sharded or wrapped (but for deepspeed): a `fsdp` run resumed on one process trains the
plain model and still reads and writes DCP checkpoints.

Step hooks (lmlab.train.step calls them for every strategy; only deepspeed changes what they do):
    no_sync(wrapped, rt, last)            DDP: no gradient all-reduce before the last micro-batch
    backward(wrapped, loss, last)         loss.backward(), or the engine's backward at its accumulation boundary
    clip_grad_norm(model, wrapped, clip)  the total norm before clipping (deepspeed clips inside its step)
    optimizer_step / discard_gradients    True when the strategy applied / dropped the update itself
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config
from ..errors import ConfigError
from ..runtime import Runtime

STRATEGIES = ("ddp", "fsdp", "deepspeed")
DCP_DIR = "dcp"  # the sharded model + optimizer inside a checkpoint folder
ZERO_DIR = "zero"  # deepspeed: each rank's fp32 partition and optimizer state inside a checkpoint folder
DEEPSPEED_RANGE = (">=0.19.8", "<0.20")  # what lmlab drives (it reads the ZeRO optimizer's partitions)

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → (strategy, optimizer)
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model, optimizer → weakref(DeepSpeed engine)


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
        check_deepspeed(cfg, rt)
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
    if cfg.train.strategy == "deepspeed":  # the engine, on one process too
        return deepspeed_engine(model, optimizer, cfg, rt)
    if not rt.distributed or cfg.train.strategy == "fsdp":  # fsdp: the sharded model runs itself
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------ deepspeed
def check_deepspeed(cfg: Config, rt: Runtime):
    """Refuse what the DeepSpeed path does not run (one ConfigError line each), then import it for this device
    and make sure a process group exists (one of one rank outside torchrun). Returns the module."""
    if cfg.finetune.method != "full":
        raise ConfigError(f"train.strategy: deepspeed trains full models only; finetune.method="
                          f"{cfg.finetune.method} (adapters) runs under train.strategy=ddp")
    if rt.device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: deepspeed runs on cuda or cpu, not {rt.device.type}")
    if cfg.train.optimizer != "adamw":  # the ZeRO path is built and tested around lmlab's AdamW
        raise ConfigError(f"train.optimizer: deepspeed drives adamw only, not {cfg.train.optimizer}; use "
                          f"train.optimizer=adamw, or train.strategy=ddp / fsdp for {cfg.train.optimizer}")
    if rt.precision == "fp16":
        raise ConfigError("train.precision: deepspeed runs in bf16 or fp32, not fp16 (DeepSpeed's loss scaler would "
                          "bypass the trainer's guard); use train.precision=bf16")
    if rt.device.type == "cpu" and rt.precision != "fp32":
        raise ConfigError(f"train.precision: deepspeed on CPU runs in fp32, not {rt.precision}; use "
                          f"train.precision=fp32 (or auto)")
    ds = _import_deepspeed(rt)
    os.environ.setdefault("LOCAL_RANK", str(rt.local_rank))  # the engine asserts it is set (torchrun sets it)
    if not dist.is_initialized():  # one process: DeepSpeed still reduces through a process group (of one)
        if rt.device.type == "cuda":
            torch.cuda.set_device(rt.device)
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
        rt.owns_group = True  # rt.shutdown ends it
    return ds


def _import_deepspeed(rt: Runtime):
    from packaging.specifiers import SpecifierSet

    from ..fsutil import error_line, first_line

    if rt.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at DeepSpeed's first accelerator query
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
    except ImportError as e:
        if (e.name or "").split(".")[0] == "deepspeed" and "deepspeed" not in str(e.path or ""):
            raise ConfigError("train.strategy: deepspeed is not installed; pip install 'lmlab[deepspeed]' (or use "
                              "train.strategy=fsdp train.fsdp_reshard=false, the ZeRO-2 equivalent)") from None
        raise ConfigError(f"train.strategy: deepspeed cannot be imported here ({first_line(e)})") from None
    except Exception as e:  # its accelerator probe or an op it needs at import
        raise ConfigError(f"train.strategy: deepspeed cannot start on {rt.device.type} ({error_line(e)})") \
            from None
    wanted = SpecifierSet(",".join(DEEPSPEED_RANGE))
    if deepspeed.__version__.split("+")[0] not in wanted:
        raise ConfigError(f"train.strategy: deepspeed {deepspeed.__version__} is outside the range lmlab drives "
                          f"({wanted}); pip install 'lmlab[deepspeed]'")
    if accelerator != rt.device.type:
        raise ConfigError(f"train.strategy: DeepSpeed chose its {accelerator} accelerator but train.device is "
                          f"{rt.device.type}; set DS_ACCELERATOR={rt.device.type}")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-step INFO lines are not the run's log
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if rt.device.type == "cpu" and isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False  # an inference-only all-reduce op: no C++ build at start
    return deepspeed


def deepspeed_config(cfg: Config, rt: Runtime) -> dict:
    """The engine's configuration, all of it decided by lmlab's config (no ds_config.json)."""
    t = cfg.train
    cuda = rt.device.type == "cuda"
    zero = {"stage": t.zero_stage, "contiguous_gradients": True, "overlap_comm": cuda,
            "reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7)}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size, "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * rt.world_size,
        "gradient_clipping": float(t.grad_clip), "zero_optimization": zero,
        "bf16": {"enabled": rt.precision == "bf16"}, "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # lmlab's torch optimizer is the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # offload steps it too: no DeepSpeedCPUAdam op to build
        "steps_per_print": 2**62, "wall_clock_breakdown": False,
    }


def deepspeed_engine(model: torch.nn.Module, optimizer, cfg: Config, rt: Runtime):
    """A ZeRO 1/2 engine over `model` driving lmlab's `optimizer` (whose param_groups keep the LR the loop sets)."""
    ds = check_deepspeed(cfg, rt)
    if optimizer is None:
        raise ConfigError("train.strategy: deepspeed needs the optimizer to build its engine")
    from unittest import mock

    # DeepSpeed broadcasts rank 0's weights as bytes (`view(torch.uint8)`), which a 0-dim parameter (SWELU k, λ;
    # INL κ) cannot do; the same broadcast, parameter by parameter, as a 1-element view
    with mock.patch.object(ds.DeepSpeedEngine, "_broadcast_model", _broadcast_weights):
        engine, *_ = ds.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, rt),
                                   dist_init_required=False)
    for key in (model, optimizer, engine.optimizer):
        _ENGINES[key] = weakref.ref(engine)
    return engine


def _broadcast_weights(engine) -> None:
    with torch.no_grad():
        for p in engine.module.parameters():
            dist.broadcast(p.data.view(1) if p.dim() == 0 else p.data, src=0)


def engine_of(obj):
    """The DeepSpeed engine behind an engine, its model or its optimizer; None for every other strategy."""
    if obj is None:
        return None
    ds = sys.modules.get("deepspeed")  # not imported: no engine can exist
    if ds is not None and isinstance(obj, ds.DeepSpeedEngine):
        return obj
    try:
        ref = _ENGINES.get(obj)
    except TypeError:  # not weak-referenceable: not ours
        return None
    return ref() if ref is not None else None


# ----------------------------------------------------------------------------------------------- step hooks
def no_sync(wrapped, rt: Runtime, last: bool):
    """DDP: skip the all-reduce of micro-batches before the last (DeepSpeed decides it at its boundary)."""
    if last or not rt.distributed or not hasattr(wrapped, "no_sync") or engine_of(wrapped) is not None:
        return contextlib.nullcontext()
    return wrapped.no_sync()


def backward(wrapped, loss: torch.Tensor, last: bool) -> None:
    """The backward of one micro-batch. DeepSpeed: the last one is its accumulation boundary (ZeRO-1 reduces
    there, ZeRO-2 during every backward); `loss` is already scaled for the step, so no division by grad_accum."""
    engine = engine_of(wrapped)
    if engine is None:
        loss.backward()
        return
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def clip_grad_norm(model, wrapped, grad_clip: float) -> torch.Tensor:
    """The total gradient norm before clipping, over every rank. DeepSpeed owns the (partitioned) gradients:
    its own norm, and its step clips with `grad_clip` (the same formula as torch: × clip / (norm + 1e-6))."""
    engine = engine_of(wrapped)
    if engine is None:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                              grad_clip if grad_clip > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # fsdp: a DTensor, made plain
    zo = engine.optimizer
    zo.clip_grad = float(grad_clip)
    if hasattr(zo, "_wait_for_offload_copies"):
        zo._wait_for_offload_copies()
    norm = torch.as_tensor(zo.scaled_global_norm(), dtype=torch.float32) / float(zo.loss_scale)
    return torch.where(norm < 0, torch.full_like(norm, float("nan")), norm)  # DeepSpeed marks inf/nan as -1


def optimizer_step(optimizer) -> bool:
    """DeepSpeed: the engine clips, steps its partitions (on CPU with offload) and all-gathers the weights."""
    engine = engine_of(optimizer)
    if engine is None:
        return False
    engine.step()
    return True


def discard_gradients(optimizer) -> bool:
    """DeepSpeed: drop this step's gradients wherever ZeRO keeps them (reduced partitions, the contiguous and
    CPU-offload buffers, per-parameter norms) without stepping, as its own overflow skip does."""
    engine = engine_of(optimizer)
    if engine is None:
        return False
    zo = engine.optimizer
    if hasattr(zo, "_wait_for_offload_copies"):
        zo._wait_for_offload_copies()
    zo.micro_step_id = -1  # INITIAL_MICRO_STEP_ID: the next backward starts a new accumulation
    zo.zero_grad(set_to_none=True)
    if hasattr(zo, "_release_preflattened_grad_buffers"):
        zo._release_preflattened_grad_buffers()
    for k in list(zo.averaged_gradients.keys()):
        zo.averaged_gradients[k] = None
    for k in list(getattr(zo, "all_grad_tensors", {}).keys()):
        zo.all_grad_tensors[k] = None
    if zo.cpu_offload:
        zo._offload_accumulated_param_ids = set()
        zo.reset_cpu_buffers()
        for fp32 in zo.single_partition_of_fp32_groups:
            if fp32.grad is not None:
                fp32.grad.zero_()
    return True


def _save_zero(engine, model: torch.nn.Module, folder: Path, rt: Runtime | None) -> None:
    """Collective: rank 0 writes model.safetensors (whole, fp32) next to `folder`, every rank its partition."""
    zo = engine.optimizer
    full = _deepspeed_fp32_state(model)  # collective when the engine's weights are bf16
    rank = dist.get_rank()

    def write_model() -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file(full, str(folder.parent / "model.safetensors"), metadata={"format": "pt"})

    def write_partition() -> None:
        torch.save({"world_size": dist.get_world_size(), "zero_stage": int(engine.zero_optimization_stage()),
                    "fp32": [p.detach().cpu() for p in zo.single_partition_of_fp32_groups],
                    "optimizer": zo.optimizer.state_dict()}, folder / f"rank{rank}.pt")

    rt.main_first(write_model, others=False)  # a failure on any rank stops every rank here, in one line
    rt.together(write_partition)  # every rank's file is in place before rank 0 hashes the folder


def _load_zero(engine, model: torch.nn.Module, folder: Path) -> None:
    """Collective: this rank's partition and optimizer state; another number of ranks is refused."""
    from ..errors import LmlabError
    from .checkpoint import _load_pt

    world, rank = dist.get_world_size(), dist.get_rank()
    saved_world = len(list(folder.glob("rank*.pt")))
    if saved_world != world:
        raise LmlabError(f"checkpoint {folder.parent}: written by deepspeed on {saved_world} rank(s), this run has "
                         f"{world}; ZeRO partitions only resume on the same number of ranks (torchrun "
                         f"--nproc_per_node={saved_world}), or use its model.safetensors as a new run's weights")
    sd = _load_pt(folder / f"rank{rank}.pt")
    zo = engine.optimizer
    stage = int(engine.zero_optimization_stage())
    shapes = [tuple(p.shape) for p in zo.single_partition_of_fp32_groups]
    if sd["zero_stage"] != stage or [tuple(t.shape) for t in sd["fp32"]] != shapes:
        raise LmlabError(f"checkpoint {folder.parent}: its ZeRO partitions (stage {sd['zero_stage']}) do not fit "
                         f"this run's (stage {stage}, another model or optimizer grouping); resume with the run's "
                         f"own config")
    from safetensors.torch import load_file

    whole = load_file(str(folder.parent / "model.safetensors"))  # buffers; the weights follow from the partitions
    missing, unexpected = model.load_state_dict(whole, strict=False)  # in place: into DeepSpeed's flat buffers
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in whole if k in own}
    if unexpected or any(own[k].data_ptr() not in loaded for k in missing):  # only tied weights may be absent
        raise LmlabError(f"checkpoint {folder.parent}: model.safetensors does not fit the model (missing "
                         f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    with torch.no_grad():
        for part, saved in zip(zo.single_partition_of_fp32_groups, sd["fp32"], strict=True):
            part.data.copy_(saved)
    zo.optimizer.load_state_dict(sd["optimizer"])
    zo._hp_optimizer_states_linked = False  # DeepSpeed re-links its per-parameter views of the new state
    zo.update_lp_params()  # the model's weights from the fp32 partitions, all-gathered (collective)


def _deepspeed_fp32_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole model in fp32, as its state_dict names it (tied weights once), on the CPU. With bf16
    weights in the engine, the fp32 master weights gathered from the partitions; in fp32 runs the model's own
    (each step copies the fp32 partitions back exactly)."""
    bf16 = any(p.dtype != torch.float32 for p in model.parameters())
    if bf16:
        from deepspeed.utils import safe_get_full_fp32_param
    keys = set(model.state_dict())
    full = {}
    for name, p in model.named_parameters():  # every rank: the gather is collective
        hp = safe_get_full_fp32_param(p) if bf16 and p.requires_grad else None
        if name in keys:  # copies: the weights are views into DeepSpeed's flat buffers
            full[name] = (hp if hp is not None else p.detach()).float().cpu().clone().contiguous()
    full.update({n: b.detach().cpu().clone().contiguous() for n, b in model.named_buffers() if n in keys})
    return full


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


def shard_dir(model: torch.nn.Module) -> str:
    """The folder of a checkpoint that holds what each rank writes: dcp/ (fsdp) or zero/ (deepspeed)."""
    hooks = checkpoint_hooks(model)
    return ZERO_DIR if hooks is not None and hooks[0] == "deepspeed" else DCP_DIR


def save_sharded(model: torch.nn.Module, optimizer, folder: Path, rt: Runtime) -> None:
    """Collective: every rank writes its shards into `folder` (shared by all ranks, on every node)."""
    if (engine := engine_of(model)) is not None:
        _save_zero(engine, model, folder, rt)
        return
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict_for_save(model, optimizer, rt), checkpoint_id=str(folder), no_dist=not _distributed())


def load_state_dicts(model: torch.nn.Module, optimizer, folder: Path, rt: Runtime | None = None) -> None:
    """Collective: read a DCP folder written on any number of ranks into this rank's shards (deepspeed: its
    zero/ folder, written on as many ranks as this run has)."""
    if (engine := engine_of(model)) is not None:
        _load_zero(engine, model, folder)
        return
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

    if engine_of(model) is not None:  # deepspeed: every rank holds the weights; bf16 ones give way to fp32
        if all(p.dtype == torch.float32 for p in model.parameters()):
            return model if rt.is_main else None
        full = _deepspeed_fp32_state(model)  # collective
        if rt.is_main:  # training is over: the engine's bf16 views are no longer needed
            model.float().load_state_dict(full, strict=False)
        return model if rt.is_main else None
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
