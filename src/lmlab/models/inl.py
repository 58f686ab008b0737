"""INL-LLM: transformer-shaped blocks whose token update is a learned second-order (integrator) system.

    tokens ─► wte (+ sinusoidal positions in the projection variant) ─► dropout
          ─► N × INLBlock
          ─► Norm_f ─► LM head (tied to wte)                                    (b, l, V)

One INLBlock, with h (b, l, d) the residual stream:

    u   = Norm_1(h)                                     (b, l, d)
    c   = Context(u)                                    (b, l, d)  causal: token i sees tokens ≤ i
            attention:  o_proj(SDPA(q_proj u, k_proj u, v_proj u)), RoPE on q and k, n_heads heads
            projection: causal running mean of proj(u) (the original INL code's context)
    x₀  = u,  v₀ = 0                                    state starts at the normed block input, at rest
    for t = 0 … T−1 (T = n_iterations), per token:
        z      = GELU(W_c [c, x, v] + b_c)              (b, l, 4·k)  controller MLP, k = controller_hidden
        α      = σ(head_α(z_α)) · exp(−κ · rms(x − μ))  inertia; the exp factor only if dynamic_alpha
        β      = softplus(head_β(z_β))                  correction strength toward μ
        g      = σ(head_g(z_g))                         gate on the step
        v_cand = head_v(z_v)                            candidate velocity
        v      ← α·v + (1 − α)·v_cand − β·(x − μ) + a·sin(γ·t + φ)
        x      ← x + Δt · g · v
    h   = h + dropout(x_T − x₀)                         the block adds the integrator's displacement
    h   = h + dropout(FF(Norm_2(h)))                    FF: GELU MLP (fc_in, fc_out) or SwiGLU

Symbols: b batch, l sequence, d d_model, V vocab, k controller_hidden, T n_iterations, Δt `dt`.
Learnable per layer: μ (equilibrium), γ, φ, a (excitation frequency, phase, amplitude), all (d,);
κ (scalar, kept positive through softplus). The excitation depends on the iteration index t only, so
the model is deterministic. Every quantity is per token: tokens interact only through c.

Choices (see docs/models.md):
  * x₀ = Norm_1(h), v₀ = 0: the integrator starts where the token is, at rest. The block adds x_T − x₀
    (the original code added x_T itself, re-injecting a normed copy of h at every layer).
  * Positions: RoPE in the attention variant (no parameters, no length limit); the projection variant
    has no attention to rotate, so it adds fixed sinusoidal positions to the embeddings, as the original.
  * Controller heads start at zero weight with biases giving α = alpha_init, β = beta_init,
    g = gate_init and v_cand = 0, as the original.
  * Adaptive stop (inference only, `adaptive_stop`): a token stops moving once rms(Δx) < stop_tol; the
    loop ends when every token has stopped. Per token, so results do not depend on what else is in the
    batch and cached decoding matches the full forward. Training always runs T iterations.
  * `seq_idx` (b, l) is a document mask: attention (or the running mean) never crosses a document
    boundary and positions restart at each document.

Options that reproduce the original INL code (docs/models.md has the fidelity table; defaults are lmlab's):
    context_mean           causal | sequence (V0 without a mask: the mean over the whole row, future included)
    attention_residual     False | True (V1: h ← h + drop(attn(norm_attn h)); the integrator starts at norm₁ h)
    attention_bias         False | True (V1: biases on q, k, v, o)
    positions              rope | sinusoidal (attention variant; the projection variant is always sinusoidal)
    block_output           displacement (h + x_T − x₀) | state (h + x_T, both originals)
    controller_activation  gelu | relu (both originals)
    controller_shared      False: 4 groups of k units, one per head (V0's four MLPs) | True: k units shared by
                           the four heads (V1)
    alpha_form             rms: α·exp(−κ·rms(x − μ)), κ learnable | l2: α·exp(−κ₀‖x − μ‖), κ₀ = kappa_init
                           fixed (V1) | batch: α·(1 − exp(−κ₀‖x − x̄‖)), x̄ the mean over every token of the
                           batch (V0)
    excitation_learnable   True | False (amplitude fixed at excitation_init, both originals)
    excitation_clock       iteration (t) | constant (t = 0 at every iteration, V1) | counter (a saved counter
                           that advances once per iteration in training and stands still in eval, V0)
    mu_drift               0 | r: in training μ ← (1 − r)^T μ + (1 − (1 − r)^T)·mean(c) after each forward (V0)
    ff_inner_dropout       False | True (dropout between the FF's two layers, both originals)
    init_scheme            lmlab | pytorch (PyTorch's default Linear init, as both originals)
    decay_all_parameters   False: weight decay on matrices only | True: every parameter (read by the optimizer)
`context_mean: sequence` and `alpha_form: batch` let a token see the future (and the rest of the batch):
they exist to evaluate checkpoints trained that way, warn at the first forward, and refuse to train.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as hf_init
from transformers.modeling_layers import GradientCheckpointingLayer

from .common import (
    CachedGenerationMixin,
    ForwardCall,
    LMConfig,
    LMOutput,
    LMPreTrainedModel,
    config_arguments,
    inv_sigmoid,
    inv_softplus,
    lm_loss,
    lm_output,
    make_norm,
    positions_within_documents,
    run_blocks,
)

_CONTEXTS = ("attention", "projection")
_FFS = ("gelu", "swiglu")
_NORMS = ("layernorm", "rmsnorm")
_CHOICES = {
    "context_mean": ("causal", "sequence"),
    "positions": ("rope", "sinusoidal"),
    "block_output": ("displacement", "state"),
    "controller_activation": ("gelu", "relu"),
    "alpha_form": ("rms", "l2", "batch"),
    "excitation_clock": ("iteration", "constant", "counter"),
    "init_scheme": ("lmlab", "pytorch"),
}


class INLConfig(LMConfig):
    model_type = "inl_llm"

    def __init__(
        self,
        vocab_size: int = 50257,
        d_model: int = 512,
        n_layers: int = 6,
        n_heads: int = 8,
        n_iterations: int = 5,
        ff_dim: int = 2048,
        ff: str = "gelu",
        context: str = "attention",
        max_seq_len: int = 2048,
        controller_hidden: int = 64,
        dt: float = 0.1,
        alpha_init: float = 0.8,
        beta_init: float = 0.5,
        gate_init: float = 0.5,
        dynamic_alpha: bool = True,
        kappa_init: float = 1.0,
        excitation_init: float = 0.03,
        adaptive_stop: bool = False,
        stop_tol: float = 1e-3,
        rope_theta: float = 10000.0,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        initializer_range: float = 0.02,
        context_mean: str = "causal",
        attention_residual: bool = False,
        attention_bias: bool = False,
        positions: str = "rope",
        block_output: str = "displacement",
        controller_activation: str = "gelu",
        controller_shared: bool = False,
        alpha_form: str = "rms",
        excitation_learnable: bool = True,
        excitation_clock: str = "iteration",
        mu_drift: float = 0.0,
        ff_inner_dropout: bool = False,
        init_scheme: str = "lmlab",
        decay_all_parameters: bool = False,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        if context not in _CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(_CONTEXTS)}, got {context!r}")
        if ff not in _FFS:
            raise ValueError(f"ff must be one of {', '.join(_FFS)}, got {ff!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {', '.join(_NORMS)}, got {norm!r}")
        if context == "attention" and (d_model % n_heads or (d_model // n_heads) % 2):
            raise ValueError(f"d_model ({d_model}) must split into n_heads ({n_heads}) heads of even size")
        if n_iterations < 1:
            raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        for name, value in (("alpha_init", alpha_init), ("gate_init", gate_init)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if beta_init <= 0 or kappa_init <= 0:
            raise ValueError("beta_init and kappa_init must be > 0")
        chosen = dict(context_mean=context_mean, positions=positions, block_output=block_output,
                      controller_activation=controller_activation, alpha_form=alpha_form,
                      excitation_clock=excitation_clock, init_scheme=init_scheme)
        for key, value in chosen.items():
            if value not in _CHOICES[key]:
                raise ValueError(f"{key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
        if not 0.0 <= mu_drift < 1.0:
            raise ValueError(f"mu_drift must be in [0, 1), got {mu_drift}")
        super().__init__(**config_arguments(INLConfig.__init__, locals()))

    @property
    def leaky(self) -> str:
        """The options set that let a token see the future or the batch ('' when none)."""
        found = []
        if self.context == "projection" and self.context_mean == "sequence":
            found.append("context_mean=sequence")
        if self.dynamic_alpha and self.alpha_form == "batch":
            found.append("alpha_form=batch")
        return ", ".join(found)

    @property
    def num_attention_heads(self) -> int:  # the name other tools look for
        return self.n_heads


@dataclass
class INLCache:
    """Decoding state, per layer: keys/values (attention) or the running context sum (projection).

    Row i of every tensor is sequence i. Sequences of different lengths decode together: `INLCache.stack`
    left-pads shorter key/value rows and marks the padding in `mask`, which attention never reads (positions
    are per row, in `lengths`); `cache.split()` gives one cache per row back, without its padding."""

    keys: list[torch.Tensor] = field(default_factory=list)  # (b, n_heads, s, d_head)
    values: list[torch.Tensor] = field(default_factory=list)  # (b, n_heads, s, d_head)
    ctx_sum: list[torch.Tensor] = field(default_factory=list)  # (b, d), fp32
    ids: torch.Tensor | None = None  # (b, seen): the tokens so far, kept only by models with leaky options
    seen: int = 0  # tokens fed so far, padding included (what `generate` has consumed of input_ids)
    lengths: torch.Tensor | None = None  # (b,) real tokens per row (next position); None: `seen` for every row
    mask: torch.Tensor | None = None  # (b, seen) bool, False at padding; None: no padding so far
    embedded: int = 0  # positions fed as inputs_embeds by `generate` (absent from its input_ids)

    def _rows(self) -> tuple[int, torch.device | None]:
        for t in (*self.keys, *self.ctx_sum):
            return t.shape[0], t.device
        return (self.ids.shape[0], self.ids.device) if self.ids is not None else (0, None)

    def row_lengths(self) -> torch.Tensor:
        """(b,) real tokens consumed per row."""
        if self.lengths is not None:
            return self.lengths
        b, device = self._rows()
        return torch.full((b,), self.seen, dtype=torch.long, device=device)

    def select(self, rows: torch.LongTensor) -> INLCache:
        """A new cache holding the rows `rows` (in that order)."""
        pick = lambda ts: [t.index_select(0, rows.to(t.device)) for t in ts]  # noqa: E731
        one = lambda t: None if t is None else t.index_select(0, rows.to(t.device))  # noqa: E731
        return INLCache(pick(self.keys), pick(self.values), pick(self.ctx_sum), one(self.ids), self.seen,
                        one(self.lengths), one(self.mask), self.embedded)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows `beam_idx` (transformers' `generate` calls this)."""
        p = self.select(beam_idx)
        self.keys, self.values, self.ctx_sum, self.ids, self.lengths, self.mask = (
            p.keys, p.values, p.ctx_sum, p.ids, p.lengths, p.mask)

    def split(self) -> list[INLCache]:
        """One single-row cache per sequence, its padding dropped."""
        out = []
        for i in range(self._rows()[0]):
            row = self.select(torch.tensor([i]))
            if row.mask is not None:
                keep = row.mask[0].nonzero()[:, 0]
                row.keys = [k.index_select(2, keep.to(k.device)) for k in row.keys]
                row.values = [v.index_select(2, keep.to(v.device)) for v in row.values]
                row.seen, row.mask = int(keep.numel()), None
                row.lengths = torch.tensor([row.seen], device=keep.device)
                row.ids = None if row.ids is None else row.ids[:, keep]
            out.append(row)
        return out

    @classmethod
    def stack(cls, caches: list[INLCache]) -> INLCache:
        """One batch from caches that have read their prompts (any lengths): key/value rows are left-padded to
        the longest, the padding masked. Not for models with leaky options (they re-read whole rows)."""
        if not caches or any(c.seen == 0 for c in caches) or any(c.ids is not None for c in caches):
            raise ValueError("INLCache.stack: every cache must have read its prompt, with a causal model")
        seen = max(c.seen for c in caches)
        masks = []
        for c in caches:
            own = c.mask if c.mask is not None else torch.ones(c._rows()[0], c.seen, dtype=torch.bool,
                                                              device=c._rows()[1])
            masks.append(F.pad(own, (seen - c.seen, 0), value=False))
        pad = lambda t, c: F.pad(t, (0, 0, seen - c.seen, 0))  # noqa: E731  (b, nh, s, hd) on the left
        layers = range(len(caches[0].keys))
        mask = torch.cat(masks)
        return cls([torch.cat([pad(c.keys[i], c) for c in caches]) for i in layers],
                   [torch.cat([pad(c.values[i], c) for c in caches]) for i in layers],
                   [torch.cat([c.ctx_sum[i] for c in caches]) for i in range(len(caches[0].ctx_sum))],
                   None, seen, torch.cat([c.row_lengths() for c in caches]), None if bool(mask.all()) else mask)


