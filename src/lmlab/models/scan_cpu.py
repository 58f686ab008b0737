"""Fast CPU selective scans: no (b, d, l, n) tensor is kept for the backward.

`chunked` (pure torch, any device; the fallback) implements the *core* of `scan.scan_from_core`:

    core(u, δ, A, B, C, reset, h0) → (y, h_last)
        u, δ (b, d, l)   δ already biased and softplus-ed
        A (d, n);  B, C (b, l, n)  (time-major, so one step reads n contiguous values)
        reset (b, l) bool or None;  h0 (b, d, n) or None
        y_t = C_t · h_t,  h_t = exp(δ_t A) · h_{t−1} · (1 − reset_t) + δ_t u_t B_t

Time is cut into chunks of T steps. Inside a chunk the decays exp(δA) and inputs δuB are
materialised as (T, b, d, n) and the recurrence runs as one in-place `addcmul` per step; only the
chunk-boundary states are kept. The backward recomputes each chunk's states from its boundary state
and runs the adjoint recurrence backwards in time:

    g_t = C_t y'_t + exp(δ_{t+1} A)(1 − reset_{t+1}) g_{t+1}        (g_t = ∂L/∂h_t)

`cpu` (C++/OpenMP in scan_cpu.cpp beside this file, built at first use by cpp_build.py with the system C++
compiler into ~/.cache/lmlab or $LMLAB_CACHE, loaded with ctypes, no torch headers, ~3 s to build) is the same
algorithm fused with everything around it: Δ bias + softplus, the D skip and the SiLU(z) gate. It walks time for a
block of LANES channels at once (16 where it is built for AVX-512, else 8), one SIMD lane a channel, so it reads
the mixer's transposed views of its (b, l, ·) rows in place with contiguous loads (any other strides work too,
element by element), writes the output and du, dΔ, dz as (b, l, d) rows the next matmul reads without a copy, and
reads and writes bf16 directly (computing in fp32: the state, A, D and the parameter gradients stay fp32). The
backward recomputes states chunk by chunk (CPU_CHUNK) from the saved boundary states, and writes du, dΔ, dz a
chunk of its channel group at a time as whole rows, with non-temporal stores when an output is 1 MiB or more (no
line is read before it is overwritten). Its work item is a batch row and a fixed group of channel blocks
(`backward_groups`), which sums its channels' dB, dC into its own partial buffer; the partials, and dA, dD, dbias
over batch rows, are then reduced in a fixed order. So outputs and gradients are bitwise the same at any thread
count and under any OpenMP schedule. Measured against `chunked` it is 10–15× faster (docs/benchmarks.md), hence
`auto` on CPU. Without a working compiler it warns once and runs `chunked`.
"""

from __future__ import annotations

import ctypes

import torch

from .cpp_build import Library, kernel_source

# ------------------------------------------------------------------------------------------ chunked
CHUNK = 32  # steps per chunk of the torch path: (b, d, T, n) per chunk is what lives in memory


def _chunk_tensors(u, dt, A, B, reset, s, e):
    """Decays and inputs of steps [s, e): dA, x (T, b, d, n) (time-major so that [t] is contiguous)."""
    dtc = dt[:, :, s:e].permute(2, 0, 1)  # (T, b, d)
    dA = torch.exp(dtc[..., None] * A)  # (T, b, d, n)
    if reset is not None:
        dA = dA * (~reset[:, s:e]).t().to(dA.dtype)[:, :, None, None]
    x = (dtc * u[:, :, s:e].permute(2, 0, 1))[..., None] * B[:, s:e].transpose(0, 1)[:, :, None, :]
    return dA, x


