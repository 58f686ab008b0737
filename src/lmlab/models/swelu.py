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

The first MambaSWELU code parametrised k differently: k = |k_raw| + 1e-6 (k_raw starts at k_init) and
SWELU(z) = sign(z) · (1 − exp(−(|z| + 1e-8)^k)), differentiated by autograd, with no λ. `k_param="abs"`
computes exactly that (`swelu_original`), and `use_lambda=False` drops λ (a fixed 1, not a parameter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels_cpu
from .common import inv_softplus

_EPS = 1e-6  # bounds the slope at z = 0 for k < 1 (1e3·λ·k at k = 0.5)
K_PARAMS = ("softplus", "abs")


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
    """SWELU with scalar tensors k > 0 and λ. Finite forward and backward everywhere, z = 0 included.

    On CPU the fused C++ kernel (`kernels_cpu.swelu_fused`: one pass forward, one backward, fp32 arithmetic for
    bf16 inputs too) runs; elsewhere, or without a C++ compiler, `swelu_torch`, its reference."""
    if z.device.type == "cpu" and kernels_cpu.usable(z):
        return kernels_cpu.swelu_fused(z, k, lam)
    return swelu_torch(z, k, lam)


def swelu_torch(z: torch.Tensor, k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """SWELU through torch ops with the derivatives written out (the reference of the fused CPU kernel). Half
    precision inputs compute in fp32 (the slope near 0 and exp/pow need it) and return in their own dtype."""
    if z.dtype in (torch.float16, torch.bfloat16):
        return _SWELUFunction.apply(z.float(), k.float(), lam.float()).to(z.dtype)
    return _SWELUFunction.apply(z, k.to(z.dtype), lam.to(z.dtype))


def swelu_original(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The first MambaSWELU formula, sign(z) · (1 − exp(−(|z| + 1e-8)^k)), through plain autograd."""
    return torch.sign(z) * (1 - torch.exp(-(z.abs() + 1e-8).pow(k.to(z.dtype))))


class SWELU(nn.Module):
    """SWELU with one learnable (or fixed) k and λ per layer.

    Parameters (names as they appear in checkpoints and k/λ logs): `k_raw` and `lam` = λ.
    k_param "softplus": k = softplus(k_raw) + k_min, the function above with its exact derivatives.
    k_param "abs": k = |k_raw| + 1e-6 and the first MambaSWELU formula (`swelu_original`).
    use_lambda False: no λ parameter; `lam` is a fixed 1 that is not saved.
    """

    def __init__(self, k_init: float = 1.0, lam_init: float = 1.0, learnable: bool = True, k_min: float = 0.05,
                 k_param: str = "softplus", use_lambda: bool = True):
        super().__init__()
        if k_param not in K_PARAMS:
            raise ValueError(f"unknown SWELU k_param {k_param!r}; allowed: {', '.join(K_PARAMS)}")
        if k_param == "softplus" and k_init <= k_min:
            raise ValueError(f"SWELU k_init must be > {k_min}, got {k_init}")
        self.k_min, self.k_param, self.use_lambda = k_min, k_param, use_lambda
        k_raw = torch.tensor(inv_softplus(k_init - k_min) if k_param == "softplus" else float(k_init))
        lam = torch.tensor(float(lam_init) if use_lambda else 1.0)
        if learnable:
            self.k_raw = nn.Parameter(k_raw)
        else:
            self.register_buffer("k_raw", k_raw)
        if use_lambda and learnable:
            self.lam = nn.Parameter(lam)
        else:
            self.register_buffer("lam", lam, persistent=use_lambda)

    def initial_values(self, k_init: float, lam_init: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_raw, lam) as a fresh module with these settings would hold them."""
        k_raw = inv_softplus(k_init - self.k_min) if self.k_param == "softplus" else float(k_init)
        return torch.tensor(k_raw), torch.tensor(float(lam_init) if self.use_lambda else 1.0)

    @property
    def k(self) -> torch.Tensor:
        if self.k_param == "abs":
            return self.k_raw.abs() + 1e-6
        return F.softplus(self.k_raw) + self.k_min

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.k_param == "abs":
            y = swelu_original(z, self.k)
            return self.lam.to(z.dtype) * y if self.use_lambda else y
        return swelu(z, self.k, self.lam)

    def residual(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h + self(z): on CPU with the fused kernels one pass that adds the fp32 residual stream h to SWELU(z)
        (`kernels_cpu.swelu_residual`); otherwise, or with hooks on this module, the two operations."""
        if (self.k_param == "softplus" and h.dtype == torch.float32 and h.shape == z.shape
                and not (self._forward_hooks or self._forward_pre_hooks) and kernels_cpu.usable(z, h)):
            return kernels_cpu.swelu_residual(z, self.k, self.lam, h)
        return h + self(z)

    def extra_repr(self) -> str:
        learnable = isinstance(self.k_raw, nn.Parameter)
        return (f"k={self.k.item():.4g}, lam={self.lam.item():.4g}, learnable={learnable}, "
                f"k_param={self.k_param}, use_lambda={self.use_lambda}")


def make_activation(name: str, k_init: float = 1.0, lam_init: float = 1.0, learnable: bool = True,
                    k_param: str = "softplus", use_lambda: bool = True) -> nn.Module:
    """The activation after each block and dense layer: `swelu` (default) or `silu` (ablation)."""
    if name == "swelu":
        return SWELU(k_init, lam_init, learnable, k_param=k_param, use_lambda=use_lambda)
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; allowed: swelu, silu")
