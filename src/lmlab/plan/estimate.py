"""How many parameters, how much memory per GPU, how long and how much money a training run takes.

    est = estimate("mamba-swelu-124m", seq_len=1024, micro_batch=4, grad_accum=4, hardware="rtx4090",
                   gpus=2, token_ratio=100)
    print(format_plan(est));  ok, why = memory_fits(est)

Nothing is allocated: the model is built on the meta device and counted. The formulas (docs/planner.md
has them with their derivation and the CPU measurements that hold them):

Memory per GPU (bytes; N parameters, T trainable, b micro batch, s sequence, V vocabulary)
    full fp32      weights 4N, gradients 4N, AdamW m and v 8N              (the fp32 weights are the master)
    full bf16/fp16 torch.autocast over fp32 parameters, as lmlab's trainer runs it: weights 4N + 2·N_lin
                   (the bf16 copies of the matmul weights that autocast keeps for the backward),
                   gradients 4N (fp32), AdamW m, v 8N                      (= 16N + 2·N_lin)
    lora           frozen base in the precision's dtype (2N or 4N) + fp32 adapters 4T, gradients 4T, 8T
    qlora          base linears in NF4 with double-quantised constants (4.127 bits/param), the rest bf16,
                   + one dequantised layer, fp32 adapters 4T, gradients 4T, AdamW 8T
    data parallel  + a second fp32 copy of the trainable gradients (DDP's reduction buckets)
    activations    what autograd keeps for the backward of one micro batch, written per layer as a
                   ledger of saved tensors (`_llama_ledger`, `_mamba_swelu_ledger`), plus the loss:
                   b·s·V·12 bytes (the fp32 log-softmax output and the two fp32 gradients alive when the
                   loss's backward runs; the trainer's objective drops the logits themselves before the
                   backward, lmlab.train.step). Other architectures are
                   traced: a forward on the meta device records the bytes autograd saves.
    overhead       CUDA context, cuBLAS workspace (+ NCCL buffers with several GPUs)
FLOPs per token: forward F = 2·N_mm + 4·L_attn·d·s (N_mm the parameters that take part in matmuls;
input and position embeddings are lookups), or counted by FlopCounterMode for traced architectures
(INL's integrator reuses its weights every iteration); training 3·F (LoRA 2·F), inference F.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .hardware import CURRENCY, GIB, HARDWARE, Hardware, get_hardware

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "bf16", "fp16", "4bit")
NF4_BYTES = 4.127 / 8  # QLoRA: 4-bit NF4 + double-quantised absmax constants, bytes per parameter
CUDA_OVERHEAD_GIB = 0.8  # CUDA context + cuBLAS workspace on one GPU
CPU_OVERHEAD_GIB = 28 / 1024  # measured: a CPU training step's allocations beyond weights and AdamW states
#                               (autograd engine, thread pools, oneDNN scratch), docs/planner.md
NCCL_OVERHEAD_GIB = 0.4  # NCCL communicator buffers with several GPUs
MARGIN = 0.10  # keep 10 % of the GPU free for the caching allocator's fragmentation
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj",  # attention (Llama, Mistral, INL, ...)
                        "in_proj", "out_proj",  # Mamba mixers
                        "c_attn", "query_key_value", "qkv_proj", "Wqkv", "W_pack")  # fused-QKV families
_LLAMA_TYPES = ("llama", "mistral")  # model types whose layers `_llama_ledger` describes exactly


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
    suggestions: list[str] = field(default_factory=list)  # what would make it fit
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def gib(n: float) -> float:
    return n / GIB


# ------------------------------------------------------------------------------------ the model side
@dataclass
class Arch:
    """What the planner reads from a model built on the meta device."""

    label: str
    config: Any
    model_type: str
    params_total: int
    params_matmul: int  # parameters used in matmuls (the LM head counted even when tied)
    params_linear_weights: int  # weights of nn.Linear (what autocast copies to bf16)
    params_quantizable: int  # Linear weights except the output head (what QLoRA stores in NF4)
    largest_linear: int  # parameters of the largest Linear (QLoRA dequantises one at a time)
    linears: list[tuple[str, int, int]]  # (qualified name, in_features, out_features)
    n_layers: int
    d_model: int
    vocab: int
    attn_layers: int  # layers with softmax attention over the sequence
    attn_impl: str  # sdpa | eager | flash_attention_2 | none
    meta_model: nn.Module | None = None
    run_defaults: dict[str, Any] = field(default_factory=dict)
    traces: dict[Any, tuple[float, float]] = field(default_factory=dict)  # what -> (per layer, outside the layers)
    shallow: tuple[nn.Module, ...] | None = None  # copies with 1 and 2 layers, () if the config cannot say so


def _first_attr(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def load_model_config(model: Any, vocab_size: int | None = None, overrides: dict[str, Any] | None = None,
                      trust_remote_code: bool = False) -> tuple[Any, str, dict[str, Any]]:
    """(PretrainedConfig, label, run defaults) for a named size, a run config YAML, an HF config.json,
    a local model folder or a hub id (or a PretrainedConfig passed through)."""
    from transformers import PretrainedConfig

    from ..models import registry  # importing lmlab.models registers the families

    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "name_or_path", "") or model.model_type, {}
    name = str(model)
    if name in registry.named_sizes():
        return registry.build_config(name, vocab_size, overrides), name, {}
    if os.path.isfile(name):
        if name.endswith((".yaml", ".yml")):
            return _from_run_config(name, vocab_size, overrides)
        if name.endswith(".json"):
            try:
                with open(name) as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{name}: not a readable JSON file ({e})") from None
            if isinstance(d, dict) and "model_type" in d:
                from transformers import AutoConfig

                d = {**d, **(overrides or {})}
                if vocab_size is not None:
                    d["vocab_size"] = vocab_size
                try:
                    return AutoConfig.for_model(**d), name, {}
                except (ValueError, KeyError, TypeError) as e:
                    raise ConfigError(f"{name}: not a valid {d['model_type']!r} config ({e})") from None
            if isinstance(d, dict) and "model" in d:
                return _from_run_config(name, vocab_size, overrides)
            raise ConfigError(f"{name}: expected a Hugging Face config.json (with model_type) or an lmlab run config")
        raise ConfigError(f"{name}: expected a .yaml/.yml run config or a .json model config")
    if name.endswith((".yaml", ".yml", ".json")):
        raise ConfigError(f"{name}: file not found")
    kind = registry.describe_kind(name)  # raises ConfigError for unknown names
    from ..models.hf import load_config

    cfg = load_config(name, trust_remote_code=trust_remote_code)
    for k, v in (overrides or {}).items():
        setattr(cfg, k, v)
    if vocab_size is not None:
        cfg.vocab_size = vocab_size
    return cfg, name if kind == "local" else name, {}


def _from_run_config(path: str, vocab_size, overrides) -> tuple[Any, str, dict[str, Any]]:
    from ..config import load_config as load_run_config

    cfg = load_run_config(path)
    mcfg, label, _ = load_model_config(cfg.model.name, vocab_size or _run_vocab(cfg),
                                       {**cfg.model.overrides, **(overrides or {})}, cfg.model.trust_remote_code)
    t = cfg.train
    defaults = {"seq_len": cfg.data.seq_len, "micro_batch": t.batch_size, "grad_accum": t.grad_accum,
                "tokens": t.max_tokens, "token_ratio": t.token_ratio, "steps": t.max_steps}
    if t.precision in ("fp32", "bf16", "fp16"):
        defaults["precision"] = t.precision
    defaults["checkpointing"] = t.activation_checkpointing
    return mcfg, f"{label} ({path})", defaults


def _run_vocab(cfg) -> int | None:
    """The vocabulary a named size gets from the run's tokenizer, when the config says it without loading it."""
    from ..models import registry

    if cfg.model.name in registry.named_sizes() and cfg.data.tokenizer == "stdlib-bpe":
        return cfg.data.vocab_size
    return None


