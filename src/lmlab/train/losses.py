"""The LM head and the token losses computed a chunk of tokens at a time, so that a training step never holds the
(tokens × vocabulary) logits in full.

    linear_cross_entropy_sum(h, weight, targets)   summed cross-entropy of logits h·Wᵀ at targets (-100: none)
    linear_token_logps(h, weight, targets)         log-probability of each target (0 where -100)
    token_loss_sum(logits, targets)                the plain path of the first (the slow reference)
    token_logps(logits, labels)                    the plain path of the second

`linear_cross_entropy_sum` computes, chunk by chunk in its forward, the logits, the loss and — when a gradient
is wanted — the gradients with respect to h and the weight (softmax − one-hot, with label smoothing), and keeps
only those: a (tokens × d) and a (V × d) tensor instead of (tokens × V) logits, and no matmul more than the
plain path (the logits' forward and its two backward matmuls). Its backward scales them by the incoming
gradient, which is exact because the loss is a sum. `linear_token_logps` feeds losses that are nonlinear in the
log-probabilities (DPO and its kin, GRPO): its backward recomputes each chunk's logits (one matmul more).
Both compute only the rows whose target is not -100 (masked SFT and preference replies skip the prompt), run
the matmuls in the autocast dtype when autocast is on (else in the inputs' dtype) and everything after them in
float32, as the plain path does. On the CPU the per-chunk work after the matmul (max, Σ exp, the loss, and the
gradient written over the logits) is one fused kernel, `lmlab.models.kernels_cpu.ce_rows`, which reads bf16 logits
as they are instead of raising a copy to fp32; `kernels_cpu.reference()` runs these torch ops instead.

The models compute the head themselves: `head_computes(model, fn)` swaps the model's output embedding (a bias-
free `nn.Linear`, `get_output_embeddings()`) for a module that calls `fn(h, head.weight)` with the final hidden
states, for the duration of one forward, so the head's weight is read inside the forward, where every strategy
has it whole (FSDP2 gathers it there; DDP and DeepSpeed see it used). lmlab's models and transformers' pass
what the head returns as `.logits`; a model whose forward changes it (a soft cap, a scale) is found out on its
first micro-batch and takes the plain path from then on. `LossChunking` (train.chunked_loss,
train.loss_chunk_mb) decides per micro-batch: `on`, `off`, or `auto` = on when the micro-batch's fp32 logits
would exceed one chunk, and always on the CPU, where even one chunk is faster than the plain path (it never
builds the log-softmax and its gradient separately: bench/bench_profile.py --chunked-loss).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import kernels_cpu

IGNORE = -100
MIB = 2 ** 20


def upcast_half(x: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 raised to fp32 for a softmax or a loss; fp32 and fp64 kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ------------------------------------------------------------------------------------- the plain paths
def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over every target that is not -100, in fp32 for half-precision logits (fp64 stays)."""
    return F.cross_entropy(upcast_half(logits).reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum", label_smoothing=label_smoothing)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b, l−1) log-probability of each labelled next token (0 where labels[:, 1:] is -100); `labels` (b, l)
    unshifted."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(upcast_half(logits[:, :-1]), dim=-1)
    return logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != IGNORE)


