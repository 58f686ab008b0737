"""The scan-less "simplified" Mamba mixer that the first MambaSWELU-124M run trained (`mixer: simplified`).

    h ──in_proj──► (x, z)                          (b, l, 2·d_inner), no bias
    x ──causal depthwise conv1d──► SWELU ──► u      (b, l, d_inner), SWELU in place of Mamba's SiLU
    y = u · σ(z)                                    sigmoid gate (Mamba gates with SiLU)
    out = out_proj(y)                               (b, l, d_model), no bias

There is no state-space recurrence: a token sees the d_conv − 1 tokens before it through the conv, and
further context only through the layers below. `x_proj` (d_inner → d_state) and `dt_proj`
(d_inner → d_inner, with bias) exist in that code and in its checkpoints but take no part in the forward;
they are kept so that parameter counts (124,104,719 for the 124M run) and state dicts match exactly.
They never receive a gradient (weight decay still shrinks them when every parameter decays).

Decoding keeps only the conv state (the last d_conv inputs per layer) in `MambaCache.conv`.
"""

from __future__ import annotations

import torch
from torch import nn

from .mamba import MambaCache, causal_conv, conv_state_after, conv_step, keep_rows


class SimplifiedMambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, activation: nn.Module,
                 layer_idx: int = 0):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, d_state, bias=False)  # unused in the forward (see above)
        self.dt_proj = nn.Linear(self.d_inner, self.d_inner, bias=True)  # unused in the forward
        self.ssm_activation = activation
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def forward(self, hidden: torch.Tensor, cache: MambaCache | None = None,
                seq_idx: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (b, l, d_model) → (b, l, d_model). With `cache`, fills this layer's conv state (prefill).
        `mask` (b, l) bool, False at padding: the conv reads zero there (as from before the sequence)."""
        if cache is not None and len(cache.conv) > self.layer_idx:
            return torch.cat([self.step(hidden[:, t], cache, None if mask is None else mask[:, t])
                              for t in range(hidden.shape[1])], dim=1)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, d_inner) each
        x = x.transpose(1, 2)  # (b, d_inner, l)
        if mask is not None:
            x = x * mask[:, None, :].to(x.dtype)
        if cache is not None:
            cache.conv.append(conv_state_after(x, self.d_conv))
        u = self.ssm_activation(causal_conv(self.conv1d, x, seq_idx).transpose(1, 2))  # (b, l, d_inner)
        return self.out_proj(u * torch.sigmoid(z))

    def step(self, hidden: torch.Tensor, cache: MambaCache, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One token: hidden (b, d_model) → (b, 1, d_model). Rows where `mask` (b,) is False keep their state."""
        if mask is not None:
            with keep_rows(cache, self.layer_idx, mask):
                return self.step(hidden, cache)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, d_inner) each
        u = self.ssm_activation(conv_step(self.conv1d, cache.conv[self.layer_idx], x))
        return self.out_proj(u * torch.sigmoid(z))[:, None, :]
