"""The Mamba-1 mixer (selective state-space layer), with the official parameter names.

    x ──in_proj──► (x, z)                        (b, l, 2·d_inner)
    x ──causal depthwise conv1d──► SiLU ──► u     (b, d_inner, l)
    u ──x_proj──► (δ_r, B, C)                     δ_r: dt_rank, B, C: d_state
    Δ = softplus(dt_proj(δ_r))                    dt_proj's bias and the softplus applied inside the scan
    y = selective_scan(u, Δ, A = −exp(A_log), B, C, D) · SiLU(z)
    out = out_proj(y)                             (b, l, d_model)

Names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj) and initialisation follow the
reference implementation, so weights load with strict=True into and from `transformers`' MambaMixer.
The scan itself lives in `scan.py` behind a backend interface; this file knows nothing of kernels.
Every Linear that is not a plain, hook-free nn.Linear is called as a module, so LoRA adapters, 4-bit layers and
hooks take part in the forward and receive gradients. Plain x_proj and dt_proj layers are read by the mixer itself:
dt_proj's bias goes to the scan (`_delta`), as the reference kernel takes it, and on the CPU both projections run
inside the scan's node (`_projected_scan`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as hf_init

from . import kernels_cpu
from . import scan as scan_lib


@dataclass
class MambaCache:
    """Recurrent state for generation: per layer, the last d_conv inputs of the conv and the SSM state.

    Row i of every tensor is sequence i, and the state has the same size whatever its length, so sequences
    decode together whatever their lengths: `MambaCache.stack([c1, c2, ...])` joins one-row (or any) caches
    into one batch, `cache.split()` gives one cache per row back (`select(rows)` keeps some rows)."""

    conv: list[torch.Tensor] = field(default_factory=list)  # (b, d_inner, d_conv)
    ssm: list[torch.Tensor] = field(default_factory=list)  # (b, d_inner, d_state), fp32
    seen: int = 0  # tokens fed so far, padding included (what `generate` has consumed of input_ids)
    lengths: torch.Tensor | None = None  # (b,) real tokens per row (next position); None: `seen` for every row
    embedded: int = 0  # positions fed as inputs_embeds by `generate` (absent from its input_ids)

    def row_lengths(self) -> torch.Tensor:
        """(b,) real tokens consumed per row."""
        if self.lengths is not None:
            return self.lengths
        b = self.conv[0].shape[0] if self.conv else 0
        device = self.conv[0].device if self.conv else None
        return torch.full((b,), self.seen, dtype=torch.long, device=device)

    def select(self, rows: torch.LongTensor) -> MambaCache:
        """A new cache holding the rows `rows` (in that order)."""
        pick = lambda ts: [t.index_select(0, rows.to(t.device)) for t in ts]  # noqa: E731
        lengths = None if self.lengths is None else self.lengths.index_select(0, rows.to(self.lengths.device))
        return MambaCache(pick(self.conv), pick(self.ssm), self.seen, lengths, self.embedded)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows `beam_idx` (transformers' `generate` calls this)."""
        picked = self.select(beam_idx)
        self.conv, self.ssm, self.lengths = picked.conv, picked.ssm, picked.lengths

    def split(self) -> list[MambaCache]:
        """One single-row cache per sequence."""
        n = self.conv[0].shape[0] if self.conv else 0
        return [self.select(torch.tensor([i])) for i in range(n)]

    @classmethod
    def stack(cls, caches: list[MambaCache]) -> MambaCache:
        """One batch from caches that have all read their prompts (any lengths); rows keep their positions."""
        if not caches or any(not c.conv for c in caches):
            raise ValueError("MambaCache.stack: every cache must have read its prompt (prefill) first")
        lengths = torch.cat([c.row_lengths() for c in caches])
        same = bool((lengths == caches[0].seen).all()) and all(c.seen == caches[0].seen for c in caches)
        return cls([torch.cat([c.conv[i] for c in caches]) for i in range(len(caches[0].conv))],
                   [torch.cat([c.ssm[i] for c in caches]) for i in range(len(caches[0].ssm))],
                   max(c.seen for c in caches), None if same else lengths)


