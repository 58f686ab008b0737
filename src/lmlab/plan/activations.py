"""Activation memory: what autograd keeps for the backward of one micro batch.

Per layer, as a ledger of saved tensors (`_llama_ledger`, `_mamba_swelu_ledger`) for the architectures
whose layers it describes exactly, else traced: a forward on the meta device records the bytes autograd
saves (`_trace_saved_bytes`), measured on copies with one and two layers. Forward FLOPs of traced
architectures are counted the same way (`counted_forward_flops`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .arch import Arch, meta_model

_LLAMA_TYPES = ("llama", "mistral")  # model types whose layers `_llama_ledger` describes exactly


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


def ledger(arch: Arch, seq_len: int, scan: str, device: str):
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
                return meta_model(cfg)
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


def loss_bytes(tokens: int, vocab: int, d_model: int, chunk: int | None, regime: Regime) -> tuple[int, str]:
    """(bytes, item name) of the LM head's loss beyond the head's saved input, at its peak.

    Plain path (`chunk` None): b·s·V·12: the fp32 log-softmax and the two fp32 gradients alive when the loss's
    backward runs (the objective drops the logits themselves, lmlab.train.step). Chunked path
    (lmlab.train.losses, `chunk` tokens at a time): one chunk's fp32 logits, turned into their softmax in
    place, chunk·V·4 (+ chunk·V·2 for the 16-bit matmul's output and the gradient's cast), plus the head
    weight's fp32 gradient, V·d·4, computed in the forward and kept until the backward (its gradient for the
    hidden states takes the place of the head's saved input)."""
    if chunk is None:
        return tokens * vocab * 12, "logits and loss"
    chunk = min(chunk, tokens)
    per = 4 if regime.dtype == "fp32" else 6
    return chunk * vocab * per + vocab * d_model * 4, f"loss, chunked ({chunk:,} tokens at a time)"


def activation_bytes(arch: Arch, seq_len: int, micro_batch: int, regime: Regime, scan: str = "auto",
                     device: str = "cuda", loss_chunk: int | None = None) -> tuple[int, int, dict[str, int], str]:
    """(without checkpointing, with per-layer checkpointing, items, description), bytes per micro batch.
    `loss_chunk`: tokens per chunk when the loss runs chunk by chunk (lmlab.train.losses), None for the plain
    path (`loss_bytes`)."""
    b, s = micro_batch, seq_len
    tokens = b * s
    logits, loss_item = loss_bytes(tokens, arch.vocab, arch.d_model, loss_chunk, regime)
    resid = 2 if regime.dtype == "half" else 4
    led = ledger(arch, s, scan, device)
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
    items[loss_item] = int(logits)
    full = arch.n_layers * layer_bytes + tail_bytes + logits
    # checkpointed: every layer's input stays; the tail and the loss are done with (their backward has
    # run) before the first layer is recomputed, so the peak is the larger of the two phases
    inputs = arch.n_layers * tokens * arch.d_model * resid
    ckpt = inputs + max(tail_bytes + logits, layer_bytes + 2 * tokens * arch.d_model * 4)
    return int(full), int(min(ckpt, full)), items, desc


def counted_forward_flops(arch: Arch, seq_len: int) -> float:
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

