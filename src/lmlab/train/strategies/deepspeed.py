"""`train.strategy=deepspeed`: DeepSpeed ZeRO (the optional extra `lmlab[deepspeed]`, imported only when chosen),
under plain `torchrun`. `train.zero_stage=1` splits the optimizer state over ranks, `2` the gradients too; every
rank keeps the whole weights. `train.offload_optimizer=true` keeps the fp32 master weights and optimizer state in
CPU memory and steps them there. The client optimizer is lmlab's own (torch AdamW; no DeepSpeed op is built).
bf16 on CUDA (DeepSpeed's bf16 weights, fp32 master), fp32 on CPU (`DS_ACCELERATOR=cpu`, gloo); no fp16, no
LoRA. The step hooks drive the engine: its own gradient norm and clipping (the same formula as torch), its own
step, and a guard skip drops the gradients held in its buffers. One process runs a one-rank engine (offload
works there too).

Checkpoints: model.safetensors (the whole model, fp32) and zero/rank<r>.pt (that rank's fp32 partition and
optimizer state, tensors only): they resume exactly on the same number of ranks and are refused on another.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ...config import Config
from ...errors import ConfigError, LmlabError
from ...runtime import Runtime
from .base import Strategy, bound, compile_blocks, load_pt

DEEPSPEED_RANGE = (">=0.19.8", "<0.20")  # what lmlab drives (it reads the ZeRO optimizer's partitions)


class DeepSpeed(Strategy):
    name = "deepspeed"
    shard_dir = "zero"
    steps_itself = True

    def __init__(self, cfg: Config | None = None, rt: Runtime | None = None):
        super().__init__(cfg, rt)
        self.engine = None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        check_deepspeed(self.cfg, self.rt)
        if self.cfg.train.compile:
            compile_blocks(model)
        return self._placed(model)

    def wrap(self, model: torch.nn.Module, optimizer=None) -> torch.nn.Module:
        """A ZeRO 1/2 engine over `model` driving lmlab's `optimizer` (whose param_groups keep the LR the loop
        sets); on one process too."""
        ds = check_deepspeed(self.cfg, self.rt)
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise ConfigError("train.strategy: deepspeed needs the optimizer to build its engine")
        from unittest import mock

        # DeepSpeed broadcasts rank 0's weights as bytes (`view(torch.uint8)`), which a 0-dim parameter (SWELU k,
        # λ; INL κ) cannot do; the same broadcast, parameter by parameter, as a 1-element view
        with mock.patch.object(ds.DeepSpeedEngine, "_broadcast_model", _broadcast_weights):
            self.engine, *_ = ds.initialize(model=model, optimizer=optimizer, dist_init_required=False,
                                            config=deepspeed_config(self.cfg, self.rt))
        return self.engine

    # ------------------------------------------------------------------------------------------ step hooks
    def no_sync(self, wrapped, last: bool):
        return contextlib.nullcontext()  # the engine decides at its accumulation boundary

    def backward(self, wrapped, loss: torch.Tensor, last: bool) -> None:
        """The last micro-batch is the engine's accumulation boundary (ZeRO-1 reduces there, ZeRO-2 during every
        backward)."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)

    def clip(self, model: torch.nn.Module, wrapped, grad_clip: float) -> torch.Tensor:
        """DeepSpeed owns the (partitioned) gradients: its own norm; its step clips with `grad_clip`
        (× clip / (norm + 1e-6), as torch)."""
        zo = self.engine.optimizer
        zo.clip_grad = float(grad_clip)
        if hasattr(zo, "_wait_for_offload_copies"):
            zo._wait_for_offload_copies()
        norm = torch.as_tensor(zo.scaled_global_norm(), dtype=torch.float32) / float(zo.loss_scale)
        return torch.where(norm < 0, torch.full_like(norm, float("nan")), norm)  # DeepSpeed marks inf/nan as -1

    def step(self, optimizer, scaler=None, skip=None) -> None:
        """The engine clips, steps its partitions (on CPU with offload) and all-gathers the weights."""
        self.engine.step()

    def discard(self, optimizer, scaler=None) -> None:
        """Drop this step's gradients wherever ZeRO keeps them (reduced partitions, the contiguous and CPU-offload
        buffers, per-parameter norms) without stepping, as its own overflow skip does."""
        zo = self.engine.optimizer
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

    # ----------------------------------------------------------------------------------------- checkpoints
    def checkpoint_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole model in fp32 beside the partitions: a new run's weights on any number of ranks."""
        return fp32_state(model)

    def save_shards(self, folder: Path) -> None:
        """Every rank its fp32 partition and optimizer state (tensors only)."""
        zo = self.engine.optimizer
        rank = dist.get_rank()

        def write_partition() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"world_size": dist.get_world_size(), "zero_stage": int(self.engine.zero_optimization_stage()),
                        "fp32": [p.detach().cpu() for p in zo.single_partition_of_fp32_groups],
                        "optimizer": zo.optimizer.state_dict()}, folder / f"rank{rank}.pt")

        self.rt.together(write_partition)  # every rank's file is in place before rank 0 hashes the folder

    def load_shards(self, folder: Path) -> None:
        """This rank's partition and optimizer state, and the buffers from model.safetensors beside `folder`;
        another number of ranks is refused."""
        engine, model = self.engine, self.model
        world, rank = dist.get_world_size(), dist.get_rank()
        saved_world = len(list(folder.glob("rank*.pt")))
        if saved_world != world:
            raise LmlabError(f"checkpoint {folder.parent}: written by deepspeed on {saved_world} rank(s), this run "
                             f"has {world}; ZeRO partitions only resume on the same number of ranks (torchrun "
                             f"--nproc_per_node={saved_world}), or use its model.safetensors as a new run's weights")
        sd = load_pt(folder / f"rank{rank}.pt")
        zo = engine.optimizer
        stage = int(engine.zero_optimization_stage())
        shapes = [tuple(p.shape) for p in zo.single_partition_of_fp32_groups]
        if sd["zero_stage"] != stage or [tuple(t.shape) for t in sd["fp32"]] != shapes:
            raise LmlabError(f"checkpoint {folder.parent}: its ZeRO partitions (stage {sd['zero_stage']}) do not fit "
                             f"this run's (stage {stage}, another model or optimizer grouping); resume with the "
                             f"run's own config")
        from safetensors.torch import load_file

        whole = load_file(str(folder.parent / "model.safetensors"))  # buffers; weights follow from the partitions
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

    # ---------------------------------------------------------------------------------------------- export
    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        full = fp32_state(model)  # collective
        return full if self.rt.is_main else {}

    def unsharded_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """Every rank holds the weights; bf16 ones give way to the fp32 master weights (training is over: the
        engine's bf16 views are no longer needed)."""
        if all(p.dtype == torch.float32 for p in model.parameters()):
            return model if self.rt.is_main else None
        full = fp32_state(model)  # collective
        if self.rt.is_main:
            model.float().load_state_dict(full, strict=False)
        return model if self.rt.is_main else None


def engine_of(obj):
    """The DeepSpeed engine behind an engine, or behind a model or optimizer the deepspeed strategy holds; None
    for every other strategy."""
    if obj is None:
        return None
    ds = sys.modules.get("deepspeed")  # not imported: no engine can exist
    if ds is not None and isinstance(obj, ds.DeepSpeedEngine):
        return obj
    return getattr(bound(obj), "engine", None)


# ------------------------------------------------------------------------------------------ starting DeepSpeed
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

    from ...fsutil import error_line, first_line

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


def _broadcast_weights(engine) -> None:
    with torch.no_grad():
        for p in engine.module.parameters():
            dist.broadcast(p.data.view(1) if p.dim() == 0 else p.data, src=0)


def fp32_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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