# ------------------------------------------------------------------------------------- the chunked paths
def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype of the head's matmul: autocast's when it is on (as nn.Linear would run), else the inputs'."""
    kind = h.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunks(n: int, size: int) -> Iterator[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def _exp_lse(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(z − max) in place of z, logsumexp(z)) per row: one (n, V) tensor alive, where torch.logsumexp
    makes two temporaries of that size."""
    top = z.amax(-1, keepdim=True)
    e = z.sub_(top).exp_()
    return e, e.sum(-1).log_().add_(top.squeeze(1))


def _selected(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows of the targets that are not -100 (k,), those rows of h (k, d), their targets (k,))."""
    t = targets.reshape(-1)
    rows = (t != IGNORE).nonzero().squeeze(1)
    return rows, h.reshape(-1, h.size(-1)).index_select(0, rows), t.index_select(0, rows)


def _add_chunk_grads(g: torch.Tensor, w: torch.Tensor, hc: torch.Tensor, c: slice, grad_h: torch.Tensor | None,
                     grad_w: torch.Tensor | None, need_w: bool, acc: torch.dtype) -> torch.Tensor | None:
    """A chunk's gradient dL/dz (rows × V, in the compute dtype) into grad_h's rows, and the head's gradient so far
    (in `acc`) returned: the first chunk's product taken as it is (no zeros to fill), the next ones accumulated
    in place by the matmul where the dtypes allow."""
    if grad_h is not None:
        torch.mm(g, w, out=grad_h[c])
    if not need_w:
        return None
    if grad_w is None:  # kept in the compute dtype while it is the only chunk's (the backward widens and scales it)
        return g.t() @ hc
    if grad_w.dtype != acc:
        grad_w = grad_w.to(acc)
    if grad_w.dtype == g.dtype:
        return grad_w.addmm_(g.t(), hc)
    return grad_w.add_(g.t() @ hc)


def _scaled(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad · scale in `dtype`: a bf16 head gradient is widened and scaled in one pass on CPU (`widen_scale`, the
    same bits as the cast and the multiply), else in place after the cast."""
    if grad.dtype == torch.bfloat16 and dtype == torch.float32 and kernels_cpu.usable(grad):
        return kernels_cpu.widen_scale(grad, float(scale))
    return grad.to(dtype).mul_(scale.to(dtype))


def _scatter_rows(grad: torch.Tensor, rows: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The selected rows' gradient back in h's shape, zero where the target was -100 (as it is when every row
    was selected: `rows` are ascending)."""
    if rows.numel() == shape[:-1].numel():
        return grad.to(dtype).view(shape)
    full = torch.zeros(shape[:-1].numel(), grad.size(-1), dtype=dtype, device=grad.device)
    return full.index_copy_(0, rows, grad.to(dtype)).view(shape)


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, label_smoothing: float, chunk: int, need_h: bool, need_w: bool):
        cdt = _compute_dtype(h, weight)
        shape, d, vocab = h.shape, h.size(-1), weight.size(0)
        rows, hs, ts = _selected(h, targets)
        w = weight.to(cdt)
        eps = float(label_smoothing)
        acc = torch.promote_types(cdt, torch.float32)  # what the logits are raised to
        total = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty(rows.numel(), d, dtype=cdt, device=h.device) if need_h else None  # every row written
        grad_w = None
        with torch.autocast(h.device.type, enabled=False):
            for c in _chunks(rows.numel(), chunk):
                hc, tc = hs[c].to(cdt), ts[c]
                z = hc @ w.t()
                if kernels_cpu.usable(z):  # the fused CPU kernel: the loss and, in place of z, its gradient
                    total += kernels_cpu.ce_rows(z, tc, eps, grad=need_h or need_w).sum()
                    if need_h or need_w:
                        grad_w = _add_chunk_grads(z, w, hc, c, grad_h, grad_w, need_w, acc)
                    continue
                z = upcast_half(z)  # (n, V) fp32 (fp64 stays), as the plain path upcasts its logits
                picked = z.gather(1, tc.unsqueeze(1)).squeeze(1)
                mean = z.mean(-1) if eps else None
                e, lse = _exp_lse(z)
                loss = lse - picked
                if eps:
                    loss = (1 - eps) * loss + eps * (lse - mean)
                total += loss.sum()
                if not (need_h or need_w):
                    continue
                g = e.div_(e.sum(-1, keepdim=True))  # the softmax, in place of the logits
                g.scatter_add_(1, tc.unsqueeze(1), g.new_full((tc.numel(), 1), eps - 1.0))
                if eps:
                    g.sub_(eps / vocab)
                grad_w = _add_chunk_grads(g.to(cdt), w, hc, c, grad_h, grad_w, need_w, acc)
        if need_w and grad_w is None:  # nothing to predict
            grad_w = torch.zeros(vocab, d, dtype=acc, device=h.device)
        if grad_h is not None:
            grad_h = _scatter_rows(grad_h, rows, shape, h.dtype)
        # kept on ctx rather than saved: the backward scales them in place and hands them over (no second copy)
        ctx.grads = (grad_h, grad_w)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy_sum: its gradients were already handed to a backward")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_w is not None:
            grad_w = _scaled(grad_w, grad_out, ctx.w_dtype)
        return (grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None,
                grad_w, None, None, None, None, None)


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             label_smoothing: float = 0.0, chunk_tokens: int = 4096) -> torch.Tensor:
    """Σ cross-entropy(h·Wᵀ, targets) over the targets that are not -100, as `token_loss_sum(h @ weight.T, …)`,
    without its logits: h (…, d), weight (V, d), targets (…). The gradients are computed in the forward, chunk by
    chunk of `chunk_tokens` rows, when autograd will want them; a scalar in float32."""
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropySum.apply(h, weight, targets, label_smoothing, max(1, int(chunk_tokens)),
                                        grad and h.requires_grad, grad and weight.requires_grad)