def causal_conv(conv1d: nn.Conv1d, x: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv over (b, d_inner, l). With seq_idx, taps never cross a document start."""
    l = x.shape[-1]
    if seq_idx is None:
        return conv1d(x)[..., :l]
    d_conv = conv1d.kernel_size[0]
    w = conv1d.weight[:, 0, :]  # (d_inner, d_conv); tap j looks back d_conv-1-j steps
    out = x * w[:, -1, None]
    for back in range(1, d_conv):
        if back >= l:
            break
        shifted = F.pad(x, (back, 0))[..., :l]
        same = F.pad(seq_idx, (back, 0), value=-1)[..., :l] == seq_idx  # (b, l)
        out = out + shifted * same[:, None, :].to(x.dtype) * w[:, -1 - back, None]
    if conv1d.bias is not None:
        out = out + conv1d.bias[:, None]
    return out


def conv_state_after(x: torch.Tensor, d_conv: int) -> torch.Tensor:
    """The last d_conv inputs of (b, d_inner, l), left-padded with zeros: the decoding conv state."""
    l = x.shape[-1]
    return (F.pad(x, (d_conv - l, 0)) if l < d_conv else x[..., -d_conv:]).detach().clone()


def conv_step(conv1d: nn.Conv1d, conv_state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One decoding step of the causal conv: shifts x (b, d_inner) into the state, returns (b, d_inner)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = (conv_state * conv1d.weight[:, 0, :]).sum(-1)
    return out + conv1d.bias if conv1d.bias is not None else out


def _plain(layer: nn.Module) -> bool:
    """A plain nn.Linear without hooks: the mixer may read its weight and bias itself. Anything else (LoRA-wrapped,
    4-bit, hooked) is called as a module."""
    return type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks)


@contextmanager
def keep_rows(cache: MambaCache, layer_idx: int, mask: torch.Tensor):
    """Restores layer `layer_idx`'s conv and SSM state of the rows where `mask` (b,) is False on exit."""
    saved = [(states, states[layer_idx].clone()) for states in (cache.conv, cache.ssm) if len(states) > layer_idx]
    yield
    for states, old in saved:
        states[layer_idx].copy_(torch.where(mask.view(-1, *[1] * (old.dim() - 1)), states[layer_idx], old))


class MambaMixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str = "auto",
        layer_idx: int = 0,
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = scan_backend
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self._init_cfg = (dt_min, dt_max, dt_init_floor, dt_scale)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The reference initialisation of dt_proj, A_log and D (S4D-real A, log-uniform Δ)."""
        if self.A_log.device.type == "meta":
            return
        dt_min, dt_max, floor, dt_scale = self._init_cfg
        std = self.dt_rank**-0.5 * dt_scale
        hf_init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        hf_init.copy_(self.dt_proj.bias, dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        hf_init.copy_(self.A_log, torch.log(A))
        hf_init.ones_(self.D)

    # ---------------------------------------------------------------- full sequence
    def _conv(self, x: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        return causal_conv(self.conv1d, x, seq_idx)

    def _fused_conv(self, x: torch.Tensor) -> bool:
        """Whether the fused C++ conv + SiLU runs (CPU, fp32/bf16, a plain Conv1d): the same result as
        `_conv` + SiLU (the reference, which runs otherwise), read and written in the matmuls' (b, l, d) layout."""
        return (x.device.type == "cpu" and type(self.conv1d) is nn.Conv1d and kernels_cpu.usable(x))

    def _delta(self, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Δ before its bias and softplus (…, d_inner), the bias the scan adds in fp32 or None). A plain dt_proj
        hands its bias to the scan, as the reference kernel takes it: added in the scan's fp32, its gradient summed
        there, with no (b, l, d_inner) add or sum around the matmul. Any other module (LoRA-wrapped, 4-bit) runs
        whole and the scan adds nothing."""
        proj = self.dt_proj
        if _plain(proj) and proj.bias is not None:
            return F.linear(dt, proj.weight), proj.bias.float()
        return proj(dt), None

    def _projected_scan(self, u_rows: torch.Tensor, z_rows: torch.Tensor, A: torch.Tensor,
                        seq_idx: torch.Tensor | None) -> torch.Tensor | None:
        """y (b, l, d_inner) rows from x_proj, dt_proj and the scan as one fused node (`scan.projected_scan`), or
        None where that does not run: x_proj or dt_proj not a plain nn.Linear (LoRA, 4-bit, hooked), the CPU kernels off
        (`kernels_cpu.reference()`), or a backend that does not fuse it. The weights are cast as autocast would
        cast them for the two Linear layers it replaces."""
        xp, dp = self.x_proj, self.dt_proj
        if not (_plain(xp) and xp.bias is None and _plain(dp) and dp.bias is not None and kernels_cpu.usable(u_rows)):
            return None
        kind = u_rows.device.type
        cdt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else u_rows.dtype
        return scan_lib.projected_scan(u_rows.to(cdt), xp.weight.to(cdt), dp.weight.to(cdt), dp.bias, A, self.D,
                                       z_rows.to(cdt), seq_idx=seq_idx, backend=self.scan_backend)

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None,
                seq_idx: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (b, l, d_model) → (b, l, d_model). With `cache`, fills this layer's state (prefill).

        `mask` (b, l) bool, False at padding: as transformers' Mamba, the conv input and the scan input are
        zero there, so a state that starts at zero stays zero through left padding (the row's result is the
        prompt's alone) and the output at a padded position is never read by a real one."""
        b, l, _ = hidden.shape
        if cache is not None and len(cache.ssm) > self.layer_idx:
            return self._step_many(hidden, cache, mask)
        xz = self.in_proj(hidden)  # (b, l, 2·d_inner)
        x_rows, z_rows = xz.chunk(2, dim=-1)
        x, z = x_rows.transpose(1, 2), z_rows.transpose(1, 2)  # (b, d_inner, l) views
        if mask is None and self._fused_conv(x):
            if cache is not None:
                cache.conv.append(conv_state_after(x, self.d_conv))
            u_rows = kernels_cpu.conv_silu(x_rows, self.conv1d.weight, self.conv1d.bias, seq_idx)  # (b, l, d_inner)
            u = u_rows.transpose(1, 2)
        else:
            keep = None if mask is None else mask[:, None, :].to(x.dtype)  # (b, 1, l)
            if keep is not None:
                x = x * keep
            if cache is not None:
                cache.conv.append(conv_state_after(x, self.d_conv))
            u = F.silu(self._conv(x, seq_idx))  # (b, d_inner, l)
            if keep is not None:
                u = u * keep
            u_rows = u.transpose(1, 2)
        A = -torch.exp(self.A_log.float())
        if mask is None and cache is None:
            y_rows = self._projected_scan(u_rows, z_rows, A, seq_idx)
            if y_rows is not None:
                return self.out_proj(y_rows if torch.is_autocast_enabled(y_rows.device.type)
                                     else y_rows.to(hidden.dtype))
        dBC = self.x_proj(u_rows)  # (b, l, dt_rank + 2n)
        dt, B, C = torch.split(dBC, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta, delta_bias = self._delta(dt)
        out = scan_lib.selective_scan(
            u, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(), z=z,
            delta_bias=delta_bias, delta_softplus=True, seq_idx=seq_idx,
            return_last_state=cache is not None, backend=self.scan_backend,
        )
        if cache is not None:
            y, last = out
            cache.ssm.append(last.float())
        else:
            y = out
        y_rows = y.transpose(1, 2)
        if not torch.is_autocast_enabled(y.device.type):
            y_rows = y_rows.to(hidden.dtype)
        # under autocast out_proj casts its input itself: y (bf16) is taken as it is, not raised to the fp32 of
        # the norm's output and cast back (two copies of (b, l, d_inner) each way a layer)
        return self.out_proj(y_rows)

    # ---------------------------------------------------------------- recurrent decoding
    def _step_many(self, hidden: torch.Tensor, cache: MambaCache, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat([self.step(hidden[:, t], cache, None if mask is None else mask[:, t])
                          for t in range(hidden.shape[1])], dim=1)

    def step(self, hidden: torch.Tensor, cache: MambaCache, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One token: hidden (b, d_model) → (b, 1, d_model); O(1) in the context length.
        `mask` (b,) bool: rows where it is False keep their state unchanged (a padded step)."""
        if mask is not None:
            with keep_rows(cache, self.layer_idx, mask):
                return self.step(hidden, cache)
        conv_state, ssm_state = cache.conv[self.layer_idx], cache.ssm[self.layer_idx]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, d_inner) each
        u = F.silu(conv_step(self.conv1d, conv_state, x))
        dt, B, C = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta, delta_bias = self._delta(dt)
        y = scan_lib.selective_state_update(
            ssm_state, u, delta, -torch.exp(self.A_log.float()), B, C, D=self.D.float(), z=z,
            dt_bias=delta_bias, dt_softplus=True,
        )
        return self.out_proj(y.to(hidden.dtype))[:, None, :]