def _meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    from ..models import registry

    try:
        for fam in registry.FAMILIES.values():
            if isinstance(config, fam.config_cls):
                return registry.build_model(config, device="meta")
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model: cannot build {config.model_type!r} as a causal LM ({e})") from None


def analyse(model: Any = "mamba-swelu-124m", vocab_size: int | None = None, overrides: dict[str, Any] | None = None,
            trust_remote_code: bool = False) -> Arch:
    """Build the model on the meta device and read what the planner needs (no memory, any size)."""
    from ..models.registry import count_parameters

    cfg, label, defaults = load_model_config(model, vocab_size, overrides, trust_remote_code)
    m = _meta_model(cfg, trust_remote_code)
    out_emb = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
    linears, mm, lin_w, quant, largest = [], 0, 0, 0, 0
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Embedding):
            continue
        mm += sum(p.numel() for p in mod.parameters(recurse=False))
        shape = _linear_shape(mod)
        if shape is not None:
            linears.append((name, *shape))
            w = shape[0] * shape[1]
            lin_w += w
            if mod is not out_emb:
                quant += w
                largest = max(largest, w)
    mt = getattr(cfg, "model_type", "") or type(cfg).__name__
    n_layers = int(_first_attr(cfg, "num_hidden_layers", "n_layers", "n_layer", default=0))
    if n_layers < 1:
        raise ConfigError(f"model: {label} has {n_layers} layers; it needs at least one")
    d = int(_first_attr(cfg, "hidden_size", "d_model", "n_embd", default=0))
    has_attn = bool(_first_attr(cfg, "num_attention_heads", "n_heads", "n_head", default=0))
    if mt.startswith("inl") and getattr(cfg, "context", "attention") != "attention":
        has_attn = False
    if "mamba" in mt:
        has_attn = False
    impl = getattr(cfg, "_attn_implementation", None) or ("sdpa" if has_attn else "none")
    return Arch(label=label, config=cfg, model_type=mt, params_total=count_parameters(m), params_matmul=mm,
                params_linear_weights=lin_w, params_quantizable=quant, largest_linear=largest, linears=linears,
                n_layers=n_layers, d_model=d, vocab=int(cfg.vocab_size), attn_layers=n_layers if has_attn else 0,
                attn_impl=impl if has_attn else "none", meta_model=m, run_defaults=defaults)


