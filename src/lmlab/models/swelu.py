"""SWELU, the learnable saturating activation of MambaSWELU.

    SWELU(z) = λ · sign(z) · (1 − exp(−|z|^k))

k (shape) and λ (scale) are scalars per layer, learnable by default. The function is odd,
saturates at ±λ, and behaves like λ·|z|^k near zero.

Numerics. With a = |z|:
    ∂/∂z = λ · k · a^(k−1) · exp(−a^k)        infinite at a = 0 when k < 1
    ∂/∂k = λ · sign(z) · exp(−a^k) · a^k · ln a   0·(−∞) at a = 0 (its limit is 0)
    ∂/∂λ = sign(z) · (1 − exp(−a^k))
Autograd through the plain formula gives inf/NaN at z = 0. `swelu` is therefore a custom autograd
function with these derivatives written out: a^(k−1) is evaluated with a clamped at `eps` (so the
slope at 0 is exact for k = 1, ≈0 for k > 1 and large but finite for k < 1), and the a^k·ln a term
is set to its limit 0 at a = 0. `swelu_reference` is the plain formula, used by the tests away
from zero. k is parametrised as softplus(k_raw) + k_min so it stays positive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-6  # bounds the slope at z = 0 for k < 1 (1e3·λ·k at k = 0.5)


def swelu_reference(z: torch.Tensor, k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The formula as written; autograd through it is exact for z != 0 only."""
    return lam * torch.sign(z) * (1 - torch.exp(-z.abs().pow(k)))


class _SWELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, k, lam):
        a = z.abs()
        ak = a.pow(k)  # 0 at a = 0 for k > 0
        e = torch.exp(-ak)
        s = torch.sign(z)
        ctx.save_for_backward(z, k, lam)
        return lam * s * (1 - e)

    @staticmethod
    def backward(ctx, g):
        z, k, lam = ctx.saved_tensors
        a = z.abs()
        ak = a.pow(k)
        e = torch.exp(-ak)
        s = torch.sign(z)
        gz = gk = glam = None
        if ctx.needs_input_grad[0]:
            slope = k * a.clamp_min(_EPS).pow(k - 1) * e  # finite everywhere
            gz = g * lam * slope
        if ctx.needs_input_grad[1]:
            log_a = torch.log(torch.where(a > 0, a, torch.ones_like(a)))
            dk = lam * s * e * ak * log_a  # exactly 0 at a = 0 (its limit)
            gk = (g * dk).sum().reshape(k.shape)
        if ctx.needs_input_grad[2]:
            glam = (g * s * (1 - e)).sum().reshape(lam.shape)
        return gz, gk, glam


def swelu(z: torch.Tensor, k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """SWELU with scalar tensors k > 0 and λ. Finite forward and backward everywhere, z = 0 included."""
    return _SWELUFunction.apply(z, k.to(z.dtype), lam.to(z.dtype))


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class SWELU(nn.Module):
    """SWELU with one learnable (or fixed) k and λ per layer.

    Parameters (names as they appear in checkpoints and k/λ logs): `k_raw` with
    k = softplus(k_raw) + k_min, and `lam` = λ.
    """

    def __init__(self, k_init: float = 1.0, lam_init: float = 1.0, learnable: bool = True, k_min: float = 0.05):
        super().__init__()
        if k_init <= k_min:
            raise ValueError(f"SWELU k_init must be > {k_min}, got {k_init}")
        self.k_min = k_min
        k_raw = torch.tensor(_inv_softplus(k_init - k_min))
        lam = torch.tensor(float(lam_init))
        if learnable:
            self.k_raw = nn.Parameter(k_raw)
            self.lam = nn.Parameter(lam)
        else:
            self.register_buffer("k_raw", k_raw)
            self.register_buffer("lam", lam)

    @property
    def k(self) -> torch.Tensor:
        return F.softplus(self.k_raw) + self.k_min

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return swelu(z, self.k, self.lam)

    def extra_repr(self) -> str:
        learnable = isinstance(self.lam, nn.Parameter)
        return f"k={self.k.item():.4g}, lam={self.lam.item():.4g}, learnable={learnable}"


def make_activation(name: str, k_init: float = 1.0, lam_init: float = 1.0, learnable: bool = True) -> nn.Module:
    """The activation after each block and dense layer: `swelu` (default) or `silu` (ablation)."""
    if name == "swelu":
        return SWELU(k_init, lam_init, learnable)
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; allowed: swelu, silu")