class _LinearTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int):
        cdt = _compute_dtype(h, weight)
        rows, hs, ts = _selected(h, targets)
        w = weight.to(cdt)
        lse = torch.empty(rows.numel(), dtype=torch.promote_types(cdt, torch.float32), device=h.device)
        picked = torch.empty_like(lse)
        with torch.autocast(h.device.type, enabled=False):
            for c in _chunks(rows.numel(), chunk):
                z = upcast_half(hs[c].to(cdt) @ w.t())
                picked[c] = z.gather(1, ts[c].unsqueeze(1)).squeeze(1)
                lse[c] = _exp_lse(z)[1]
        out = torch.zeros(targets.numel(), dtype=lse.dtype, device=h.device)
        out.index_copy_(0, rows, picked - lse)
        ctx.save_for_backward(hs, weight, ts, rows, lse)
        ctx.cdt, ctx.chunk, ctx.h_shape, ctx.h_dtype = cdt, chunk, h.shape, h.dtype
        return out.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        hs, weight, ts, rows, lse = ctx.saved_tensors
        cdt, need_h, need_w = ctx.cdt, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        go = grad_out.reshape(-1).index_select(0, rows).to(lse.dtype)
        w = weight.to(cdt)
        d = hs.size(-1)
        grad_h = torch.empty(rows.numel(), d, dtype=cdt, device=hs.device) if need_h else None  # every row written
        grad_w = None
        with torch.autocast(hs.device.type, enabled=False):
            for c in _chunks(rows.numel(), ctx.chunk):
                hc, tc, gc = hs[c].to(cdt), ts[c], go[c]
                p = upcast_half(hc @ w.t()).sub_(lse[c].unsqueeze(1)).exp_()  # softmax of the recomputed logits
                g = p.mul_(-gc.unsqueeze(1))  # d logp_t / d z = onehot − softmax, times the incoming gradient
                g.scatter_add_(1, tc.unsqueeze(1), gc.unsqueeze(1))
                grad_w = _add_chunk_grads(g.to(cdt), w, hc, c, grad_h, grad_w, need_w, lse.dtype)
        if need_w and grad_w is None:  # nothing to predict
            grad_w = torch.zeros_like(weight, dtype=lse.dtype)
        if grad_h is not None:
            grad_h = _scatter_rows(grad_h, rows, ctx.h_shape, ctx.h_dtype)
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None


def linear_token_logps(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       chunk_tokens: int = 4096) -> torch.Tensor:
    """log softmax(h·Wᵀ) at each target (…), 0 where it is -100, float32, without the logits: h (…, d), weight
    (V, d). The backward recomputes each chunk's logits."""
    return _LinearTokenLogps.apply(h, weight, targets, max(1, int(chunk_tokens)))


# ------------------------------------------------------------------------------------- the model's head
def core_model(model: nn.Module) -> nn.Module:
    """The model under DDP (`.module`) or a DeepSpeed engine (`.module`); PEFT models answer for their base."""
    while isinstance(getattr(model, "module", None), nn.Module) and hasattr(model.module, "get_output_embeddings"):
        model = model.module
    return model


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output embedding when it is a bias-free `nn.Linear` (the chunked paths multiply by its weight
    themselves), else None (a head with adapters, a quantised or biased head: the plain path)."""
    get = getattr(core_model(model), "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if type(head) is nn.Linear and head.bias is None else None


class _Head(nn.Module):
    """Stands in for the output embedding during one forward: fn(h, head.weight), the weight read at call time
    (FSDP2 has it gathered only then)."""

    def __init__(self, head: nn.Linear, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        object.__setattr__(self, "head", head)  # not a submodule: the parameters stay the model's own
        self.fn = fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h, self.head.weight)


@contextmanager
def head_computes(model: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Within the block, the model's forward returns fn(final hidden states (b, l, d), head weight (V, d)) as its
    `.logits`. `model` may be wrapped (DDP, DeepSpeed, PEFT); the head must be `output_head`'s."""
    head = output_head(model)
    if head is None:
        raise ValueError(f"{type(core_model(model)).__name__} has no bias-free nn.Linear output embedding")
    for parent in core_model(model).modules():
        name = next((k for k, m in parent._modules.items() if m is head), None)
        if name is not None:
            break
    else:
        raise ValueError("the output embedding is not a submodule of the model")
    parent._modules[name] = _Head(head, fn)
    try:
        yield
    finally:
        parent._modules[name] = head


# ------------------------------------------------------------------------------------- the policy
FASTER_CHUNKED_ON = ("cpu",)  # device types where even one chunk beats the plain path: `auto` always chunks there