def _norm(cfg: INLConfig) -> nn.Module:
    return make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """(…, d) → (…, 1): root-mean-square over the last dimension (finite gradient at 0)."""
    return (x.pow(2).mean(-1, keepdim=True) + 1e-12).sqrt()


# ------------------------------------------------------------------------------------------- positions
def _angles(pos: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """(b, l) positions → (b, l, dim/2) angles pos · θ^(−2i/dim), fp32."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
    return pos.float()[..., None] * inv_freq


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, n_heads, l, d_head); cos, sin (b, 1, l, d_head/2). Rotate-half convention (as Llama)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def _sinusoidal(pos: torch.Tensor, d: int) -> torch.Tensor:
    """(b, l) positions → (b, l, d) fixed sin/cos position encoding (interleaved, as in the original).

    Frequencies exp(−2i·ln(10⁴)/d) in fp32, the original's formula to the last bit."""
    inv_freq = torch.exp(torch.arange(0, d, 2, device=pos.device).float() * (-math.log(10000.0) / d))
    ang = pos.float()[..., None] * inv_freq  # (b, l, d/2)
    return torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2)[..., :d]


# ------------------------------------------------------------------------------------------- context
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE, computed by scaled_dot_product_attention."""

    def __init__(self, cfg: INLConfig, layer_idx: int):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.d_head = cfg.n_heads, d // cfg.n_heads
        self.layer_idx = layer_idx
        self.attn_dropout = cfg.dropout
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(self, u, rope, cache: INLCache | None = None, doc_mask=None, key_mask=None):
        """u (b, l, d) → (b, l, d). `key_mask` (b, past + l) bool, False at padding: no query reads those keys
        (a padded query reads only itself, so no row of the softmax is empty)."""
        b, l, d = u.shape
        q = self.q_proj(u).view(b, l, self.n_heads, self.d_head).transpose(1, 2)  # (b, nh, l, hd)
        k = self.k_proj(u).view(b, l, self.n_heads, self.d_head).transpose(1, 2)
        v = self.v_proj(u).view(b, l, self.n_heads, self.d_head).transpose(1, 2)
        if rope is not None:  # None: positions are in the embeddings
            cos, sin = rope
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            if len(cache.keys) > self.layer_idx:
                k = torch.cat([cache.keys[self.layer_idx], k], dim=2)  # (b, nh, past + l, hd)
                v = torch.cat([cache.values[self.layer_idx], v], dim=2)
                cache.keys[self.layer_idx], cache.values[self.layer_idx] = k, v
            else:
                cache.keys.append(k)
                cache.values.append(v)
        past = k.shape[2] - l
        mask, causal = doc_mask, False
        if key_mask is not None:
            i = torch.arange(l, device=u.device)[:, None]
            j = torch.arange(past + l, device=u.device)[None, :]
            allowed = mask if mask is not None else (j <= past + i)  # (b, 1, l, l) or (l, past + l)
            mask = (allowed & key_mask[:, None, None, :]) | (j == past + i)  # (b, 1, l, past + l)
        elif mask is None:
            if past == 0:
                causal = True
            elif l > 1:  # a chunk after a prefix: query i sees keys ≤ past + i
                i = torch.arange(l, device=u.device)[:, None]
                mask = torch.arange(past + l, device=u.device)[None, :] <= past + i  # (l, past + l)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(b, l, d))  # (b, l, d)


class CausalMeanProjection(nn.Module):
    """The original INL context: c_i = mean_{j ≤ i} proj(u_j), a causal running mean.

    With `context_mean: sequence`, c_i = mean over the whole row (V0 called without a mask; leaky)."""

    def __init__(self, cfg: INLConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.whole_row = cfg.context_mean == "sequence"
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, u, rope=None, cache: INLCache | None = None, doc_mask=None, seq_idx=None, mask=None):
        """u (b, l, d) → (b, l, d). `mask` (b, l) bool, False at padding: padded tokens join no mean."""
        b, l, _ = u.shape
        if self.whole_row:
            return self.proj(u).mean(dim=1, keepdim=True).expand(b, l, -1)  # (b, l, d)
        p = self.proj(u).float()  # (b, l, d)
        if mask is not None:
            p = p * mask[..., None]
        csum = p.cumsum(dim=1)  # (b, l, d)
        count = torch.arange(1, l + 1, device=u.device, dtype=torch.float32)[None, :, None]  # (1, l, 1)
        if mask is not None:
            count = mask.float().cumsum(1)[..., None]  # (b, l, 1)
        if seq_idx is not None:  # restart the sum at each document
            pos = positions_within_documents(seq_idx)  # (b, l)
            before = torch.arange(l, device=u.device)[None, :] - pos - 1  # index before the document start
            prev = torch.gather(csum, 1, before.clamp_min(0)[..., None].expand_as(csum))
            csum = csum - torch.where(before[..., None] >= 0, prev, torch.zeros_like(prev))
            count = (pos + 1).float()[..., None]
        if cache is not None:
            if len(cache.ctx_sum) > self.layer_idx:
                csum = csum + cache.ctx_sum[self.layer_idx][:, None, :]
                count = count + cache.row_lengths().float()[:, None, None]
                cache.ctx_sum[self.layer_idx] = csum[:, -1]
            else:
                cache.ctx_sum.append(csum[:, -1])
        return (csum / count.clamp_min(1)).to(u.dtype)


# ------------------------------------------------------------------------------------------- integrator
class IntegratorNeuronLayer(nn.Module):
    """The learned second-order system iterated per token (symbols in the module docstring)."""

    def __init__(self, cfg: INLConfig):
        super().__init__()
        d, k = cfg.d_model, cfg.controller_hidden
        self.cfg = cfg  # read at call time, so adaptive_stop / stop_tol can be switched on a live model
        # columns: [c | x | v]; rows: the α, β, g, v_cand units (shared by the four heads: controller_shared)
        self.controller = nn.Linear(3 * d, k if cfg.controller_shared else 4 * k)
        self.to_alpha = nn.Linear(k, d)
        self.to_beta = nn.Linear(k, d)
        self.to_gate = nn.Linear(k, d)
        self.to_vcand = nn.Linear(k, d)
        self.mu = nn.Parameter(torch.zeros(d))  # learnable equilibrium
        self.gamma = nn.Parameter(torch.ones(d))  # excitation frequency
        self.phi = nn.Parameter(torch.zeros(d))  # excitation phase
        amplitude = torch.full((d,), cfg.excitation_init)  # excitation amplitude
        if cfg.excitation_learnable:
            self.amplitude = nn.Parameter(amplitude)
        else:
            self.register_buffer("amplitude", amplitude)
        if cfg.excitation_clock == "counter":  # t of the excitation: advances once per training iteration
            self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        if cfg.dynamic_alpha and cfg.alpha_form == "rms":
            self.kappa_raw = nn.Parameter(torch.tensor(inv_softplus(cfg.kappa_init)))
        self.last_iterations = 0  # iterations the last forward ran (adaptive stop may cut it short)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.cfg
        heads = ((self.to_alpha, inv_sigmoid(cfg.alpha_init)), (self.to_beta, inv_softplus(cfg.beta_init)),
                 (self.to_gate, inv_sigmoid(cfg.gate_init)), (self.to_vcand, 0.0))
        for head, bias in heads:
            hf_init.zeros_(head.weight)
            hf_init.constant_(head.bias, bias)
        hf_init.zeros_(self.mu)
        hf_init.normal_(self.gamma, mean=1.0, std=0.1)
        if cfg.init_scheme == "pytorch":
            hf_init.normal_(self.phi, mean=0.0, std=2 * math.pi)
        else:
            hf_init.uniform_(self.phi, 0.0, 2 * math.pi)
        hf_init.constant_(self.amplitude, cfg.excitation_init)
        if hasattr(self, "kappa_raw"):
            hf_init.constant_(self.kappa_raw, inv_softplus(cfg.kappa_init))

    def _alpha_damping(self, x: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """The dynamic-α factor, (b, l, 1)."""
        cfg = self.cfg
        if cfg.alpha_form == "rms":
            return torch.exp(-F.softplus(self.kappa_raw) * _rms(err))
        if cfg.alpha_form == "l2":
            return torch.exp(-cfg.kappa_init * torch.linalg.vector_norm(err, dim=-1, keepdim=True))
        dev = x - x.mean(dim=(0, 1))  # "batch": distance to the mean over every token of the batch
        return 1.0 - torch.exp(-cfg.kappa_init * torch.linalg.vector_norm(dev, dim=-1, keepdim=True))

    def forward(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """c, x (b, l, d) → x_T (b, l, d)."""
        cfg = self.cfg
        act = F.relu if cfg.controller_activation == "relu" else F.gelu
        adaptive = cfg.adaptive_stop and not self.training
        counter = cfg.excitation_clock == "counter"
        active = None  # (b, l, 1) tokens still moving, adaptive stop only
        v = torch.zeros_like(x)
        for t in range(cfg.n_iterations):
            z = act(self.controller(torch.cat([c, x, v], dim=-1)))  # (b, l, 4k), or (b, l, k) when shared
            z_a, z_b, z_g, z_v = (z,) * 4 if cfg.controller_shared else z.chunk(4, dim=-1)  # (b, l, k) each
            err = x - self.mu  # (b, l, d)
            alpha = torch.sigmoid(self.to_alpha(z_a))
            if cfg.dynamic_alpha:
                alpha = alpha * self._alpha_damping(x, err)
            beta = F.softplus(self.to_beta(z_b))
            gate = torch.sigmoid(self.to_gate(z_g))
            v_cand = self.to_vcand(z_v)
            clock = t if cfg.excitation_clock == "iteration" else 0
            if counter:
                clock = self.step_count.to(self.gamma.dtype)
                if self.training:
                    self.step_count += 1
            excitation = self.amplitude * torch.sin(self.gamma * clock + self.phi)  # (d,)
            v_new = alpha * v + (1 - alpha) * v_cand - beta * err + excitation
            x_new = x + cfg.dt * gate * v_new
            if adaptive:
                moving = _rms(x_new - x) >= cfg.stop_tol  # (b, l, 1)
                if active is not None:
                    x_new, v_new = torch.where(active, x_new, x), torch.where(active, v_new, v)
                    moving = moving & active
                active = moving
            x, v = x_new, v_new
            if adaptive and not bool(active.any()):
                break
        self.last_iterations = t + 1
        if cfg.mu_drift > 0 and self.training:  # after the forward, so no output depends on the batch
            with torch.no_grad():
                keep = (1 - cfg.mu_drift) ** cfg.n_iterations
                self.mu.mul_(keep).add_((1 - keep) * c.detach().mean(dim=(0, 1)).to(self.mu.dtype))
        return x


# ------------------------------------------------------------------------------------------- block
class GELUMLP(nn.Module):
    def __init__(self, cfg: INLConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.fc_out = nn.Linear(cfg.ff_dim, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout) if cfg.ff_inner_dropout else nn.Identity()

    def forward(self, x):
        return self.fc_out(self.drop(F.gelu(self.fc_in(x))))


class SwiGLUMLP(nn.Module):
    def __init__(self, cfg: INLConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)

        self.drop = nn.Dropout(cfg.dropout) if cfg.ff_inner_dropout else nn.Identity()

    def forward(self, x):
        return self.down_proj(self.drop(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class INLBlock(GradientCheckpointingLayer):
    """h ← h + drop(INL(context(norm₁ h), norm₁ h) − norm₁ h);  h ← h + drop(FF(norm₂ h))

    With attention_residual (V1): a = attn(norm_attn h); h ← h + drop(a); the integrator then runs on
    context a from norm₁ h. With block_output=state the block adds x_T instead of x_T − x₀."""

    def __init__(self, cfg: INLConfig, layer_idx: int):
        super().__init__()
        self.context_kind = cfg.context
        self.displacement = cfg.block_output == "displacement"
        self.attention_residual = cfg.attention_residual and cfg.context == "attention"
        if self.attention_residual:
            self.norm_attn = _norm(cfg)
        self.norm1 = _norm(cfg)
        context_cls = CausalSelfAttention if cfg.context == "attention" else CausalMeanProjection
        self.context = context_cls(cfg, layer_idx)
        self.inl = IntegratorNeuronLayer(cfg)
        self.norm2 = _norm(cfg)
        self.mlp = GELUMLP(cfg) if cfg.ff == "gelu" else SwiGLUMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h, rope=None, cache=None, doc_mask=None, seq_idx=None, mask=None, key_mask=None):
        if self.attention_residual:
            c = self.context(self.norm_attn(h), rope, cache=cache, doc_mask=doc_mask, key_mask=key_mask)
            h = h + self.drop(c)  # (b, l, d)
            u = self.norm1(h)
        else:
            u = self.norm1(h)  # (b, l, d)
            if self.context_kind == "attention":
                c = self.context(u, rope, cache=cache, doc_mask=doc_mask, key_mask=key_mask)
            else:
                c = self.context(u, cache=cache, seq_idx=seq_idx, mask=mask)
        x_T = self.inl(c, u)
        h = h + self.drop(x_T - u if self.displacement else x_T)
        return h + self.drop(self.mlp(self.norm2(h)))


# ------------------------------------------------------------------------------------------- model
class INLPreTrainedModel(LMPreTrainedModel):
    config_class = INLConfig
    _no_split_modules = ["INLBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Linear, Embedding and norms: the standard init (common.py), Linear PyTorch's own with init_scheme
        pytorch; then the integrator's and the blocks' own."""
        std = self.config.initializer_range
        pytorch = self.config.init_scheme == "pytorch"
        if isinstance(module, nn.Linear) and pytorch:  # PyTorch's own default, as the original code
            hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                hf_init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)
        if isinstance(module, IntegratorNeuronLayer):  # children first, so this overrides their init
            module.reset_parameters()
        elif isinstance(module, INLBlock) and not pytorch:  # GPT-2 style scaling of the residual projections
            scaled = std / math.sqrt(2 * self.config.n_layers)
            out = module.mlp.fc_out if isinstance(module.mlp, GELUMLP) else module.mlp.down_proj
            hf_init.normal_(out.weight, mean=0.0, std=scaled)
            if isinstance(module.context, CausalSelfAttention):
                hf_init.normal_(module.context.o_proj.weight, mean=0.0, std=scaled)