def _run_chunk(dA, x, h):
    """hs[t] = dA[t] · hs[t−1] + x[t], hs[−1] = h. x is overwritten with the states (T, b, d, n)."""
    prev = h
    for t in range(x.shape[0]):
        x[t].addcmul_(dA[t], prev)
        prev = x[t]
    return x


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, reset, h0, chunk):
        b, d, l = u.shape
        n = A.shape[1]
        h = u.new_zeros(b, d, n) if h0 is None else h0.clone()
        y = u.new_empty(b, d, l)
        starts = list(range(0, l, chunk))
        ckpt = u.new_empty(len(starts), b, d, n)
        for c, s in enumerate(starts):
            e = min(l, s + chunk)
            ckpt[c] = h
            dA, x = _chunk_tensors(u, dt, A, B, reset, s, e)
            hs = _run_chunk(dA, x, h)  # (T, b, d, n)
            y[:, :, s:e] = torch.einsum("tbdn,btn->bdt", hs, C[:, s:e])
            h = hs[-1].clone()
        ctx.save_for_backward(u, dt, A, B, C, reset, ckpt)
        ctx.chunk, ctx.has_h0 = chunk, h0 is not None
        return y, h

    @staticmethod
    def backward(ctx, gy, ghlast):
        u, dt, A, B, C, reset, ckpt = ctx.saved_tensors
        chunk = ctx.chunk
        b, d, l = u.shape
        gu, gdt = torch.empty_like(u), torch.empty_like(dt)
        gA = torch.zeros_like(A)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gy = gy.contiguous() if gy is not None else u.new_zeros(b, d, l)
        g = ghlast.clone() if ghlast is not None else u.new_zeros(ckpt.shape[1:])  # ∂L/∂h after chunk
        carry_dA = None  # dA of the first step of the chunk after this one
        for c in reversed(range(ckpt.shape[0])):
            s = c * chunk
            e = min(l, s + chunk)
            dA, x = _chunk_tensors(u, dt, A, B, reset, s, e)
            hs = _run_chunk(dA, x, ckpt[c])  # (T, b, d, n)
            gyc = gy[:, :, s:e].permute(2, 0, 1)  # (T, b, d)
            Cc = C[:, s:e].transpose(0, 1)  # (T, b, n)
            gC[:, s:e] = torch.einsum("tbdn,tbd->btn", hs, gyc)
            G = gyc[..., None] * Cc[:, :, None, :]  # (T, b, d, n): C_t y'_t, becomes ∂L/∂h_t
            if carry_dA is None:
                G[-1] += g
            else:
                G[-1].addcmul_(carry_dA, g)
            for t in range(G.shape[0] - 2, -1, -1):
                G[t].addcmul_(dA[t + 1], G[t + 1])
            g, carry_dA = G[0], dA[0]
            # ∂L/∂dA_t = G_t h_{t−1};   dA = exp(δA)·keep  →  ∂/∂δ = Σ_n G h_{t−1} dA A
            hprev = torch.cat([ckpt[c][None], hs[:-1]], dim=0)
            GhdA = G * hprev * dA  # (T, b, d, n)
            gA += torch.einsum("tbdn,tbd->dn", GhdA, dt[:, :, s:e].permute(2, 0, 1))
            sdA = torch.einsum("tbdn,dn->bdt", GhdA, A)
            Bc = B[:, s:e].transpose(0, 1)  # (T, b, n)
            sB = torch.einsum("tbdn,tbn->bdt", G, Bc)  # Σ_n G_t B_t
            gu[:, :, s:e] = sB * dt[:, :, s:e]
            gdt[:, :, s:e] = sdA + sB * u[:, :, s:e]
            gB[:, s:e] = torch.einsum("tbdn,bdt->btn", G, u[:, :, s:e] * dt[:, :, s:e])
        gh0 = g * carry_dA if ctx.has_h0 else None
        return gu, gdt, gA, gB, gC, None, gh0, None


def chunked_core(u, dt, A, B, C, reset=None, h0=None, chunk: int = CHUNK):
    return _ChunkedScan.apply(u.contiguous(), dt.contiguous(), A.contiguous(), B.contiguous(),
                              C.contiguous(), reset, h0, chunk)


# ------------------------------------------------------------------------------------------ C++
CPU_CHUNK = 64  # steps between saved states of the C++ path: memory (b, d, l/64, n)
GROUP_ITEMS = 32  # backward work items (batch row × channel group); scratch for dB, dC: 2·b·G·l·n, b·G < 32 + b
# (fewer groups, more blocks each: a group's blocks add into one lane buffer, summed once a chunk; 32 items against 64
# took the bar's backward from 2.9–3.0 to 2.85 ms, docs/benchmarks.md)

