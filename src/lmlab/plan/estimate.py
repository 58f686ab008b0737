"""How many parameters, how much memory per GPU, how long and how much money a training run takes.

The planner's parts: lmlab.plan.arch (the model on the meta device), .lora (what LoRA adapts, the trainer's
own targets), .activations (the ledgers and traces), .formatting (the lines it prints); this module adds the
state, compute, budget and the suggestions, and `estimate_for_run` plans a run config as the trainer runs it.

    est = estimate("mamba-swelu-124m", seq_len=1024, micro_batch=4, grad_accum=4, hardware="rtx4090",
                   gpus=2, token_ratio=100)
    print(format_plan(est));  ok, why = memory_fits(est)

Nothing is allocated: the model is built on the meta device and counted. The formulas (docs/planner.md
has them with their derivation and the CPU measurements that hold them):

Memory per GPU (bytes; N parameters, T trainable, b micro batch, s sequence, V vocabulary)
    full fp32      weights 4N, gradients 4N, AdamW m and v 8N              (the fp32 weights are the master)
                   (SGD: 4N of momentum, none without; every method below likewise for its T)
    full bf16/fp16 torch.autocast over fp32 parameters, as lmlab's trainer runs it: weights 4N + 2·N_lin
                   (the bf16 copies of the matmul weights that autocast keeps for the backward),
                   gradients 4N (fp32), AdamW m, v 8N                      (= 16N + 2·N_lin)
    lora           frozen base in the precision's dtype (2N or 4N) + fp32 adapters 4T, gradients 4T, 8T
    qlora          base linears in NF4 with double-quantised constants (4.127 bits/param), the rest bf16,
                   + one dequantised layer, fp32 adapters 4T, gradients 4T, AdamW 8T
    data parallel  + a second fp32 copy of the trainable gradients (DDP's reduction buckets)
    reference      + 4N for a full fine-tuning objective with a frozen reference (DPO, IPO, KTO, GRPO; OBJECTIVES)
    strategies     ZeRO / FSDP split optimizer state, gradients, weights over the ranks (STRATEGIES)
    activations    what autograd keeps for the backward of one micro batch, written per layer as a
                   ledger of saved tensors (lmlab.plan.activations), plus the loss:
                   b·s·V·12 bytes (the fp32 log-softmax output and the two fp32 gradients alive when the
                   loss's backward runs; the trainer's objective drops the logits themselves before the
                   backward, lmlab.train.step), or with the chunked loss (train.chunked_loss, on by default
                   when a micro batch's fp32 logits exceed train.loss_chunk_mb; lmlab.train.losses)
                   c·V·p' + V·d·4 for c tokens per chunk (p' 4 in fp32, 6 in 16-bit). Other architectures are
                   traced: a forward on the meta device records the bytes autograd saves.
    overhead       CUDA context, cuBLAS workspace (+ NCCL buffers with several GPUs)
FLOPs per token: forward F = 2·N_mm + 4·L_attn·d·s (N_mm the parameters that take part in matmuls;
input and position embeddings are lookups), or counted by FlopCounterMode for traced architectures
(INL's integrator reuses its weights every iteration); training 3·F (LoRA 2·F), inference F.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError
from .activations import Regime, Saved, activation_bytes, counted_forward_flops, ledger  # noqa: F401 - re-exported
from .arch import (  # noqa: F401
    Arch,
    _run_vocab,
    analyse,
    default_tokenizer,
    load_model_config,
    meta_model,
    position_limit,
    run_tokenizer,
)
from .formatting import _size, fmt_hours, format_plan, gib, memory_fits  # noqa: F401 - re-exported
from .hardware import CURRENCY, GIB, HARDWARE, Hardware, get_hardware
from .lora import lora_targets_for, lora_trainable

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16", "fp16", "4bit")
NF4_BYTES = 4.127 / 8  # QLoRA: 4-bit NF4 + double-quantised absmax constants, bytes per parameter
CUDA_OVERHEAD_GIB = 0.8  # CUDA context + cuBLAS workspace on one GPU
CPU_OVERHEAD_GIB = 28 / 1024  # measured: a CPU training step's allocations beyond weights and AdamW states
#                               (autograd engine, thread pools, oneDNN scratch), docs/planner.md
NCCL_OVERHEAD_GIB = 0.4  # NCCL communicator buffers with several GPUs
MARGIN = 0.10  # keep 10 % of the GPU free for the caching allocator's fragmentation
OPTIMIZERS = ("adamw", "sgd")
# objective → (sequences per example in a micro batch, a frozen reference model beside the policy);
# objectives not listed train like pretraining / SFT: one sequence per example, no reference
OBJECTIVES: dict[str, tuple[int, bool]] = {
    "dpo": (2, True), "ipo": (2, True), "kto": (2, True),  # chosen + rejected (KTO: completion + KL sample)
    "simpo": (2, False), "orpo": (2, False),  # reference-free preference objectives
    "grpo": (1, True),  # a micro batch of sampled completions; the reference for the KL term
}


# ------------------------------------------------------------------------------------------- results
@dataclass
class Estimate:
    """The plan for one configuration. Bytes are per GPU; tokens, steps and money for the whole run."""

    model: str
    model_type: str
    params_total: int
    params_trainable: int
    method: str
    precision: str
    hardware: str
    gpu_label: str
    gpus: int
    seq_len: int
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    lora_rank: int | None
    lora_targets: list[str]
    activation_model: str  # which formula (or trace) gave the activations
    memory: dict[str, int]  # weights, gradients, optimizer, activations, overhead, total (bytes per GPU)
    activations_full: int  # bytes per micro batch without activation checkpointing
    activations_checkpointed: int  # ... with one checkpoint per layer
    gpu_memory: int
    margin: float
    fits: bool
    fits_without_margin: bool
    flops_per_token: float  # training, model FLOPs (no recomputation)
    flops_per_token_inference: float
    peak_tflops: float  # per GPU, for the precision
    mfu: float
    tokens_per_second: float  # all GPUs together
    tokens_per_step: int  # micro_batch × seq_len × grad_accum × gpus
    tokens: int | None  # budget actually trained (steps × tokens_per_step), None without a budget
    steps: int | None
    hours: float | None
    hours_per_billion_tokens: float
    gpu_hours: float | None
    price_per_hour: float  # per GPU-hour
    cost: float | None
    tdp_w: float
    pue: float
    energy_kwh: float | None
    kwh_price: float
    energy_cost: float | None
    currency: str = CURRENCY
    activation_items: dict[str, int] = field(default_factory=dict)  # bytes per micro batch, by tensor group
    strategy: str = "ddp"  # how ranks split the state: ddp | zero1 | zero2 | fsdp (STRATEGIES)
    vocab_size: int = 0  # the vocabulary the plan assumed
    tokenizer: str = ""  # where that vocabulary comes from
    optimizer: str = "adamw"
    objective: str = "pretrain"
    loss_chunk: int | None = None  # tokens per chunk of the chunked loss; None: the plain full-logits path
    suggestions: list[str] = field(default_factory=list)  # what would make it fit
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)



# ---------------------------------------------------------------------------------------- estimate
def _parse_regime(method: str, precision: str | None, cpu: bool = False) -> tuple[str, str, str]:
    """(method, precision, activation dtype regime) after checking the combination."""
    if method not in METHODS:
        raise ConfigError(f"--method: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if precision is None:
        precision = "4bit" if method == "qlora" else ("fp32" if cpu else "bf16")
    if method == "qlora" and precision != "4bit":
        raise ConfigError(f"--precision {precision}: QLoRA keeps the base weights in 4 bits and computes in bf16; "
                          f"use --precision 4bit (or --method lora for a {precision} base)")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    if precision == "4bit" and method == "full":
        raise ConfigError("--precision 4bit: 4-bit weights cannot be trained directly; use --method qlora")
    if precision == "4bit" and method == "lora":
        method = "qlora"
    if method == "full":
        return method, precision, "fp32" if precision == "fp32" else "amp"
    return method, precision, "fp32" if precision == "fp32" else "half"


def _positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if value is None or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise ConfigError(f"{name}: must be a positive finite number, got {value!r}")
    return value


def estimate(model: Any = "mamba-swelu-124m", *, seq_len: int | None = None, micro_batch: int | None = None,
             grad_accum: int | None = None, method: str = "full", precision: str | None = None,
             lora_rank: int = 16, lora_targets: list[str] | None = None, hardware: str | Hardware = "a100-80",
             gpus: int = 1, checkpointing: bool = False, scan: str = "auto", mfu: float = 0.35,
             tokens: float | None = None, token_ratio: float | None = None, steps: int | None = None,
             params: int | None = None, price_per_hour: float | None = None, kwh_price: float = 0.25,
             pue: float = 1.0, vocab_size: int | None = None, overrides: dict[str, Any] | None = None,
             trust_remote_code: bool = False, arch: Arch | None = None, suggest: bool = True,
             suggest_methods: bool = True, strategy: str = "ddp", optimizer: str = "adamw", momentum: float = 0.9,
             objective: str = "pretrain", tokenizer: str | None = None, guard_copy: bool = False,
             chunked_loss: str = "auto", loss_chunk_mb: float = 256, advise_precision: bool = True) -> Estimate:
    """Plan a training run. `model`: a named size, a run config (.yaml), an HF config.json, a model folder,
    a hub id or a PretrainedConfig. A run config supplies seq_len, batch, accumulation, precision and the
    token budget unless given here. `params` replaces the parameter count (to plan a custom size);
    the architecture still decides activations. Money in USD; `kwh_price` in USD per kWh. When the run
    does not fit, `suggestions` lists changes that would make it fit (LoRA/QLoRA only with
    `suggest_methods`: they make sense for fine-tuning, not for pretraining from scratch).

    What the trainer trains decides the state: `method` (full | lora | qlora, adapters on `lora_targets`,
    default the family's from `lmlab.models.lora`), `optimizer` (adamw: two fp32 states per trainable
    parameter; sgd: one with `momentum`, none without), `objective` (OBJECTIVES: the sequences per example
    and, for full fine-tuning, a frozen reference copy of the weights; with adapters the reference is the
    base with its adapters off, no copy), `strategy` (STRATEGIES), `guard_copy` (the step guard's last good
    state: one more copy of the trainable weights and the optimizer state, as this rank holds them),
    `chunked_loss` and `loss_chunk_mb` (train.*: whether the loss runs chunk by chunk, `loss_chunk`).
    `tokenizer` only labels the vocabulary (`vocab_size`, else the model config's) in the plan.
    `advise_precision`: on the CPU in fp32, a note when bf16 is faster here (`runtime.cpu_bf16_faster`, which
    times two matmuls once a process); off where the notes are not shown."""
    hw = get_hardware(hardware)
    if sum(x is not None for x in (tokens, token_ratio, steps)) > 1:
        raise ConfigError("--steps, --tokens and --token-ratio: give one budget, not several")
    for name, v in (("--gpus", gpus), ("--mfu", mfu), ("--lora-rank", lora_rank), ("--pue", pue)):
        _positive(name, v)
    if mfu > 1:
        raise ConfigError(f"--mfu: a fraction of the peak (0 < mfu <= 1), got {mfu}")
    if kwh_price < 0 or (price_per_hour is not None and price_per_hour < 0):
        raise ConfigError("--price-per-hour / --kwh-price: must not be negative")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer: unknown {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    if arch is None:
        arch = analyse(model, vocab_size, overrides, trust_remote_code)
    dflt = arch.run_defaults
    if precision is None and method == "full":
        precision = dflt.get("precision")
    checkpointing = checkpointing or bool(dflt.get("checkpointing"))
    method, precision, dtype = _parse_regime(method, precision, cpu=hw.name == "cpu")
    limit = position_limit(arch.config)
    seq_len = seq_len if seq_len is not None else dflt.get("seq_len", min(1024, limit[1] if limit else 1024))
    micro_batch = micro_batch if micro_batch is not None else dflt.get("micro_batch", 8)
    grad_accum = grad_accum if grad_accum is not None else dflt.get("grad_accum", 1)
    for name, v in (("--seq-len", seq_len), ("--batch", micro_batch), ("--grad-accum", grad_accum)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name}: must be a positive integer, got {v!r}")
    if limit is not None and seq_len > limit[1]:
        raise ConfigError(f"--seq-len: {seq_len} exceeds the model's {limit[0]} {limit[1]} "
                          f"(raise it with --set {limit[0]}={seq_len})")
    if tokens is None and token_ratio is None and steps is None:
        tokens, token_ratio, steps = dflt.get("tokens"), dflt.get("token_ratio"), dflt.get("steps")
    _positive("--tokens", tokens, allow_none=True)
    _positive("--token-ratio", token_ratio, allow_none=True)
    _positive("--params", params, allow_none=True)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
        raise ConfigError(f"--steps: must be a positive integer, got {steps!r}")
    if params is not None and int(params) < 1:
        raise ConfigError(f"--params: must be at least 1, got {params!r}")
    notes: list[str] = []

    n_real = arch.params_total
    n = int(params) if params is not None else n_real
    scale = n / n_real
    if params is not None:
        notes.append(f"parameters set to {n:,} (the architecture has {n_real:,}); activations follow the "
                     f"architecture")
    targets = lora_targets_for(arch, lora_targets) if method != "full" else []
    trainable = n if method == "full" else int(lora_trainable(arch, lora_rank, targets) * scale)
    regime = Regime(dtype, method != "full", tuple(targets), lora_rank if method != "full" else 0)
    per_example, has_reference = OBJECTIVES.get(objective, (1, False))
    chunk = loss_chunk(chunked_loss, loss_chunk_mb, arch.vocab, micro_batch * per_example * seq_len, targets)

    # ---- memory per GPU
    weights, grads, optim = _state_bytes(arch, method, precision, n, trainable, scale,
                                         optimizer_states(optimizer, momentum))
    weights, grads, optim = _sharded_state_bytes(strategy, weights, grads, optim, gpus, arch.n_layers, notes)
    if gpus > 1 and strategy == "ddp":
        grads += 4 * trainable  # DDP's fp32 reduction buckets
        notes.append("data parallel: gradients include DDP's bucket copy (4 bytes per trainable parameter)")
    act_full, act_ckpt, items, act_desc = activation_bytes(arch, seq_len, micro_batch * per_example, regime, scan,
                                                           "cpu" if hw.name == "cpu" else "cuda", chunk)
    if per_example > 1:
        notes.append(f"{objective}: {per_example} sequences per example in each micro batch")
    act = act_ckpt if checkpointing else act_full
    if hw.name == "cpu":
        overhead = int(CPU_OVERHEAD_GIB * GIB)
    else:
        overhead = int((CUDA_OVERHEAD_GIB + (NCCL_OVERHEAD_GIB if gpus > 1 else 0)) * GIB)
    memory = {"weights": int(weights), "gradients": int(grads), "optimizer": int(optim), "activations": int(act),
              "overhead": overhead}
    if has_reference and method == "full":  # a frozen fp32 copy of the starting weights, whole on every rank
        memory["reference"] = 4 * n
        notes.append(f"{objective}: the reference model is a frozen copy of the weights ({_size(4 * n)})")
    elif has_reference:
        notes.append(f"{objective}: the reference model is the base with its adapters off (no copy)")
    if guard_copy:  # lmlab.train.guard.LastGood: the state before the last applied update
        memory["guard"] = int(optim + (weights if method == "full" else 4 * trainable * scale))
        notes.append(f"the guard keeps the last good state ({_size(memory['guard'])}: trainable weights and "
                     f"optimizer state); train.guard_keep=false saves it")
    memory["total"] = sum(memory.values())
    fits = memory["total"] <= hw.memory_bytes * (1 - MARGIN)
    fits_raw = memory["total"] <= hw.memory_bytes

    # ---- compute and time
    if ledger(arch, seq_len, scan, "cpu" if hw.name == "cpu" else "cuda") is not None:
        # 2 FLOPs per matmul weight per token forward, and 4·d·s per attention layer (QKᵀ and AV, the
        # whole s × s as the usual model-FLOPs convention counts it); backward twice the forward
        fwd = 2 * arch.params_matmul * scale + 4 * arch.attn_layers * arch.d_model * seq_len
    else:  # counted: weights used more than once per token (INL's iterations) cost more than 2 each
        fwd = counted_forward_flops(arch, seq_len) * scale
    flops = (3 if method == "full" else 2) * fwd  # LoRA: no weight gradients for the frozen base
    flops_inf = fwd
    compute = "fp32" if precision == "fp32" else ("bf16" if precision == "4bit" else precision)
    peak = hw.peak_tflops(compute)
    recompute = (flops + flops_inf) / flops if checkpointing else 1.0
    tok_s = mfu * peak * 1e12 * gpus / (flops * recompute)
    tokens_per_step = micro_batch * seq_len * grad_accum * gpus
    budget = None
    if tokens is not None:
        budget = float(tokens)
    elif token_ratio is not None:
        budget = float(token_ratio) * n
    if steps is None and budget is not None:
        steps = math.ceil(budget / tokens_per_step)
    run_tokens = steps * tokens_per_step if steps is not None else None
    hours = run_tokens / tok_s / 3600 if run_tokens is not None and hw.name != "cpu" else None
    price = hw.price_per_hour if price_per_hour is None else float(price_per_hour)
    gpu_hours = hours * gpus if hours is not None else None
    kwh = hw.tdp_w * gpus * hours / 1000 * pue if hours is not None else None
    if precision == "4bit":
        notes.append("QLoRA dequantises every weight on the fly: expect a lower MFU than full bf16 training")
    if checkpointing:
        notes.append(f"checkpointing recomputes the forward: time x{recompute:.2f} at the same MFU")
    if hw.name == "cuda":
        notes.append(hw.label)
    if hw.name == "cpu":
        notes.append("CPU: memory only; time and cost are not estimated (bench/bench_profile.py measures the speed)")
        from ..runtime import cpu_bf16_faster

        if advise_precision and precision == "fp32" and (faster := cpu_bf16_faster()) is not None:
            notes.append(f"train.precision=bf16 is faster on this CPU ({faster}): it runs the matmuls in bf16 "
                         f"(the scan, SWELU and the loss stay fp32)")

    est = Estimate(
        model=arch.label, model_type=arch.model_type, params_total=n, params_trainable=trainable,
        method=method, precision=precision, hardware=hw.name, gpu_label=hw.label, gpus=gpus, seq_len=seq_len,
        micro_batch=micro_batch, grad_accum=grad_accum, checkpointing=checkpointing,
        lora_rank=lora_rank if method != "full" else None, lora_targets=list(targets), activation_model=act_desc,
        memory=memory, activations_full=act_full, activations_checkpointed=act_ckpt, gpu_memory=hw.memory_bytes,
        margin=MARGIN, fits=fits, fits_without_margin=fits_raw, flops_per_token=flops,
        flops_per_token_inference=flops_inf, peak_tflops=peak, mfu=mfu, tokens_per_second=tok_s,
        tokens_per_step=tokens_per_step, tokens=run_tokens, steps=steps, hours=hours, strategy=strategy,
        hours_per_billion_tokens=1e9 / tok_s / 3600, gpu_hours=gpu_hours, price_per_hour=price,
        cost=gpu_hours * price if gpu_hours is not None else None, tdp_w=hw.tdp_w, pue=pue, energy_kwh=kwh,
        kwh_price=kwh_price, energy_cost=kwh * kwh_price if kwh is not None else None, activation_items=items,
        notes=notes, vocab_size=arch.vocab, tokenizer=tokenizer or "the model config's vocabulary",
        optimizer=optimizer, objective=objective, loss_chunk=chunk)
    if not fits and suggest:
        est.suggestions = _suggestions(est, arch, dict(
            seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, method=method, precision=precision,
            lora_rank=lora_rank, lora_targets=lora_targets, hardware=hw, gpus=gpus, checkpointing=checkpointing,
            scan=scan, mfu=mfu, params=params, kwh_price=kwh_price, pue=pue, strategy=strategy, optimizer=optimizer,
            momentum=momentum, objective=objective, tokenizer=tokenizer, chunked_loss=chunked_loss,
            loss_chunk_mb=loss_chunk_mb), suggest_methods)
    return est


# ---- strategies: memory per rank (lmlab.train.strategies) ---------------------------------------------------
# planner name → (what the trainer is told, shards optimizer state, shards gradients, shards weights);
# cheapest (least communication) first.
STRATEGIES = {
    "ddp": ("train.strategy=ddp", False, False, False),
    "zero1": ("train.strategy=deepspeed train.zero_stage=1", True, False, False),
    "zero2": ("train.strategy=fsdp train.fsdp_reshard=false, or DeepSpeed ZeRO-2: train.strategy=deepspeed "
              "train.zero_stage=2", True, True, False),
    "fsdp": ("train.strategy=fsdp", True, True, True),
}


def _sharded_state_bytes(strategy: str, weights: float, grads: float, optim: float, gpus: int, layers: int,
                         notes: list[str]) -> tuple[float, float, float]:
    """Weights, gradients and optimizer state per rank once `strategy` splits them over `gpus` ranks.
    FSDP's full sharding still gathers a block's weights at a time: two (the current and the prefetched)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy: unknown {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    _, s_optim, s_grads, s_weights = STRATEGIES[strategy]
    if gpus == 1 or strategy == "ddp":
        return weights, grads, optim
    optim = optim / gpus if s_optim else optim
    grads = grads / gpus if s_grads else grads
    if s_weights:
        weights = weights / gpus + 2 * weights / max(1, layers)
    split = [k for k, on in zip(("optimizer state", "gradients", "weights"), STRATEGIES[strategy][1:]) if on]
    notes.append(f"{strategy}: {', '.join(split)} split over {gpus} ranks")
    return weights, grads, optim


def strategy_of(cfg) -> str:
    """The planner's name for a run config's strategy."""
    t = cfg.train
    if t.strategy == "fsdp":
        return "fsdp" if t.fsdp_reshard else "zero2"
    if t.strategy == "deepspeed":
        return f"zero{t.zero_stage}"
    return "ddp"
# ---- end of strategies ---------------------------------------------------------------------------------------


def loss_chunk(mode: str, chunk_mb: float, vocab: int, tokens: int, lora_targets: list[str]) -> int | None:
    """Tokens per chunk when the trainer runs a micro batch of `tokens` tokens through the chunked loss
    (lmlab.train.losses.LossChunking: `on`, or `auto` when the fp32 logits exceed one chunk of `chunk_mb` MiB),
    None for the plain path; an adapted head (lm_head among the LoRA targets) always takes the plain path."""
    from ..train.losses import LossChunking

    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"train.chunked_loss: unknown {mode!r}; allowed: auto, on, off")
    _positive("train.loss_chunk_mb", chunk_mb)
    policy = LossChunking(mode, chunk_mb)
    if "lm_head" in lora_targets or not policy.wanted(tokens, vocab):
        return None
    return policy.chunk_tokens(vocab)


def optimizer_states(optimizer: str, momentum: float = 0.9) -> int:
    """fp32 tensors the optimizer keeps per trainable parameter (lmlab.train.optim): AdamW m and v; SGD its
    momentum buffer, none without momentum."""
    if optimizer == "adamw":
        return 2
    return 1 if momentum > 0 else 0


def _state_bytes(arch: Arch, method: str, precision: str, n: int, trainable: int, scale: float, states: int = 2):
    """(weights, gradients, optimizer) bytes per GPU; see the module docstring for the accounting."""
    if method == "full":
        weights = 4 * n + (0 if precision == "fp32" else 2 * arch.params_linear_weights * scale)
        return weights, 4 * n, 4 * states * n
    adapters = 4 * trainable
    if method == "lora":
        base = n * (4 if precision == "fp32" else 2)
    else:
        q = arch.params_quantizable * scale
        base = q * NF4_BYTES + (n - q) * 2 + 2 * arch.largest_linear * scale
    return base + adapters, 4 * trainable, 4 * states * trainable


def _suggestions(est: Estimate, arch: Arch, opts: dict[str, Any], methods: bool = True) -> list[str]:
    """Changes that make the run fit, each checked with the same model."""
    out: list[str] = []

    def fits(**change) -> Estimate | None:
        e = estimate(arch=arch, suggest=False, **{**opts, **change})
        return e if e.fits else None

    if not est.checkpointing and (e := fits(checkpointing=True)):
        out.append(f"train.activation_checkpointing=true: {gib(e.memory['total']):.1f} GiB")
    b, acc = est.micro_batch, est.grad_accum
    while b > 1 and b % 2 == 0:
        b, acc = b // 2, acc * 2
        if e := fits(micro_batch=b, grad_accum=acc):
            out.append(f"train.batch_size={b} train.grad_accum={acc} (same tokens per step): "
                       f"{gib(e.memory['total']):.1f} GiB")
            break
    if not est.checkpointing and est.micro_batch > 1:
        b, acc = est.micro_batch, est.grad_accum
        while b > 1 and b % 2 == 0:
            b, acc = b // 2, acc * 2
            if e := fits(micro_batch=b, grad_accum=acc, checkpointing=True):
                out.append(f"train.activation_checkpointing=true train.batch_size={b} train.grad_accum={acc}: "
                           f"{gib(e.memory['total']):.1f} GiB")
                break
    if est.gpus > 1:  # the cheapest strategy that fits, on the same GPUs
        names = list(STRATEGIES)
        for name in names[names.index(est.strategy) + 1:]:
            if e := fits(strategy=name):
                out.append(f"{STRATEGIES[name][0]} (memory per rank): {gib(e.memory['total']):.1f} GiB")
                break
    for method in ("lora", "qlora") if methods else ():
        if est.method in ("full", "lora") and method != est.method:
            try:
                e = fits(method=method, precision=None if method == "qlora" else "bf16")
            except ConfigError:  # no LoRA targets in this model
                e = None
            if e:
                out.append(f"finetune.method={method} (rank {e.lora_rank}): {gib(e.memory['total']):.1f} GiB")
                break
    for hw in sorted(HARDWARE.values(), key=lambda h: h.memory_gib):
        if hw.memory_gib > gib(est.gpu_memory) and (e := fits(hardware=hw)):
            out.append(f"a {hw.name} ({hw.memory_gib:g} GiB, --hardware {hw.name}): {gib(e.memory['total']):.1f} GiB")
            break
    if not out:  # no single change is enough: the leanest combinations
        acc = est.micro_batch * est.grad_accum
        leaner = [m for m in ("lora", "qlora") if methods and est.method != "qlora" and m != est.method]
        for method in [est.method, *leaner]:
            try:
                e = fits(method=method, precision=None if method != est.method else est.precision,
                         checkpointing=True, micro_batch=1, grad_accum=acc)
            except ConfigError:
                e = None
            if e:
                key = "" if method == est.method else f"finetune.method={method} "
                out.append(f"{key}train.activation_checkpointing=true train.batch_size=1 train.grad_accum={acc}: "
                           f"{gib(e.memory['total']):.1f} GiB")
                break
    return out


def estimate_for_run(cfg, rt, model: nn.Module | None = None) -> Estimate:
    """The plan of a resolved run config on the trainer's device (`Runtime`): the method, adapter targets,
    optimizer, objective and strategy the trainer will use; `model` (what the trainer built) gives the exact
    vocabulary. For the trainer's memory line: no precision note (and no matmul timing at the run's start)."""
    from .hardware import cpu_hardware, hardware_from_device

    hw = hardware_from_device(rt.device) if rt.device.type == "cuda" else cpu_hardware()
    config = getattr(model, "config", None) if model is not None else None
    if config is not None and getattr(config, "vocab_size", None):
        vocab, tok = int(config.vocab_size), "the run's tokenizer"
    else:
        vocab, tok = run_tokenizer(cfg)
    overrides = cfg.model.overrides if cfg.model.name in _named() else None
    t, ft = cfg.train, cfg.finetune
    method = ft.method if t.objective != "pretrain" or ft.method != "full" else "full"
    return estimate(cfg.model.name, seq_len=cfg.data.seq_len, micro_batch=t.batch_size, grad_accum=t.grad_accum,
                    precision=None if method == "qlora" else rt.precision, hardware=hw, gpus=max(rt.world_size, 1),
                    tokens=t.max_tokens, token_ratio=t.token_ratio if t.max_tokens is None else None,
                    steps=t.max_steps if t.max_tokens is None and t.token_ratio is None else None,
                    vocab_size=vocab, overrides=overrides, trust_remote_code=cfg.model.trust_remote_code,
                    checkpointing=t.activation_checkpointing, suggest_methods=False, strategy=strategy_of(cfg),
                    method=method, lora_rank=ft.lora_rank, lora_targets=list(ft.lora_targets) or None,
                    optimizer=t.optimizer, momentum=t.momentum, objective=t.objective, tokenizer=tok,
                    guard_copy=t.guard != "off" and t.guard_keep and t.strategy != "deepspeed",
                    chunked_loss=t.chunked_loss, loss_chunk_mb=t.loss_chunk_mb, advise_precision=False)


def memory_line(cfg, rt, model: nn.Module | None = None) -> str:
    """The trainer's memory line for this device: what fits, or a WARNING with config keys that would fit."""
    try:
        fits, msg = memory_fits(estimate_for_run(cfg, rt, model))
    except Exception as e:  # noqa: BLE001 - the plan is advice; it must never stop a run
        return f"warning: could not estimate memory: {e}"
    return f"memory    {msg}" if fits else f"WARNING   {msg}"


def _named() -> dict:
    from ..models import registry

    return registry.named_sizes()