def _linear_shape(mod: nn.Module) -> tuple[int, int] | None:
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "weight"):  # GPT-2 style (in, out) weight
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    return None


def lora_targets_for(arch: Arch, targets: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The Linear names LoRA adapts: `targets` as given (last name component, as peft matches them;
    'all-linear' = every Linear but the output head), or the attention/mixer projections found."""
    names = {n.rsplit(".", 1)[-1] for n, _, _ in arch.linears}
    if targets:
        targets = list(targets)
        if targets == ["all-linear"]:
            out = arch.meta_model.get_output_embeddings() if arch.meta_model is not None else None
            head = {n for n, mod in arch.meta_model.named_modules() if mod is out} if out is not None else set()
            return sorted({n.rsplit(".", 1)[-1] for n, _, _ in arch.linears if n not in head})
        missing = [t for t in targets if t not in names]
        if missing:
            raise ConfigError(f"--lora-targets: {', '.join(missing)} not among the model's linear layers "
                              f"({', '.join(sorted(names))})")
        return targets
    found = [t for t in DEFAULT_LORA_TARGETS if t in names]
    if not found:
        raise ConfigError(f"--lora-targets: no attention or mixer projection found in {arch.label}; "
                          f"name some of: {', '.join(sorted(names))}")
    return found


def lora_trainable(arch: Arch, rank: int, targets: list[str]) -> int:
    """peft's count: r·(in + out) for every targeted Linear (lora_A in→r, lora_B r→out, no bias)."""
    tset = set(targets)
    return sum(rank * (i + o) for n, i, o in arch.linears if n.rsplit(".", 1)[-1] in tset)


# ------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class Saved:
    """One tensor (group) autograd keeps for the backward, per token of the micro batch.

    kind:  act      compute dtype (4 bytes fp32, 2 bytes 16-bit)
           f32      always fp32 (norm statistics, the scan's fp32 compute, softmax statistics)
           resid    residual stream / norm internals: fp32 unless the whole model is stored in 16-bit
           f32copy  an fp32 upcast that exists only when the compute dtype is 16-bit
           lin      the input of Linear `consumers`: saved for their weight gradient; under autocast
                    each consumer saves its own bf16 cast when the source is fp32 (`src32`); with LoRA
                    only adapted consumers save it (peft casts it to the fp32 adapter dtype)
           ids      int64 token ids
    alias: the tensor is already counted by an earlier entry (only extra casts add bytes).
    """

    name: str
    per_token: float
    kind: str
    consumers: tuple[str, ...] = ()
    src32: bool = False
    alias: bool = False


@dataclass(frozen=True)
class Regime:
    dtype: str  # fp32 | amp (autocast over fp32 weights) | half (weights stored in 16-bit)
    frozen: bool  # base weights frozen (LoRA/QLoRA)
    targets: tuple[str, ...] = ()
    rank: int = 0

    @property
    def p(self) -> int:
        return 4 if self.dtype == "fp32" else 2


def _entry_bytes(e: Saved, r: Regime) -> float:
    """Bytes per token of one ledger entry under a regime (see `Saved`)."""
    if e.kind == "act":
        return e.per_token * r.p
    if e.kind == "f32":
        return e.per_token * 4
    if e.kind == "resid":
        return e.per_token * (2 if r.dtype == "half" else 4)
    if e.kind == "f32copy":
        return e.per_token * (0 if r.dtype == "fp32" else 4)
    if e.kind == "ids":
        return e.per_token * 8
    if e.kind == "lin":
        if not r.frozen:
            if r.dtype == "amp" and e.src32:
                return e.per_token * 2 * len(e.consumers)
            return 0 if e.alias else e.per_token * r.p
        adapted = [c for c in e.consumers if c in r.targets]
        if not adapted:
            return 0
        # the adapter's own input (fp32: the tensor itself; 16-bit: peft's fp32 cast per adapter)
        base = (0 if e.alias else e.per_token * 4) if r.dtype == "fp32" else e.per_token * 4 * len(adapted)
        return base + 4 * r.rank * len(adapted)  # + lora_A's output, saved by lora_B
    raise ValueError(f"unknown ledger kind {e.kind!r}")


def _llama_ledger(cfg, seq_len: int, attn_impl: str) -> tuple[list[Saved], list[Saved]]:
    """One Llama decoder layer (RMSNorm, RoPE, SDPA, SwiGLU) and the part after the layers, per token.

    h hidden, h_kv = kv heads × head dim, i intermediate, a heads. Measured on transformers' code:
    RMSNorm keeps its fp32 input, the normalised tensor and (for the projections) its output; SDPA
    (flash / memory-efficient) keeps q, k, v, its output and the log-sum-exp, never the s × s scores;
    o_proj reads SDPA's output without a copy. Eager attention adds the a·s probabilities per token.
    """
    h = cfg.hidden_size
    a = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or h // a
    kv = (getattr(cfg, "num_key_value_heads", None) or a) * hd
    i = cfg.intermediate_size
    layer = [
        Saved("attn_norm.input", h, "f32"), Saved("attn_norm.rstd", 1, "f32"),
        Saved("attn_norm.normalized", h, "resid"),
        Saved("q/k/v_proj.input", h, "lin", ("q_proj", "k_proj", "v_proj"), src32=True),
        Saved("q (after RoPE)", a * hd, "act"), Saved("k (after RoPE)", kv, "act"), Saved("v", kv, "act"),
        Saved("attention.output", a * hd, "act"),
        Saved("o_proj.input", a * hd, "lin", ("o_proj",), alias=True),
    ]
    if attn_impl == "eager":
        layer += [Saved("attention.probs (fp32)", a * seq_len, "f32"),
                  Saved("attention.probs (cast)", a * seq_len, "f32copy")]
    else:
        layer += [Saved("attention.logsumexp", a, "f32")]
    layer += [
        Saved("mlp_norm.input", h, "f32"), Saved("mlp_norm.rstd", 1, "f32"),
        Saved("mlp_norm.normalized", h, "resid"),
        Saved("gate/up_proj.input", h, "lin", ("gate_proj", "up_proj"), src32=True),
        Saved("gate (SiLU input)", i, "act"), Saved("SiLU(gate)", i, "act"), Saved("up", i, "act"),
        Saved("down_proj.input", i, "lin", ("down_proj",)),
    ]
    tail = [Saved("input_ids", 1, "ids"), Saved("norm.input", h, "f32"), Saved("norm.rstd", 1, "f32"),
            Saved("norm.normalized", h, "resid"), Saved("lm_head.input", h, "lin", ("lm_head",), src32=True)]
    return layer, tail


def _mamba_swelu_ledger(cfg, scan: str) -> tuple[list[Saved], list[Saved]]:
    """One MambaSWELU block and the dense SWELU tail, per token.

    D d_model, d = expand·D (d_inner), n d_state, r dt_rank. Every backend keeps: LayerNorm input,
    in_proj input, xz = in_proj(x) (2d: the conv reads x, the gate reads z), the conv output (SiLU
    input), u = SiLU(conv) and its transposed copy for x_proj, (δ_r, B, C), δ before the bias and
    softplus, the transposed copy of y for out_proj, then the SWELU input. Beyond that:
        cpu, mamba_ssm   fused: bias, softplus, D skip and gate inside the kernel; one (d, n) state per
                         SCAN_CHUNK steps
        triton, chunked  the element-wise parts stay in autograd (fp32): δ after softplus, y + D·u,
                         SiLU(z), the fp32 copies of u and z under 16-bit; states per SCAN_CHUNK steps
        ref              the same element-wise parts, and dA_t, h_t for every step: 2·d·n per token
    """
    D, n = cfg.d_model, cfg.d_state
    d = cfg.expand * D
    r = math.ceil(D / 16) if cfg.dt_rank == "auto" else int(cfg.dt_rank)
    layer = [
        Saved("norm.input", D, "resid"), Saved("norm.mean/rstd", 2, "f32"),
        Saved("in_proj.input", D, "lin", ("in_proj",), src32=True),
        Saved("xz = in_proj(x)", 2 * d, "act"), Saved("conv1d.output", d, "act"), Saved("u = SiLU(conv)", d, "act"),
        Saved("x_proj.input (u transposed)", d, "lin", ("x_proj",)), Saved("dt, B, C", r + 2 * n, "act"),
        Saved("delta before softplus", d, "f32"),
        Saved("out_proj.input (y transposed)", d, "lin", ("out_proj",)), Saved("SWELU input", D, "act"),
    ]
    if scan not in ("cpu", "mamba_ssm"):
        layer += [Saved("u (fp32 copy)", d, "f32copy"), Saved("delta", d, "f32"), Saved("y + D*u", d, "f32"),
                  Saved("z (fp32 copy)", d, "f32copy"), Saved("SiLU(z)", d, "f32")]
    if scan == "ref":
        layer += [Saved("scan states dA_t, h_t (ref)", 2 * d * n, "f32"), Saved("delta_t*u_t (ref)", d, "f32")]
    else:
        from ..models.scan import SCAN_CHUNK  # steps between the states a backend keeps for its backward

        layer += [Saved("scan chunk states", d * n / SCAN_CHUNK[scan], "f32")]
    dims = [D] + [cfg.dense_hidden] * (cfg.n_dense - 1) + [D]
    tail = [Saved("input_ids", 1, "ids"), Saved("norm_f.input", D, "resid"), Saved("norm_f.mean/rstd", 2, "f32")]
    for k in range(cfg.n_dense):
        tail.append(Saved(f"dense.{k}.fc.input", dims[k], "lin", ("fc",), src32=(k == 0)))
        tail.append(Saved(f"dense.{k}.SWELU input", dims[k + 1], "act"))
    tail.append(Saved("lm_head.input", D, "lin", ("lm_head",)))
    return layer, tail


def _resolve_scan(arch: Arch, scan: str, device: str) -> str:
    """The backend the trainer would use: the model config's choice, else the device's default
    (CPU: the fused C++ kernel; GPU: the Triton kernel, since mamba_ssm is an optional extra)."""
    from ..models import scan as scan_lib  # the trainer's resolver, deciding from the device type alone

    if scan == "auto":
        scan = getattr(arch.config, "scan_backend", "auto")
    return scan_lib.resolve_backend(scan, device, probe=False)


def _ledger(arch: Arch, seq_len: int, scan: str, device: str):
    """(layer entries, tail entries, description) or None when the architecture is traced instead."""
    cfg = arch.config
    if arch.model_type == "mamba_swelu":
        s = _resolve_scan(arch, scan, device)
        return (*_mamba_swelu_ledger(cfg, s), f"formula: MambaSWELU block ({s} scan)")
    names = {n.rsplit(".", 1)[-1] for n, _, _ in arch.linears}
    llama_like = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    if arch.model_type in _LLAMA_TYPES and llama_like:
        return (*_llama_ledger(cfg, seq_len, arch.attn_impl), f"formula: Llama layer ({arch.attn_impl} attention)")
    return None


_LAYER_KEYS = ("n_layers", "num_hidden_layers", "n_layer", "num_layers")


def _trace_saved_bytes(m: nn.Module, seq_len: int, regime: Regime) -> tuple[int, int]:
    """(bytes autograd saves in a forward of one sequence, bytes of score tensors (…, s, s) among them),
    measured with saved-tensor hooks on the meta device (fp32; shared storages counted once)."""
    m.train()
    targets = set(regime.targets)
    for name, p in m.named_parameters():
        mod = name.rsplit(".", 2)[-2] if "." in name else name
        p.requires_grad_(not regime.frozen or mod in targets)
    skip = {p.untyped_storage()._cdata for p in m.parameters()} | {b.untyped_storage()._cdata for b in m.buffers()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            key, nbytes = st._cdata, st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            key, nbytes = id(t), t.numel() * t.element_size()
        if key not in skip and key not in seen:
            scores = t.dim() >= 2 and seq_len > 1 and t.shape[-1] == seq_len and t.shape[-2] == seq_len
            seen[key] = (nbytes, scores)
        return t

    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(input_ids=ids)
    except Exception as e:  # noqa: BLE001 - any model may fail on meta tensors; the caller says so
        raise RuntimeError(f"meta trace failed: {type(e).__name__}: {e}") from None
    finally:
        for p in m.parameters():
            p.requires_grad_(True)
    total = sum(v[0] for v in seen.values())
    scores = sum(v[0] for v in seen.values() if v[1])
    return total, scores


def _with_layers(arch: Arch, k: int) -> nn.Module | None:
    """The same architecture with k layers, on the meta device (None if the config cannot say so)."""
    cfg = copy.deepcopy(arch.config)
    for key in _LAYER_KEYS:
        if key in vars(cfg):
            setattr(cfg, key, k)
            try:
                return _meta_model(cfg)
            except Exception:  # noqa: BLE001 - configs with per-layer lists; use the whole model instead
                return None
    return None


def _per_layer(arch: Arch, key: Any, measure) -> tuple[float, float]:
    """(per layer, outside the layers) of `measure(meta model)`, cached under `key`. Measured on copies
    with 1 and 2 layers (the difference is one layer), so the largest models cost the same as the
    smallest; when the config cannot be cut, the whole model is measured and shared evenly."""
    if key not in arch.traces:
        if arch.shallow is None:
            one, two = _with_layers(arch, 1), _with_layers(arch, 2)
            arch.shallow = (one, two) if one is not None and two is not None else ()
        if arch.shallow:
            m1, m2 = (measure(m) for m in arch.shallow)
            arch.traces[key] = (m2 - m1, max(2 * m1 - m2, 0))
        else:
            arch.traces[key] = (measure(arch.meta_model) / max(arch.n_layers, 1), 0.0)
    return arch.traces[key]


def _traced_layer_and_tail(arch: Arch, seq_len: int, regime: Regime) -> tuple[float, float]:
    """(bytes per layer, bytes outside the layers) saved for one sequence in fp32, score tensors removed
    unless attention runs eagerly."""
    eager = arch.attn_impl == "eager"

    def net(m):
        total, scores = _trace_saved_bytes(m, seq_len, regime)
        return total - (0 if eager else scores)  # SDPA/flash never keep the s x s scores

    return _per_layer(arch, ("saved", seq_len, regime), net)


def activation_bytes(arch: Arch, seq_len: int, micro_batch: int, regime: Regime, scan: str = "auto",
                     device: str = "cuda") -> tuple[int, int, dict[str, int], str]:
    """(without checkpointing, with per-layer checkpointing, items, description), bytes per micro batch."""
    b, s = micro_batch, seq_len
    tokens = b * s
    logits = tokens * arch.vocab * 12  # the loss's fp32 tensors; the logits are not held (lmlab.train.step)
    resid = 2 if regime.dtype == "half" else 4
    led = _ledger(arch, s, scan, device)
    items: dict[str, int] = {}
    if led is not None:
        layer, tail, desc = led
        per_layer = {e.name: _entry_bytes(e, regime) * tokens for e in layer}
        per_tail = {e.name: _entry_bytes(e, regime) * tokens for e in tail}
        layer_bytes = sum(per_layer.values())
        tail_bytes = sum(per_tail.values())
        items = {f"layer.{k}": int(v) for k, v in per_layer.items() if v}
        items |= {f"tail.{k}": int(v) for k, v in per_tail.items() if v}
    else:
        try:
            per_layer, tail = _traced_layer_and_tail(arch, s, regime)
        except RuntimeError as e:
            raise ConfigError(f"model: cannot derive activations for {arch.model_type!r} ({e})") from None
        scale = (1.0 if regime.dtype == "fp32" else 0.5) * b
        layer_bytes, tail_bytes = per_layer * scale, tail * scale
        desc = f"traced on the meta device ({arch.model_type}; 16-bit taken as half of fp32)" \
            if regime.dtype != "fp32" else f"traced on the meta device ({arch.model_type})"
        items = {"layer (traced)": int(layer_bytes), "outside the layers (traced)": int(tail_bytes)}
    items["logits and loss"] = int(logits)
    full = arch.n_layers * layer_bytes + tail_bytes + logits
    # checkpointed: every layer's input stays; the tail and the loss are done with (their backward has
    # run) before the first layer is recomputed, so the peak is the larger of the two phases
    inputs = arch.n_layers * tokens * arch.d_model * resid
    ckpt = inputs + max(tail_bytes + logits, layer_bytes + 2 * tokens * arch.d_model * 4)
    return int(full), int(min(ckpt, full)), items, desc


def _counted_forward_flops(arch: Arch, seq_len: int) -> float:
    """Forward FLOPs per token counted by PyTorch's FlopCounterMode on the meta device, so weights used
    several times per token count every time."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(m) -> float:
        m.eval()
        try:
            with FlopCounterMode(display=False) as fc:
                m(input_ids=torch.zeros(1, seq_len, dtype=torch.long, device="meta"))
        except Exception as e:  # noqa: BLE001 - any model may fail on meta tensors
            raise ConfigError(f"model: cannot count the FLOPs of {arch.model_type!r} ({type(e).__name__}: {e})") \
                from None
        return fc.get_total_flops() / seq_len

    per_layer, tail = _per_layer(arch, ("flops", seq_len), count)
    return arch.n_layers * per_layer + tail


def _position_limit(config) -> tuple[str, int] | None:
    """(config key, longest sequence) for models with a hard position limit (learned positions)."""
    for key in ("max_seq_len", "n_positions"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return key, v
    if getattr(config, "model_type", "") in ("gpt2", "gpt_neo", "opt", "bloom") and \
            isinstance(getattr(config, "max_position_embeddings", None), int):
        return "max_position_embeddings", config.max_position_embeddings
    return None


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
             suggest_methods: bool = True, strategy: str = "ddp") -> Estimate:
    """Plan a training run. `model`: a named size, a run config (.yaml), an HF config.json, a model folder,
    a hub id or a PretrainedConfig. A run config supplies seq_len, batch, accumulation, precision and the
    token budget unless given here. `params` replaces the parameter count (to plan a custom size);
    the architecture still decides activations. Money in USD; `kwh_price` in USD per kWh. When the run
    does not fit, `suggestions` lists changes that would make it fit (LoRA/QLoRA only with
    `suggest_methods`: they make sense for fine-tuning, not for pretraining from scratch)."""
    hw = get_hardware(hardware)
    if sum(x is not None for x in (tokens, token_ratio, steps)) > 1:
        raise ConfigError("--steps, --tokens and --token-ratio: give one budget, not several")
    for name, v in (("--gpus", gpus), ("--mfu", mfu), ("--lora-rank", lora_rank), ("--pue", pue)):
        _positive(name, v)
    if mfu > 1:
        raise ConfigError(f"--mfu: a fraction of the peak (0 < mfu <= 1), got {mfu}")
    if kwh_price < 0 or (price_per_hour is not None and price_per_hour < 0):
        raise ConfigError("--price-per-hour / --kwh-price: must not be negative")
    if arch is None:
        arch = analyse(model, vocab_size, overrides, trust_remote_code)
    dflt = arch.run_defaults
    if precision is None and method == "full":
        precision = dflt.get("precision")
    checkpointing = checkpointing or bool(dflt.get("checkpointing"))
    method, precision, dtype = _parse_regime(method, precision, cpu=hw.name == "cpu")
    limit = _position_limit(arch.config)
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

    # ---- memory per GPU
    weights, grads, optim = _state_bytes(arch, method, precision, n, trainable, scale)
    weights, grads, optim = _sharded_state_bytes(strategy, weights, grads, optim, gpus, arch.n_layers, notes)
    if gpus > 1 and strategy == "ddp":
        grads += 4 * trainable  # DDP's fp32 reduction buckets
        notes.append("data parallel: gradients include DDP's bucket copy (4 bytes per trainable parameter)")
    act_full, act_ckpt, items, act_desc = activation_bytes(arch, seq_len, micro_batch, regime, scan,
                                                                 "cpu" if hw.name == "cpu" else "cuda")
    act = act_ckpt if checkpointing else act_full
    if hw.name == "cpu":
        overhead = int(CPU_OVERHEAD_GIB * GIB)
    else:
        overhead = int((CUDA_OVERHEAD_GIB + (NCCL_OVERHEAD_GIB if gpus > 1 else 0)) * GIB)
    memory = {"weights": int(weights), "gradients": int(grads), "optimizer": int(optim), "activations": int(act),
              "overhead": overhead}
    memory["total"] = sum(memory.values())
    fits = memory["total"] <= hw.memory_bytes * (1 - MARGIN)
    fits_raw = memory["total"] <= hw.memory_bytes

    # ---- compute and time
    if _ledger(arch, seq_len, scan, "cpu" if hw.name == "cpu" else "cuda") is not None:
        # 2 FLOPs per matmul weight per token forward, and 4·d·s per attention layer (QKᵀ and AV, the
        # whole s × s as the usual model-FLOPs convention counts it); backward twice the forward
        fwd = 2 * arch.params_matmul * scale + 4 * arch.attn_layers * arch.d_model * seq_len
    else:  # counted: weights used more than once per token (INL's iterations) cost more than 2 each
        fwd = _counted_forward_flops(arch, seq_len) * scale
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
        notes.append("CPU: memory only; time and cost are not estimated (bench/bench_lm.py measures the speed)")

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
        notes=notes)
    if not fits and suggest:
        est.suggestions = _suggestions(est, arch, dict(
            seq_len=seq_len, micro_batch=micro_batch, grad_accum=grad_accum, method=method, precision=precision,
            lora_rank=lora_rank, lora_targets=lora_targets, hardware=hw, gpus=gpus, checkpointing=checkpointing,
            scan=scan, mfu=mfu, params=params, kwh_price=kwh_price, pue=pue, strategy=strategy), suggest_methods)
    return est


# ---- strategies: memory per rank (lmlab.train.strategy) ---------------------------------------------------
# planner name → (what the trainer is told, shards optimizer state, shards gradients, shards weights);
# cheapest (least communication) first.
STRATEGIES = {
    "ddp": ("train.strategy=ddp", False, False, False),
    "zero1": ("train.strategy=deepspeed train.zero_stage=1", True, False, False),
    "zero2": ("train.strategy=fsdp train.fsdp_reshard=false", True, True, False),
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


def _state_bytes(arch: Arch, method: str, precision: str, n: int, trainable: int, scale: float):
    """(weights, gradients, optimizer) bytes per GPU; see the module docstring for the accounting."""
    if method == "full":
        weights = 4 * n + (0 if precision == "fp32" else 2 * arch.params_linear_weights * scale)
        return weights, 4 * n, 8 * n
    adapters = 4 * trainable
    if method == "lora":
        base = n * (4 if precision == "fp32" else 2)
    else:
        q = arch.params_quantizable * scale
        base = q * NF4_BYTES + (n - q) * 2 + 2 * arch.largest_linear * scale
    return base + adapters, 4 * trainable, 8 * trainable


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
    for method in ("lora", "qlora") if methods else ():
        if est.method in ("full", "lora") and method != est.method:
            try:
                e = fits(method=method, precision=None if method == "qlora" else "bf16")
            except ConfigError:  # no LoRA targets in this model
                e = None
            if e:
                out.append(f"finetune.method={method} (rank {e.lora_rank}): {gib(e.memory['total']):.1f} GiB")
                break
    if est.gpus > 1:  # the cheapest strategy that fits, on the same GPUs
        names = list(STRATEGIES)
        for name in names[names.index(est.strategy) + 1:]:
            if e := fits(strategy=name):
                out.append(f"{STRATEGIES[name][0]} (memory per rank): {gib(e.memory['total']):.1f} GiB")
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


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def memory_fits(est: Estimate) -> tuple[bool, str]:
    """(fits with the margin, one line saying so — with what would make it fit when it does not)."""
    m = est.memory
    where = "of host memory" if est.hardware == "cpu" else "per GPU"
    split = ", ".join(f"{k} {_size(m[k])}" for k in ("weights", "gradients", "optimizer", "activations", "overhead"))
    if est.fits:
        return True, f"fits: {_size(m['total'])} of {_size(est.gpu_memory)} {where} ({split})"
    head = "tight" if est.fits_without_margin else "does not fit"
    msg = (f"{head}: needs {_size(m['total'])} of {_size(est.gpu_memory)} {where} ({split}; "
           f"{est.margin:.0%} kept free for fragmentation)")
    if est.suggestions:
        msg += "; would fit with: " + "; ".join(est.suggestions)
    return False, msg


def fmt_hours(h: float) -> str:
    return f"{h:.1f} h" if h < 48 else f"{h:,.0f} h ({h / 24:.1f} days)"


def format_plan(est: Estimate) -> str:
    """A few lines for logs: parameters, memory per GPU, speed, time and cost."""
    m = est.memory
    tr = "" if est.method == "full" else f", {est.params_trainable:,} trainable ({est.method} r={est.lora_rank})"
    lines = [
        f"plan      {est.model}: {est.params_total:,} params{tr}; {est.gpus}x {est.hardware} {est.precision}, "
        f"batch {est.micro_batch} x seq {est.seq_len} x accum {est.grad_accum} x {est.gpus} GPU = "
        f"{est.tokens_per_step:,} tokens/step",
        f"memory    {gib(m['total']):.1f} GiB of {gib(est.gpu_memory):.1f} GiB per GPU: weights "
        f"{gib(m['weights']):.2f}, grads {gib(m['gradients']):.2f}, optimizer {gib(m['optimizer']):.2f}, "
        f"activations {gib(m['activations']):.2f}{' (checkpointed)' if est.checkpointing else ''}, "
        f"overhead {gib(m['overhead']):.2f}",
        f"speed     {est.tokens_per_second:,.0f} tokens/s at MFU {est.mfu:.0%} "
        f"({est.flops_per_token / 1e9:.2f} GFLOP/token, {est.peak_tflops:g} TFLOP/s peak per GPU)",
    ]
    if est.hours is not None:
        lines.append(f"budget    {est.tokens:,} tokens = {est.steps:,} steps, {fmt_hours(est.hours)}, "
                     f"{est.gpu_hours:,.0f} GPU-h = {est.cost:,.0f} {est.currency} "
                     f"+ {est.energy_kwh:,.0f} kWh = {est.energy_cost:,.0f} {est.currency} electricity")
    ok, msg = memory_fits(est)
    if not ok:
        lines.append(f"WARNING   {msg}")
    return "\n".join(lines)


def estimate_for_run(cfg, rt, model: nn.Module | None = None) -> Estimate:
    """The plan of a resolved run config on the trainer's device (`Runtime`); `model` gives the exact vocab."""
    from .hardware import cpu_hardware, hardware_from_device

    hw = hardware_from_device(rt.device) if rt.device.type == "cuda" else cpu_hardware()
    vocab = model.config.vocab_size if model is not None and hasattr(model, "config") else None
    overrides = cfg.model.overrides if cfg.model.name in _named() else None
    t = cfg.train
    e = estimate(cfg.model.name, seq_len=cfg.data.seq_len, micro_batch=t.batch_size, grad_accum=t.grad_accum,
                 precision=rt.precision, hardware=hw, gpus=max(rt.world_size, 1), tokens=t.max_tokens,
                 token_ratio=t.token_ratio if t.max_tokens is None else None,
                 steps=t.max_steps if t.max_tokens is None and t.token_ratio is None else None,
                 vocab_size=vocab or _run_vocab(cfg), overrides=overrides,
                 trust_remote_code=cfg.model.trust_remote_code, checkpointing=t.activation_checkpointing,
                 suggest_methods=False, strategy=strategy_of(cfg))
    return e


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