@dataclass(frozen=True)
class LossChunking:
    """train.chunked_loss and train.loss_chunk_mb: whether, and in chunks of how many tokens, a micro-batch's loss
    runs through the chunked paths."""

    mode: str = "off"  # auto | on | off
    chunk_mb: float = 256  # fp32 logits per chunk, MiB
    tokens: int = 0  # > 0: this many tokens per chunk, whatever the vocabulary (tests, benchmarks)

    @classmethod
    def of(cls, cfg) -> LossChunking:
        """The run's policy; the trainer's defaults for an objective made without a config (cfg None)."""
        if cfg is None:
            from ..config import TrainConfig

            t = TrainConfig()
            return cls(t.chunked_loss, t.loss_chunk_mb)
        return cls(cfg.train.chunked_loss, cfg.train.loss_chunk_mb)

    def chunk_tokens(self, vocab: int) -> int:
        """Tokens per chunk: max(1, loss_chunk_mb MiB / (4 bytes × vocab)), or `tokens` when set."""
        return self.tokens if self.tokens > 0 else max(1, int(self.chunk_mb * MIB) // (4 * vocab))

    def wanted(self, tokens: int, vocab: int) -> bool:
        """on; or auto and the fp32 logits of `tokens` tokens exceed one chunk (so chunking saves memory)."""
        return self.mode == "on" or (self.mode == "auto" and tokens > self.chunk_tokens(vocab))

    def check(self, model: nn.Module) -> None:
        """Refuse train.chunked_loss=on for a model whose head the chunked path cannot compute (one line)."""
        if self.mode == "on" and output_head(model) is None:
            head = getattr(core_model(model), "get_output_embeddings", lambda: None)()
            raise ConfigError(f"train.chunked_loss=on: the output embedding of {type(core_model(model)).__name__} is "
                              f"{type(head).__name__ if head is not None else 'missing'}, not a bias-free nn.Linear "
                              f"(adapters or quantisation on the head); use train.chunked_loss=auto or off")

    def head_for(self, model: nn.Module, tokens: int) -> nn.Linear | None:
        """The head to chunk through for a forward over `tokens` tokens, or None for the plain path."""
        if self.mode == "off" or core_model(model) in _TRANSFORMING:
            return None
        head = output_head(model)
        if head is None:
            return None
        faster = self.mode == "auto" and head.weight.device.type in FASTER_CHUNKED_ON
        return head if faster or self.wanted(tokens, head.weight.size(0)) else None


# models whose forward changed what their head returned (a soft cap, a scale): the plain path from then on
_TRANSFORMING: weakref.WeakSet = weakref.WeakSet()


def _through_head(model: nn.Module, forward: Callable[[], object], fn, chunking: LossChunking) -> torch.Tensor | None:
    """`forward().logits` with the head computing fn(h, weight); None when the model's forward did not return
    exactly what the head made (it post-processes its logits: a soft cap, a scale), which the plain path must
    then compute (`on` refuses such a model in one line)."""
    made: list[torch.Tensor] = []

    def head(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        made.append(fn(h, w))
        return made[-1]

    with head_computes(model, head):
        out = forward().logits
    if len(made) == 1 and out is made[0]:
        return out
    core = core_model(model)
    if chunking.mode == "on":
        raise ConfigError(f"train.chunked_loss=on: {type(core).__name__}'s forward changes what its output "
                          f"embedding returns (a soft cap or scale of the logits); use train.chunked_loss=auto or off")
    _TRANSFORMING.add(core)
    return None


def lm_loss_sum(model: nn.Module, forward: Callable[[], object], targets: torch.Tensor,
                chunking: LossChunking, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed next-token cross-entropy of `forward()` (the model's forward on the batch; its `.logits` (b, l, V))
    at `targets` (b, l) (-100: none): through `linear_cross_entropy_sum` when `chunking` says so, else the plain
    path."""
    head = chunking.head_for(model, targets.numel())
    if head is not None:
        chunk = chunking.chunk_tokens(head.weight.size(0))
        out = _through_head(model, forward, lambda h, w: linear_cross_entropy_sum(h, w, targets, label_smoothing,
                                                                                  chunk), chunking)
        if out is not None:
            return out
    return token_loss_sum(forward().logits, targets, label_smoothing)


def lm_token_logps(model: nn.Module, forward: Callable[[], object], labels: torch.Tensor,
                   chunking: LossChunking) -> torch.Tensor:
    """(b, l−1) log-probability of each labelled next token of `forward()` (0 where labels[:, 1:] is -100), as
    `token_logps(forward().logits, labels)`; through `linear_token_logps` when `chunking` says so."""
    head = chunking.head_for(model, labels.numel())
    if head is not None:
        chunk = chunking.chunk_tokens(head.weight.size(0))
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # aligned with the positions that predict them
        out = _through_head(model, forward, lambda h, w: linear_token_logps(h, w, targets, chunk), chunking)
        if out is not None:
            return out[:, :-1]
    return token_logps(forward().logits, labels)