class INLForCausalLM(CachedGenerationMixin, INLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}

    def __init__(self, config: INLConfig):
        super().__init__(config)
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([INLBlock(c, i) for i in range(c.n_layers)])
        self.norm_f = _norm(c)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.post_init()

    def new_cache(self) -> INLCache:
        return INLCache()

    def iterations_run(self) -> list[int]:
        """Integrator iterations per layer in the last forward (< n_iterations only with adaptive stop)."""
        return [blk.inl.last_iterations for blk in self.blocks]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: INLCache | None = None,
        seq_idx: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        cache_params: INLCache | None = None,  # the name before transformers 5.24
        **kwargs,
    ) -> LMOutput | tuple:
        """The arguments of every lmlab family (common.py). Padding: attention never reads a padded key (the
        running mean never counts a padded token); the integrator is per token, so nothing else crosses
        positions. `seq_idx` is also a document mask. Attention runs in SDPA, which gives no weights:
        `output_attentions` and `cache_position` are accepted and ignored.
        """
        cfg = self.config
        call = ForwardCall.begin(self, input_ids, inputs_embeds, attention_mask, cache, cache_params, use_cache)
        cache, b, l, start, mask = call.cache, call.b, call.l, call.start, call.mask
        if seq_idx is not None and cache is not None:
            raise ValueError("seq_idx (packed documents) cannot be combined with a decoding cache")
        if cfg.leaky:
            if not getattr(self, "_leaky_warned", False):
                self._leaky_warned = True
                warnings.warn(f"INL: {cfg.leaky} lets each token see later tokens (and the rest of the batch); "
                              "use it only to evaluate checkpoints trained that way (training refuses it)",
                              stacklevel=2)
            if self.training and torch.is_grad_enabled():
                raise ValueError(f"INL: {cfg.leaky} sees later tokens and cannot be trained; set "
                                 "context_mean=causal and alpha_form=rms (or l2) to fine-tune")
            if seq_idx is not None:
                raise ValueError(f"INL: {cfg.leaky} cannot keep packed documents apart")
            if mask is not None:
                raise ValueError(f"INL: {cfg.leaky} mixes every token of the row and batch, padding included; "
                                 f"give one prompt at a time")
            if inputs_embeds is not None and cache is not None:
                raise ValueError(f"INL: {cfg.leaky} decodes from token ids only")
            if cache is not None:  # every output may depend on every token: re-read the whole prefix
                ids = input_ids if cache.ids is None else torch.cat([cache.ids, input_ids], dim=1)
                logits = self(ids).logits[:, -l:]
                cache.ids, cache.seen = ids, cache.seen + l
                loss = lm_loss(logits, labels) if labels is not None else None
                return lm_output(loss, logits, cache, None, return_dict)
        device = self.wte.weight.device
        if position_ids is None:
            position_ids = call.positions(seq_idx, device)
        position_ids = position_ids.expand(b, l)
        h = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (b, l, d)
        rope, doc_mask, key_mask = None, None, None
        if cfg.context == "attention" and cfg.positions == "rope":
            d_head = cfg.d_model // cfg.n_heads
            ang = _angles(position_ids, d_head, cfg.rope_theta)[:, None]  # (b, 1, l, d_head/2)
            rope = (ang.cos(), ang.sin())
        else:
            h = h + _sinusoidal(position_ids, cfg.d_model).to(h.dtype)
        if cfg.context == "attention" and seq_idx is not None:
            same = seq_idx[:, :, None] == seq_idx[:, None, :]  # (b, l, l)
            doc_mask = (same & torch.ones(l, l, dtype=torch.bool, device=h.device).tril())[:, None]
        if mask is not None or (cache is not None and cache.mask is not None):
            ones = lambda n: torch.ones(b, n, dtype=torch.bool, device=device)  # noqa: E731
            past_mask = cache.mask if cache is not None and cache.mask is not None else ones(start)
            key_mask = torch.cat([past_mask, mask if mask is not None else ones(l)], dim=1)  # (b, start + l)
        h, states = run_blocks(self.blocks, self.drop(h), output_hidden_states, rope, cache=cache, doc_mask=doc_mask,
                               seq_idx=seq_idx, mask=mask, key_mask=key_mask)
        h = self.norm_f(h)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # (b, l, V)
        if cache is not None and key_mask is not None:
            cache.mask = key_mask
        return call.finish(logits, labels, states, return_dict)