# The kernel's source, shipped beside this module as package data.
CPP_SOURCE = "scan_cpu.cpp"



def cpp_source() -> str:
    """The C++ kernel's source text (part of the build cache key: an edited source builds anew)."""
    return kernel_source(CPP_SOURCE)


def _declare(lib) -> None:
    """The built kernel's lanes (channels per block: 16 where the compiler targets AVX-512, else 8)."""
    global LANES
    lib.scan_lanes.restype = ctypes.c_int64
    LANES = int(lib.scan_lanes())


LIBRARY = Library("scan_cpu", lambda: cpp_source(), what="C++ selective scan",
                  fallback="the slower pure-torch 'chunked' scan", disable_env="LMLAB_DISABLE_CPP_SCAN",
                  declare=_declare)


def cpu_kernel_available() -> bool:
    """Build (once, cached on disk) and load the C++ scan; False, with one warning, if that fails."""
    return LIBRARY.available()


class _Args(ctypes.Structure):
    """Mirror of `struct Args` in the C++ source."""

    _fields_ = ([(name, ctypes.c_void_p) for name in
                 ("u", "delta", "bias", "A", "B", "C", "D", "z", "h0", "gout", "ghlast", "reset",
                  "out", "hlast", "ckpt", "gu", "gdelta", "gz", "gh0", "gA", "gD", "gbias", "gB", "gC",
                  "pA", "pD", "pbias", "pB", "pC")]
                + [(name, ctypes.c_int64) for name in ("b", "d", "l", "n", "chunk", "groups")]
                + [(name, ctypes.c_int64 * 3) for name in ("su", "sdt", "sz", "sB", "sC", "sgo")]
                + [("softplus", ctypes.c_int32), ("nthreads", ctypes.c_int32)])


def _args(**tensors) -> _Args:
    a = _Args()
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            setattr(a, name, t.data_ptr())
        elif t is not None:
            setattr(a, name, t)
    return a


def _strides(t: torch.Tensor | None):
    return (ctypes.c_int64 * 3)(*(t.stride() if t is not None else (0, 0, 0)))


def _call(kind: str, dtype: torch.dtype, a: _Args) -> None:
    fn = getattr(LIBRARY.lib, f"scan_{kind}_{STORAGE[dtype]}")
    fn(ctypes.byref(a))


# the storage types the kernel reads and writes per element (it computes in float, or double for double)
STORAGE = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float64: "f64"}
LANES = 8  # channels per block of the kernel (W in the source): set from the built kernel by _declare


