"""Fused CPU paths for the element-wise parts of a MambaSWELU step (C++ source: kernels_cpu.cpp).

    swelu_fused(z, k, λ)                  SWELU forward in one pass, its backward (dz, dk, dλ) in one pass;
                                          the reference is `lmlab.models.swelu._SWELUFunction` (torch ops)
    swelu_residual(z, k, λ, h)            h + SWELU(z) in one pass (a MambaSWELU block's output and residual
                                          add); the reference is h + SWELU(z)
    conv_silu(x, weight, bias, seq_idx)   SiLU(causal depthwise conv(x) + bias) over (b, l, d) rows, reading x in
                                          place from the in_proj output and writing the (b, l, d) layout the
                                          x_proj matmul reads; the reference is `mamba.causal_conv` + SiLU
    ce_rows(z, targets, eps, grad)        cross-entropy of each logit row and, in place of the logits, its
                                          gradient: the chunked loss's per-chunk softmax work in one kernel (bf16
                                          logits are read as they are, never raised to an fp32 copy); the
                                          reference is the torch path in `lmlab.train.losses`
    widen_scale(x, scale)                 x.float().mul_(scale) for a bf16 x in one pass, bitwise the same
    layer_norm(x, w, b, eps, out_dtype)   LayerNorm whose output is written in another dtype: under CPU bf16
                                          autocast the fp32 residual stream normalised straight into the bf16 the
                                          next matmul reads, and the bf16 gradient taken back as it comes; the
                                          reference is nn.LayerNorm followed by the cast

All compute in fp32 whatever the input dtype (fp32 or bf16, the latter under CPU autocast): SWELU's steep
slope near 0 and its exp/pow keep fp32 precision, and only the stored result is rounded to bf16. The tests hold
each to its reference, values and gradients (tests/test_kernels_cpu.py); `LMLAB_DISABLE_CPP_KERNELS=1` turns them
off (the references run instead), as a missing C++ compiler does, with one warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading

import torch

from .cpp_build import Library, kernel_source

_off = threading.local()  # reference(): this thread runs the torch reference paths
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_SWELU_BLOCK = 4096  # as in kernels_cpu.cpp
_EPS = 1e-6  # lmlab.models.swelu._EPS: where the slope for k < 1 is clamped
_NORM_ROWS = 64  # as in kernels_cpu.cpp


def _declare(lib) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.lmlab_swelu_fwd.argtypes = [i32, p, p, i64, f32, f32, i32]
    lib.lmlab_swelu_bwd.argtypes = [i32, i32, p, p, p, i64, f32, f32, f32, p, i32, i32]
    lib.lmlab_swelu_residual_fwd.argtypes = [i32, p, p, p, i64, f32, f32, i32]
    lib.lmlab_conv_silu_fwd.argtypes = [i32, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i32]
    lib.lmlab_conv_silu_bwd.argtypes = [i32, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i32]
    lib.lmlab_ce_rows.argtypes = [i32, p, p, i64, i64, f32, p, i32, i32]
    lib.lmlab_layer_norm_fwd.argtypes = [i32, i32, p, p, p, p, p, p, i64, i64, f32, i32]
    lib.lmlab_layer_norm_bwd.argtypes = [i32, i32, p, p, p, p, p, p, p, p, p, i64, i64, i32]
    lib.lmlab_widen_scale.argtypes = [p, p, i64, f32, i32]
    for fn in (lib.lmlab_swelu_fwd, lib.lmlab_swelu_bwd, lib.lmlab_swelu_residual_fwd, lib.lmlab_conv_silu_fwd,
               lib.lmlab_conv_silu_bwd, lib.lmlab_ce_rows, lib.lmlab_layer_norm_fwd, lib.lmlab_layer_norm_bwd,
               lib.lmlab_widen_scale):
        fn.restype = None


LIBRARY = Library("kernels_cpu", lambda: kernel_source("kernels_cpu.cpp"), what="fused C++ CPU kernels",
                  fallback="the torch reference paths", disable_env="LMLAB_DISABLE_CPP_KERNELS", declare=_declare)


def available() -> bool:
    """Build (once, cached on disk) and load the kernels; False, with one warning, if that fails."""
    return LIBRARY.available()


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels run on these tensors: CPU, fp32 or bf16, the library built, not `reference()`,
    and not inside torch.compile (which fuses the reference paths itself; a ctypes call would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return (not getattr(_off, "on", False) and all(t.device.type == "cpu" and t.dtype in _DTYPES for t in tensors)
            and available())


@contextlib.contextmanager
def reference():
    """Within it (this thread), models run the torch reference paths instead of the fused kernels."""
    before = getattr(_off, "on", False)
    _off.on = True
    try:
        yield
    finally:
        _off.on = before


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


# ------------------------------------------------------------------------------------------------ SWELU
def _swelu_backward(z: torch.Tensor, k: torch.Tensor, lam: torch.Tensor, kl: tuple[float, float], g: torch.Tensor,
                    need: tuple[bool, bool, bool]) -> tuple:
    """(dz in z's dtype, dk, dλ) from the incoming gradient g (fp32 or bf16, read as it comes), one pass."""
    kf, lf = kl
    g = g.contiguous()
    if g.dtype not in _DTYPES:
        g = g.float()
    gz = torch.empty_like(z) if need[0] else None
    blocks = max(1, math.ceil(z.numel() / _SWELU_BLOCK))
    partial = torch.zeros(2 * blocks, dtype=torch.float64)
    LIBRARY.lib.lmlab_swelu_bwd(_DTYPES[z.dtype], _DTYPES[g.dtype], _ptr(z), _ptr(g), _ptr(gz), z.numel(), kf, lf,
                                _EPS, _ptr(partial), int(gz is not None), torch.get_num_threads())
    sums = partial.view(blocks, 2).tolist()  # added in block order: the same on any thread count
    gk = torch.tensor(math.fsum(s[0] for s in sums), dtype=k.dtype).reshape(k.shape)
    glam = torch.tensor(math.fsum(s[1] for s in sums), dtype=lam.dtype).reshape(lam.shape)
    return gz, gk if need[1] else None, glam if need[2] else None


class _SWELUFused(torch.autograd.Function):
    """SWELU(z), or with `res` (fp32) res + SWELU(z) in the same pass; the backward hands res its gradient as is."""

    @staticmethod
    def forward(ctx, z, k, lam, res):
        z = z.contiguous()
        kf, lf = float(k), float(lam)
        if res is None:
            y = torch.empty_like(z)
            LIBRARY.lib.lmlab_swelu_fwd(_DTYPES[z.dtype], _ptr(z), _ptr(y), z.numel(), kf, lf, torch.get_num_threads())
        else:
            res = res.contiguous()
            y = torch.empty_like(res)
            LIBRARY.lib.lmlab_swelu_residual_fwd(_DTYPES[z.dtype], _ptr(z), _ptr(res), _ptr(y), z.numel(), kf, lf,
                                                 torch.get_num_threads())
        ctx.save_for_backward(z, k, lam)
        ctx.kl, ctx.res = (kf, lf), res is not None
        return y

    @staticmethod
    def backward(ctx, g):
        z, k, lam = ctx.saved_tensors
        return (*_swelu_backward(z, k, lam, ctx.kl, g, ctx.needs_input_grad[:3]), g if ctx.res else None)


@torch.compiler.disable  # a ctypes call: kept out of compiled graphs
def swelu_fused(z: torch.Tensor, k: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """SWELU with scalar k > 0 and λ (fp32 parameters) on a CPU fp32/bf16 tensor z; the result has z's dtype."""
    return _SWELUFused.apply(z, k, lam, None)


@torch.compiler.disable
def swelu_residual(z: torch.Tensor, k: torch.Tensor, lam: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """res + SWELU(z) in one pass: res fp32 (the residual stream), z fp32 or bf16 of res's shape; an fp32 result
    whose SWELU term is not rounded to z's dtype first. The backward reads the fp32 gradient as it comes (no bf16
    copy of it for z's branch) and hands it on to res unchanged."""
    if res.dtype != torch.float32 or res.shape != z.shape:
        raise ValueError(f"swelu_residual: res must be float32 of z's shape {tuple(z.shape)}, "
                         f"got {res.dtype} {tuple(res.shape)}")
    return _SWELUFused.apply(z, k, lam, res)


# ------------------------------------------------------------------------------------------------ conv + SiLU
class _ConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx):
        b, l, d = x.shape
        if x.stride(2) != 1:
            x = x.contiguous()
        wt = weight.detach().float().reshape(d, -1).t().contiguous()  # (K, d)
        bf = None if bias is None else bias.detach().float().contiguous()
        seq = None if seq_idx is None else seq_idx.to(torch.int64).contiguous()
        out = torch.empty(b, l, d, dtype=x.dtype)
        LIBRARY.lib.lmlab_conv_silu_fwd(_DTYPES[x.dtype], _ptr(x), _ptr(wt), _ptr(bf), _ptr(seq), _ptr(out), b, l, d,
                                 wt.shape[0], x.stride(0), x.stride(1), torch.get_num_threads())
        ctx.save_for_backward(x, wt, bf, seq)
        ctx.shapes = weight.shape, weight.dtype, None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, gu):
        x, wt, bf, seq = ctx.saved_tensors
        w_shape, w_dtype, b_dtype = ctx.shapes
        b, l, d = x.shape
        gu = gu.to(x.dtype).contiguous()
        gx = torch.empty(b, l, d, dtype=x.dtype)
        gw = torch.empty_like(wt)
        gb = None if bf is None else torch.empty_like(bf)
        LIBRARY.lib.lmlab_conv_silu_bwd(_DTYPES[x.dtype], _ptr(x), _ptr(wt), _ptr(bf), _ptr(seq), _ptr(gu), _ptr(gx),
                                 _ptr(gw), _ptr(gb), b, l, d, wt.shape[0], x.stride(0), x.stride(1),
                                 torch.get_num_threads())
        gweight = gw.t().reshape(w_shape).to(w_dtype)
        return gx, gweight, None if gb is None else gb.to(b_dtype), None


@torch.compiler.disable
def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(causal depthwise conv + bias) of x (b, l, d) (channels contiguous; any batch/time strides), with
    weight (d, 1, K) as nn.Conv1d holds it. With seq_idx (b, l), taps never cross a document start.
    Returns (b, l, d) contiguous in x's dtype."""
    return _ConvSiLU.apply(x, weight, bias, seq_idx)


# ------------------------------------------------------------------------------------------------ cross-entropy rows
@torch.compiler.disable
def ce_rows(z: torch.Tensor, targets: torch.Tensor, eps: float = 0.0, grad: bool = False) -> torch.Tensor:
    """(n,) fp32 cross-entropy of each row of z (n, V), contiguous fp32 or bf16, against targets (n,) in [0, V),
    with label smoothing `eps`: (1 − ε)(lse − z_t) + ε(lse − mean z). With `grad`, z is overwritten (in its dtype)
    by that loss's gradient, softmax(z) − (1 − ε)·onehot(t) − ε/V. No autograd: the caller uses it inside its own
    backward."""
    if not z.is_contiguous():
        raise ValueError("ce_rows needs contiguous logits")
    n, vocab = z.shape
    t = targets.to(torch.int64).contiguous()
    if n:  # the kernel reads z[r, t] unchecked
        low, high = (int(v) for v in torch.aminmax(t))
        if low < 0 or high >= vocab:
            raise IndexError(f"ce_rows: targets must lie in [0, {vocab}), got {low}..{high}")
    loss = torch.empty(n, dtype=torch.float32)
    LIBRARY.lib.lmlab_ce_rows(_DTYPES[z.dtype], _ptr(z), _ptr(t), n, vocab, float(eps), _ptr(loss), int(grad),
                              torch.get_num_threads())
    return loss


# ------------------------------------------------------------------------------------------------ LayerNorm
class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, out_dtype: torch.dtype):
        shape, d = x.shape, x.shape[-1]
        rows = x.reshape(-1, d).contiguous()
        w, b = weight.detach().float().contiguous(), bias.detach().float().contiguous()
        y = torch.empty(rows.shape, dtype=out_dtype)
        mean, rstd = torch.empty(rows.shape[0]), torch.empty(rows.shape[0])
        LIBRARY.lib.lmlab_layer_norm_fwd(_DTYPES[rows.dtype], _DTYPES[out_dtype], _ptr(rows), _ptr(w), _ptr(b), _ptr(y),
                                         _ptr(mean), _ptr(rstd), rows.shape[0], d, float(eps), torch.get_num_threads())
        ctx.save_for_backward(rows, w, mean, rstd)
        ctx.info = shape, weight.dtype, bias.dtype
        return y.view(shape)

    @staticmethod
    def backward(ctx, g):
        rows, w, mean, rstd = ctx.saved_tensors
        shape, w_dtype, b_dtype = ctx.info
        n, d = rows.shape
        g = g.reshape(n, d).contiguous()
        if g.dtype not in _DTYPES:
            g = g.float()
        gx = torch.empty_like(rows)
        dw, db = torch.empty(d), torch.empty(d)
        partial = torch.empty(2, max(1, -(-n // _NORM_ROWS)), d)
        LIBRARY.lib.lmlab_layer_norm_bwd(_DTYPES[rows.dtype], _DTYPES[g.dtype], _ptr(rows), _ptr(g), _ptr(w),
                                         _ptr(mean), _ptr(rstd), _ptr(gx), _ptr(dw), _ptr(db), _ptr(partial), n, d,
                                         torch.get_num_threads())
        return gx.view(shape), dw.to(w_dtype), db.to(b_dtype), None, None


@torch.compiler.disable
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over the last dimension of x (fp32 or bf16) with weight and bias (d,), the result in `out_dtype`
    (fp32 or bf16), statistics in fp32: `F.layer_norm(x.float(), …).to(out_dtype)` in one pass. The gradient of
    x comes back in x's dtype whatever the dtype of the incoming one; those of weight and bias are summed per
    fixed block of rows, in order (the same at any thread count)."""
    d = x.shape[-1]
    if weight.numel() != d or bias.numel() != d or out_dtype not in _DTYPES:
        raise ValueError(f"layer_norm: weight and bias of {d} elements and an fp32/bf16 output, got "
                         f"{weight.numel()}, {bias.numel()}, {out_dtype}")
    return _LayerNorm.apply(x, weight, bias, eps, out_dtype)


# ------------------------------------------------------------------------------------------------ widen + scale
@torch.compiler.disable
def widen_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x.float().mul_(scale)` for a CPU bf16 tensor x in one pass (no fp32 copy written and read again): the same
    bits, as both round once, in the fp32 multiply."""
    if x.dtype != torch.bfloat16:
        raise ValueError(f"widen_scale: x must be bfloat16, got {x.dtype}")
    src = x.contiguous()
    out = torch.empty(src.shape, dtype=torch.float32)
    LIBRARY.lib.lmlab_widen_scale(_ptr(src), _ptr(out), src.numel(), float(scale), torch.get_num_threads())
    return out
