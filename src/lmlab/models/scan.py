"""Selective scan (Mamba-1 S6) behind a small backend interface.

Glossary (paper symbol → code name, shapes in the layout of the official kernels):
    b batch, d channels (d_inner), l sequence length, n state size (d_state)
    u  (b, d, l)   input x after conv + SiLU
    Δ  delta (b, d, l)   time step, before `delta_bias` and softplus when `delta_softplus`
    A  (d, n)      A = −exp(A_log), real and negative
    B  (b, n, l)   input matrix, input-dependent
    C  (b, n, l)   output matrix, input-dependent
    D  (d,)        skip connection
    z  (b, d, l)   gate: y ← y · SiLU(z)
    seq_idx (b, l) document index of each position in a packed row; the state is reset to zero
                   where it changes, so packed documents never see each other.

Recurrence (per b, d, n):
    h_t = exp(Δ_t A) · h_{t−1} + Δ_t B_t u_t,     y_t = C_t · h_t + D u_t

Backends (`available_backends(device)` lists those usable on a device):
    ref        the sequential oracle below: obviously correct, float64-capable, slow (autograd
               records every step). Tests hold every other backend to it.
    chunked    pure torch, any device: chunked scan with a hand-written backward that keeps only
               chunk-boundary states and recomputes the rest (scan_cpu.py). Deterministic at a given
               thread count; torch's CPU kernels split work by thread count, so its last bits may not
               be the same at another one.
    cpu        C++/OpenMP kernel built at first use (scan_cpu.py); CPU only. Without a compiler it
               warns once and runs `chunked`. Outputs and gradients are bitwise the same at any
               thread count (fixed work partition, fixed-order reductions).
    triton     fused Triton kernels, forward and backward, fp32 state (scan_triton.py); CUDA, or CPU
               tensors under TRITON_INTERPRET=1 (how the tests run it without a GPU).
    mamba_ssm  the official CUDA kernel `selective_scan_fn`, when the package is importable; it
               knows no seq_idx / initial_state, so such calls go to `triton`.
`auto`: CPU → cpu;  CUDA → mamba_ssm if importable, else triton if importable, else chunked.
None of the fast backends keeps a (b, d, l, n) tensor for the backward: `SCAN_CHUNK` says how many
steps lie between the (b, d, n) states each one keeps. `resolve_backend` is the one place that
decides and validates a backend name for a device. The backends never import this module.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import scan_cpu  # torch and the standard library only; the C++ kernel is built at first use

BACKEND_NAMES = ("ref", "chunked", "cpu", "triton", "mamba_ssm")
SCAN_CHOICES = ("auto", *BACKEND_NAMES)  # what `model.scan_backend` accepts
TRITON_CHUNK = 16  # scan_triton.CHUNK (that module imports triton; tests/test_scan_triton.py holds them equal)
# steps between the (b, d, n) fp32 states a backend keeps for its backward; `ref` keeps every step.
# mamba_ssm's kernel keeps 2 floats per state every 2048 steps: one state per 1024 steps in memory.
SCAN_CHUNK = {"triton": TRITON_CHUNK, "chunked": scan_cpu.CHUNK, "cpu": scan_cpu.CPU_CHUNK, "mamba_ssm": 1024}

ScanFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, torch.Tensor]"]
BACKENDS: dict[str, ScanFn] = {}


def register_backend(name: str, fn: ScanFn) -> None:
    BACKENDS[name] = fn


def reset_mask(seq_idx: torch.Tensor | None) -> torch.Tensor | None:
    """(b, l) bool: True where a new document starts inside the row (never at t = 0)."""
    if seq_idx is None:
        return None
    r = torch.zeros_like(seq_idx, dtype=torch.bool)
    r[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return r


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    seq_idx=None, initial_state=None, return_last_state=False,
):
    """Sequential reference scan. Computes in float32 (or float64 if the inputs are float64)."""
    dtype_in = u.dtype
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, l = u.shape
    n = A.shape[1]
    h = u.new_zeros(b, d, n) if initial_state is None else initial_state.to(cdt)
    reset = reset_mask(seq_idx)
    ys = []
    for t in range(l):
        dA = torch.exp(delta[:, :, t, None] * A)  # (b, d, n)
        dBu = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]  # (b, d, n)
        if reset is not None:
            h = h * (~reset[:, t]).to(cdt)[:, None, None]
        h = dA * h + dBu
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1)  # (b, d, l)
    if D is not None:
        y = y + u * D.to(cdt)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


register_backend("ref", selective_scan_ref)


def scan_from_core(core, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   seq_idx=None, initial_state=None, return_last_state=False):
    """Full selective scan around a `core(u, δ, A, B, C, reset, h0) → (y, h_last)` with B, C (b, l, n).

    The cheap (b, d, l) element-wise parts (bias, softplus, D skip, SiLU(z) gate) stay in torch autograd,
    so a core only implements the recurrence and its backward. Compute dtype: float64 for float64
    inputs, else float32 (bf16/fp16 inputs are upcast; the output comes back in u's dtype).
    """
    dtype_in = u.dtype
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    u_, dt = u.to(cdt), delta.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)[None, :, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h0 = initial_state.to(cdt) if initial_state is not None else None
    y, last = core(u_, dt, A.to(cdt), B.to(cdt).transpose(1, 2), C.to(cdt).transpose(1, 2),
                   reset_mask(seq_idx), h0)
    if D is not None:
        y = y + u_ * D.to(cdt)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


def _chunked(*args, **kwargs):
    return scan_from_core(scan_cpu.chunked_core, *args, **kwargs)


def _cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
         seq_idx=None, initial_state=None, return_last_state=False):
    if not scan_cpu.cpu_kernel_available():  # no working compiler: warned once, the torch path instead
        return _chunked(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                        seq_idx=seq_idx, initial_state=initial_state, return_last_state=return_last_state)
    y, last = scan_cpu.fused_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                         reset=reset_mask(seq_idx), initial_state=initial_state)
    return (y, last) if return_last_state else y


def _triton(*args, **kwargs):
    from .scan_triton import triton_core

    return scan_from_core(triton_core, *args, **kwargs)


def _mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
               seq_idx=None, initial_state=None, return_last_state=False):
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
    if seq_idx is not None or initial_state is not None:  # not supported by the official Mamba-1 kernel
        return _triton(u, delta, A, B, C, seq_idx=seq_idx, initial_state=initial_state,
                       return_last_state=return_last_state, **kw)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, return_last_state=return_last_state, **kw)


register_backend("chunked", _chunked)
register_backend("cpu", _cpu)
register_backend("triton", _triton)
register_backend("mamba_ssm", _mamba_ssm)
assert tuple(BACKENDS) == BACKEND_NAMES


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _usable(name: str, device_type: str, probe: bool = True) -> str | None:
    """None if backend `name` can run on `device_type`, else the reason why not.

    probe=False judges by the device type alone, as if triton and mamba_ssm were installed.
    """
    if name == "cpu" and device_type != "cpu":
        return "runs on CPU tensors only"
    if name == "triton":
        if probe and not _importable("triton"):
            return "needs the triton package"
        if device_type != "cuda" and not triton_interpreted():
            return "needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if name == "mamba_ssm":
        if probe and not _importable("mamba_ssm"):
            return "needs the mamba_ssm package"
        if device_type != "cuda":
            return "needs CUDA tensors"
    return None


def available_backends(device: torch.device | str = "cpu", probe: bool = True) -> list[str]:
    dt = torch.device(device).type
    return [name for name in BACKENDS if _usable(name, dt, probe) is None]


def resolve_backend(name: str, device: torch.device | str, probe: bool = True) -> str:
    """The backend `model.scan_backend = name` runs on `device`: `auto` mapped to the device's choice,
    a named one checked. Raises ConfigError (one line: key, value, what the device allows) otherwise.

    Call it once per run, before any compute. probe=True looks at what is installed: triton and
    mamba_ssm importable, the C++ scan built (`auto` on CPU builds it, ~3 s once, cached on disk).
    probe=False (the planner) decides from the device type alone, assuming the C++ compiler and triton
    are there: `auto` is cpu on CPU, triton on CUDA.
    """
    dt = torch.device(device).type
    if name != "auto":
        known = isinstance(name, str) and name in BACKENDS
        why = _usable(name, dt, probe) if known else "is not a scan backend"
        if why is not None:
            raise ConfigError(f"model.scan_backend: {name!r} {why}; allowed on {dt}: "
                              f"{', '.join(['auto', *available_backends(dt, probe)])}")
        return name
    if dt == "cpu":
        return "cpu" if not probe or scan_cpu.cpu_kernel_available() else "chunked"
    if dt == "cuda":
        for cand in ("mamba_ssm", "triton") if probe else ("triton",):
            if _usable(cand, dt, probe) is None:
                return cand
    return "chunked"


@torch.compiler.disable  # train.compile: kept out of the graph (tracing a per-step loop unrolls it)
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   seq_idx=None, initial_state=None, return_last_state=False, backend: str = "auto"):
    fn = BACKENDS[resolve_backend(backend, u.device)]
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
              seq_idx=seq_idx, initial_state=initial_state, return_last_state=return_last_state)


@torch.compiler.disable
def projected_scan(u_rows, x_weight, dt_weight, dt_bias, A, D, z_rows, seq_idx=None, backend: str = "auto"):
    """The scan whose Δ, B, C are projections of its own input, as one autograd node where a backend fuses them;
    None elsewhere (the caller then runs its Linear layers and `selective_scan`). u_rows, z_rows (b, l, d) rows;
    (δ_r, B, C) = u·x_weightᵀ split [rank, n, n], Δ = δ_r·dt_weightᵀ with dt_bias and the softplus applied in the
    scan. Returns y (b, l, d) rows. The `cpu` backend fuses it (scan_cpu.projected_scan); the others do not."""
    if (resolve_backend(backend, u_rows.device) != "cpu" or u_rows.dtype not in (torch.float32, torch.bfloat16)
            or u_rows.numel() == 0 or not scan_cpu.cpu_kernel_available()):
        return None
    return scan_cpu.projected_scan(u_rows, x_weight, dt_weight, dt_bias, A, D, z_rows, reset=reset_mask(seq_idx))


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """One decoding step. state (b, d, n) is updated in place; x, dt, z (b, d); B, C (b, n). Returns y (b, d).

    On CUDA (with triton importable) one fused Triton kernel does it; elsewhere the torch code below.
    """
    if state.is_cuda and _importable("triton") and not torch.is_grad_enabled():
        from .scan_triton import selective_state_update_triton

        return selective_state_update_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                             dt_softplus=dt_softplus)
    return selective_state_update_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """selective_state_update in torch (any device, differentiable except through the in-place state)."""
    cdt = state.dtype
    dt = dt.to(cdt)
    if dt_bias is not None:
        dt = dt + dt_bias.to(cdt)
    if dt_softplus:
        dt = F.softplus(dt)
    x = x.to(cdt)
    dA = torch.exp(dt[:, :, None] * A.to(cdt))
    dBx = (dt * x)[:, :, None] * B.to(cdt)[:, None, :]
    state.mul_(dA).add_(dBx)
    y = torch.einsum("bdn,bn->bd", state, C.to(cdt))
    if D is not None:
        y = y + x * D.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y