def backward_groups(b: int, d: int) -> int:
    """Groups of LANES-channel blocks per batch row in the backward: about GROUP_ITEMS work items in all, whatever
    the thread count (the rounding of dB, dC depends on the groups, so they must not depend on threads)."""
    return max(1, min(-(-d // LANES), -(-GROUP_ITEMS // b)))


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """(b, l, ·) rows as the (b, ·, l) view the caller's shapes ask for."""
    return t.transpose(1, 2) if t is not None else None


class _CppScan(torch.autograd.Function):
    """The whole selective scan in two C++ calls: Δ bias + softplus, recurrence, D skip and SiLU(z) gate.

    u, delta, z, B, C come in one storage dtype (float32, bfloat16 or float64) as any strided views; A, D, bias
    and h0 in the compute dtype (float32, or float64). The output and du, dΔ, dz are written as (b, l, d) rows
    (returned as (b, d, l) views of them), so the mixer's matmuls read them without a copy."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, h0, reset, softplus, chunk):
        out, hlast, r8, ckpt = _scan_forward(u, delta, A, B, C, D, z, bias, h0, reset, softplus, chunk)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, r8, ckpt)
        ctx.softplus, ctx.chunk, ctx.has_h0 = softplus, chunk, h0 is not None
        return out.transpose(1, 2), hlast

    @staticmethod
    def backward(ctx, gout, ghlast):
        u, delta, A, B, C, D, z, bias, r8, ckpt = ctx.saved_tensors
        gu, gdelta, gz, gh0, gA, gD, gbias, gB, gC = _scan_backward(u, delta, A, B, C, D, z, bias, r8, ckpt, gout,
                                                                    ghlast, ctx.softplus, ctx.chunk)
        return (_rows(gu), _rows(gdelta), gA, _rows(gB), _rows(gC), gD if D is not None else None, _rows(gz),
                gbias if bias is not None else None, gh0 if ctx.has_h0 else None, None, None, None)


def _scan_forward(u, delta, A, B, C, D, z, bias, h0, reset, softplus, chunk):
    """The forward call: (out (b, l, d) rows, h_last, the reset mask as bytes, the chunk-boundary states)."""
    b, d, l = u.shape
    n = A.shape[1]
    nc, nb = (l + chunk - 1) // chunk, -(-d // LANES)
    out = u.new_empty(b, l, d)
    hlast, ckpt = A.new_empty(b, d, n), A.new_empty(b, nb, nc, n, LANES)
    r8 = reset.to(torch.uint8).contiguous() if reset is not None else None
    a = _args(u=u, delta=delta, bias=bias, A=A, B=B, C=C, D=D, z=z, h0=h0, reset=r8, out=out, hlast=hlast,
              ckpt=ckpt, b=b, d=d, l=l, n=n, chunk=chunk, softplus=int(softplus), nthreads=torch.get_num_threads())
    a.su, a.sdt, a.sz, a.sB, a.sC = (_strides(t) for t in (u, delta, z, B, C))
    _call("fwd", u.dtype, a)
    return out, hlast, r8, ckpt


def _scan_backward(u, delta, A, B, C, D, z, bias, r8, ckpt, gout, ghlast, softplus, chunk):
    """The backward call: (du, dΔ, dz as (b, l, d) rows, dh0, dA, dD, dbias, dB, dC as (b, l, n) rows)."""
    b, d, l = u.shape
    n = A.shape[1]
    groups = backward_groups(b, d)
    gout = gout.to(u.dtype) if gout is not None else None
    ghlast = ghlast.to(A.dtype).contiguous() if ghlast is not None else None
    gu, gdelta = u.new_empty(b, l, d), u.new_empty(b, l, d)
    gz = u.new_empty(b, l, d) if z is not None else None
    gh0, gA, gD, gbias = A.new_empty(b, d, n), A.new_empty(d, n), A.new_empty(d), A.new_empty(d)
    gB, gC = u.new_empty(b, l, n), u.new_empty(b, l, n)
    # partial sums the kernel reduces in a fixed order: per batch row (dA, dD, dbias), per group (dB, dC)
    pA, pD, pbias = A.new_empty(b, d, n), A.new_empty(b, d), A.new_empty(b, d)
    pB, pC = A.new_empty(b, groups, l, n), A.new_empty(b, groups, l, n)
    a = _args(u=u, delta=delta, bias=bias, A=A, B=B, C=C, D=D, z=z, reset=r8, ckpt=ckpt, gout=gout,
              ghlast=ghlast, gu=gu, gdelta=gdelta, gz=gz, gh0=gh0, gA=gA, gD=gD, gbias=gbias, gB=gB, gC=gC,
              pA=pA, pD=pD, pbias=pbias, pB=pB, pC=pC, b=b, d=d, l=l, n=n, chunk=chunk, groups=groups,
              softplus=int(softplus), nthreads=torch.get_num_threads())
    a.su, a.sdt, a.sz, a.sB, a.sC, a.sgo = (_strides(t) for t in (u, delta, z, B, C, gout))
    _call("bwd", u.dtype, a)
    return gu, gdelta, gz, gh0, gA, gD, gbias, gB, gC


class _CppProjectedScan(torch.autograd.Function):
    """The mixer's x_proj and dt_proj matmuls and the scan as one autograd node (see `projected_scan`)."""

    @staticmethod
    def forward(ctx, u, w_x, w_dt, bias, A, D, z, reset, chunk):
        b, l, d = u.shape
        rank, n = w_dt.shape[1], A.shape[1]
        rows = u.reshape(b * l, d)
        dbc = rows @ w_x.t()  # (b·l, rank + 2n): δ_r, B, C
        dt_r = dbc[:, :rank]
        delta = (dt_r @ w_dt.t()).view(b, l, d)
        B, C = (dbc[:, i:i + n].view(b, l, n) for i in (rank, rank + n))
        scan_in = (u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D,
                   z.transpose(1, 2) if z is not None else None, bias)
        out, _, r8, ckpt = _scan_forward(*scan_in, None, reset, True, chunk)
        ctx.save_for_backward(*scan_in, r8, ckpt, w_x, w_dt, dt_r)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, gout):
        u, delta, A, B, C, D, z, bias, r8, ckpt, w_x, w_dt, dt_r = ctx.saved_tensors
        b, d, l = u.shape
        gu, gdelta, gz, _, gA, gD, gbias, gB, gC = _scan_backward(u, delta, A, B, C, D, z, bias, r8, ckpt,
                                                                  gout.transpose(1, 2), None, True, ctx.chunk)
        gdelta = gdelta.view(b * l, d)
        gdbc = torch.cat([gdelta @ w_dt, gB.view(b * l, -1), gC.view(b * l, -1)], dim=1)
        rows = u.transpose(1, 2).reshape(b * l, d)  # u's (b, l, d) rows, as the forward read them
        gu.view(b * l, d).addmm_(gdbc, w_x)  # x_proj's input gradient added into the scan's du in the matmul
        need = ctx.needs_input_grad  # frozen projections (a LoRA run's base weights) get no weight gradient
        return (gu, gdbc.t() @ rows if need[1] else None, gdelta.t() @ dt_r if need[2] else None, gbias, gA, gD, gz,
                None, None)


def projected_scan(u, w_x, w_dt, dt_bias, A, D, z, reset=None, chunk: int = CPU_CHUNK):
    """y (b, l, d) rows of the scan whose Δ, B, C are projections of its own input u (b, l, d) rows:
    (δ_r, B, C) = u·w_xᵀ and Δ = δ_r·w_dtᵀ, with dt_bias and the softplus applied inside the scan; z (b, l, d)
    rows the gate. One autograd node in place of x_proj, dt_proj and the scan: in the backward, x_proj's input
    gradient is added into the scan's du by the matmul itself (`addmm_`, no separate (b, l, d) add) and the
    gradients of δ_r, B and C go to x_proj as one (b·l, rank + 2n) tensor. u, z, w_x and w_dt in one storage
    dtype (fp32 or bf16: the caller casts the weights as autocast would); A, D, dt_bias in fp32.
    The reference is the composition it replaces (tests/test_scan.py holds them together)."""
    if u.device.type != "cpu":
        raise ValueError(f"the C++ scan needs CPU tensors, got {u.device}")
    return _CppProjectedScan.apply(u, w_x, w_dt, dt_bias.float().contiguous(), A.float().contiguous(),
                                   D.float().contiguous(), z, reset, chunk)


def fused_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, reset=None,
               initial_state=None, chunk: int = CPU_CHUNK):
    """The `cpu` backend's scan: (y, h_last) for CPU tensors; `reset` (b, l) bool as from `scan.reset_mask`.

    Needs `cpu_kernel_available()`; `scan.selective_scan` falls back to `chunked` when it is not.
    """
    if u.device.type != "cpu":
        raise ValueError(f"the C++ scan needs CPU tensors, got {u.device}")
    dtype_in = u.dtype
    sdt = dtype_in if dtype_in in STORAGE else torch.float32  # what the kernel reads and writes per element
    cdt = torch.float64 if sdt == torch.float64 else torch.float32  # what it computes in
    u, delta, B, C = (t.to(sdt) for t in (u, delta, B, C))
    z = z.to(sdt) if z is not None else None
    A = A.to(cdt).contiguous()
    D, bias, h0 = (t.to(cdt).contiguous() if t is not None else None for t in (D, delta_bias, initial_state))
    out, last = _CppScan.apply(u, delta, A, B, C, D, z, bias, h0, reset, delta_softplus, chunk)
    return out.to(dtype_in), last
