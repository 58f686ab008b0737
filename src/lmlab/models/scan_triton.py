"""Fused Triton kernels for the selective scan (forward and backward) and the decoding step.

Imported only when the `triton` backend runs (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1,
which must be set before triton is first imported). One program owns one batch row b and a block of
BLOCK_D channels, with the (BLOCK_D, n) state in fp32 registers, and walks time in chunks of CHUNK:

    forward    per chunk, load (CHUNK, BLOCK_D) of u, δ and (CHUNK, n) of B, C; build
               dA = exp(δA), x = δuB as (CHUNK, BLOCK_D, n) in registers; an associative scan over
               time with (a1, b1)∘(a2, b2) = (a1a2, a2b1 + b2) gives the in-chunk states, h_t = H_t + P_t h;
               y_t = Σ_n C_t h_t. Only the state before each chunk is written (b, l/CHUNK, d, n).
    backward   chunks last to first: recompute the chunk's states from its saved state, then a
               *reverse* associative scan of the adjoint g_t = C_t y'_t + dA_{t+1} g_{t+1} (dA_{t+1}
               is loaded one step ahead, so no register shift is needed). dA_t h_{t−1} = h_t − x_t gives
               the δ and A gradients; B and C gradients are summed over channel blocks with atomics.

So no (b, d, l, n) tensor ever exists in memory. Block sizes are untuned defaults (no GPU was
available when this was written); see docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 16  # scan.TRITON_CHUNK states it without importing triton (the planner reads it there)
BLOCK_D = 16
NUM_WARPS = 4
NUM_WARPS_BWD = 8  # the backward holds ~10 (CHUNK, BLOCK_D, n) tiles live


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, reset_ptr, h0_ptr, y_ptr, hlast_ptr, ckpt_ptr,
    L, D, N,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Bb, s_Bl, s_Bn, s_Cb, s_Cl, s_Cn,
    HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    mask_d, mask_n = offs_d < D, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * N + offs_n[None, :]  # (BLOCK_D, BLOCK_N) offsets in a contiguous (d, n)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * D * N + dn, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    nc = tl.cdiv(L, CHUNK)
    for c in range(nc):
        t = c * CHUNK + offs_t
        mask_t = t < L
        m_td = mask_t[:, None] & mask_d[None, :]
        m_tn = mask_t[:, None] & mask_n[None, :]
        u = tl.load(u_ptr + pid_b * s_ub + offs_d[None, :] * s_ud + t[:, None] * s_ul, mask=m_td, other=0.0)
        dt = tl.load(dt_ptr + pid_b * s_tb + offs_d[None, :] * s_td + t[:, None] * s_tl, mask=m_td, other=0.0)
        Bv = tl.load(B_ptr + pid_b * s_Bb + t[:, None] * s_Bl + offs_n[None, :] * s_Bn, mask=m_tn, other=0.0)
        Cv = tl.load(C_ptr + pid_b * s_Cb + t[:, None] * s_Cl + offs_n[None, :] * s_Cn, mask=m_tn, other=0.0)
        dA = tl.exp(dt[:, :, None] * A[None, :, :])  # (CHUNK, BLOCK_D, BLOCK_N); padded steps: 1
        if HAS_RESET:
            r = tl.load(reset_ptr + pid_b * L + t, mask=mask_t, other=0)
            dA = tl.where(r[:, None, None] != 0, 0.0, dA)
        x = (dt * u)[:, :, None] * Bv[:, None, :]
        tl.store(ckpt_ptr + (pid_b * nc + c) * D * N + dn, h, mask=mask_dn)
        P, H = tl.associative_scan((dA, x), 0, _combine)
        hs = H + P * h[None, :, :]
        y = tl.sum(hs * Cv[:, None, :], axis=2)  # (CHUNK, BLOCK_D)
        tl.store(y_ptr + (pid_b * D + offs_d[None, :]) * L + t[:, None], y, mask=m_td)
        h = tl.sum(tl.where((offs_t == CHUNK - 1)[:, None, None], hs, 0.0), axis=0)
    tl.store(hlast_ptr + pid_b * D * N + dn, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, reset_ptr, ckpt_ptr, gy_ptr, ghlast_ptr,
    gu_ptr, gdt_ptr, gA_ptr, gB_ptr, gC_ptr, gh0_ptr,
    L, D, N,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Bb, s_Bl, s_Bn, s_Cb, s_Cl, s_Cn,
    HAS_RESET: tl.constexpr, HAS_GHLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, CHUNK)
    mask_d, mask_n = offs_d < D, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)
    if HAS_GHLAST:  # ∂L/∂h of the step after the current chunk (a virtual step with dA = 1 at the end)
        g = tl.load(ghlast_ptr + pid_b * D * N + dn, mask=mask_dn, other=0.0)
    else:
        g = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    nc = tl.cdiv(L, CHUNK)
    for i in range(nc):
        c = nc - 1 - i
        t = c * CHUNK + offs_t
        mask_t = t < L
        m_td = mask_t[:, None] & mask_d[None, :]
        m_tn = mask_t[:, None] & mask_n[None, :]
        tn = t + 1
        m_td1 = (tn < L)[:, None] & mask_d[None, :]
        u = tl.load(u_ptr + pid_b * s_ub + offs_d[None, :] * s_ud + t[:, None] * s_ul, mask=m_td, other=0.0)
        dt = tl.load(dt_ptr + pid_b * s_tb + offs_d[None, :] * s_td + t[:, None] * s_tl, mask=m_td, other=0.0)
        dt1 = tl.load(dt_ptr + pid_b * s_tb + offs_d[None, :] * s_td + tn[:, None] * s_tl,
                      mask=m_td1, other=0.0)
        Bv = tl.load(B_ptr + pid_b * s_Bb + t[:, None] * s_Bl + offs_n[None, :] * s_Bn, mask=m_tn, other=0.0)
        Cv = tl.load(C_ptr + pid_b * s_Cb + t[:, None] * s_Cl + offs_n[None, :] * s_Cn, mask=m_tn, other=0.0)
        gy = tl.load(gy_ptr + (pid_b * D + offs_d[None, :]) * L + t[:, None], mask=m_td, other=0.0)
        dA = tl.exp(dt[:, :, None] * A[None, :, :])
        dA1 = tl.exp(dt1[:, :, None] * A[None, :, :])  # dA_{t+1}; 1 past the end
        if HAS_RESET:
            r = tl.load(reset_ptr + pid_b * L + t, mask=mask_t, other=0)
            r1 = tl.load(reset_ptr + pid_b * L + tn, mask=tn < L, other=0)
            dA = tl.where(r[:, None, None] != 0, 0.0, dA)
            dA1 = tl.where(r1[:, None, None] != 0, 0.0, dA1)
        du = dt * u
        x = du[:, :, None] * Bv[:, None, :]
        h0 = tl.load(ckpt_ptr + (pid_b * nc + c) * D * N + dn, mask=mask_dn, other=0.0)
        P, H = tl.associative_scan((dA, x), 0, _combine)
        hs = H + P * h0[None, :, :]  # states h_t of the chunk
        # adjoint: G_t = C_t y'_t + dA_{t+1} G_{t+1}, G after the chunk = g
        Pr, Gs = tl.associative_scan((dA1, gy[:, :, None] * Cv[:, None, :]), 0, _combine, reverse=True)
        G = Gs + Pr * g[None, :, :]
        w = G * (hs - x)  # G_t · dA_t h_{t−1}
        gA += tl.sum(w * dt[:, :, None], axis=0)
        sB = tl.sum(G * Bv[:, None, :], axis=2)  # (CHUNK, BLOCK_D)
        gdt = tl.sum(w * A[None, :, :], axis=2) + sB * u
        off_td = (pid_b * D + offs_d[None, :]) * L + t[:, None]
        tl.store(gu_ptr + off_td, sB * dt, mask=m_td)
        tl.store(gdt_ptr + off_td, gdt, mask=m_td)
        off_tn = (pid_b * L + t[:, None]) * N + offs_n[None, :]
        tl.atomic_add(gB_ptr + off_tn, tl.sum(G * du[:, :, None], axis=1), mask=m_tn)
        tl.atomic_add(gC_ptr + off_tn, tl.sum(hs * gy[:, :, None], axis=1), mask=m_tn)
        g = tl.sum(tl.where((offs_t == 0)[:, None, None], G, 0.0), axis=0)
    # ∂L/∂h0 = dA_0 · G_0 (no reset at t = 0)
    dt0 = tl.load(dt_ptr + pid_b * s_tb + offs_d * s_td, mask=mask_d, other=0.0)
    tl.store(gh0_ptr + pid_b * D * N + dn, tl.exp(dt0[:, None] * A) * g, mask=mask_dn)
    tl.store(gA_ptr + pid_b * D * N + dn, gA, mask=mask_dn)


def _bn(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, reset, h0):
        b, d, l = u.shape
        n = A.shape[1]
        nc = triton.cdiv(l, CHUNK)
        y = u.new_empty(b, d, l)
        hlast = u.new_empty(b, d, n)
        ckpt = u.new_empty(b, nc, d, n)
        r8 = reset.to(torch.uint8).contiguous() if reset is not None else None
        grid = (b, triton.cdiv(d, BLOCK_D))
        _scan_fwd_kernel[grid](
            u, dt, A, B, C, r8 if r8 is not None else u, h0 if h0 is not None else u, y, hlast, ckpt,
            l, d, n, *u.stride(), *dt.stride(), *B.stride(), *C.stride(),
            HAS_RESET=r8 is not None, HAS_H0=h0 is not None,
            BLOCK_D=BLOCK_D, BLOCK_N=_bn(n), CHUNK=CHUNK, num_warps=NUM_WARPS,
        )
        ctx.save_for_backward(u, dt, A, B, C, r8, ckpt)
        ctx.has_h0 = h0 is not None
        return y, hlast

    @staticmethod
    def backward(ctx, gy, ghlast):
        u, dt, A, B, C, r8, ckpt = ctx.saved_tensors
        b, d, l = u.shape
        n = A.shape[1]
        gy = gy.contiguous() if gy is not None else u.new_zeros(b, d, l)
        ghlast = ghlast.contiguous() if ghlast is not None else None
        gu, gdt = u.new_empty(b, d, l), u.new_empty(b, d, l)
        gA, gh0 = u.new_empty(b, d, n), u.new_empty(b, d, n)
        gB, gC = u.new_zeros(b, l, n), u.new_zeros(b, l, n)
        grid = (b, triton.cdiv(d, BLOCK_D))
        _scan_bwd_kernel[grid](
            u, dt, A, B, C, r8 if r8 is not None else u, ckpt, gy, ghlast if ghlast is not None else u,
            gu, gdt, gA, gB, gC, gh0,
            l, d, n, *u.stride(), *dt.stride(), *B.stride(), *C.stride(),
            HAS_RESET=r8 is not None, HAS_GHLAST=ghlast is not None,
            BLOCK_D=BLOCK_D, BLOCK_N=_bn(n), CHUNK=CHUNK, num_warps=NUM_WARPS_BWD,
        )
        return gu, gdt, gA.sum(0), gB, gC, None, gh0 if ctx.has_h0 else None


def triton_core(u, dt, A, B, C, reset=None, h0=None):
    """Scan core (see scan_cpu.py for the contract) in fp32; B, C (b, l, n) may be strided views."""
    f32 = torch.float32
    u, dt, A, B, C = (t.to(f32) for t in (u, dt, A, B, C))
    h0 = h0.to(f32).contiguous() if h0 is not None else None
    return _TritonScan.apply(u, dt, A.contiguous(), B, C, reset, h0)


# ------------------------------------------------------------------------------------------ decoding
@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    Dm, N, s_sb, s_sd, s_sn, s_xb, s_tb, s_Bb, s_Cb, s_zb, s_ob,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < Dm, offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    sp = state_ptr + pid_b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :] * s_sn
    s = tl.load(sp, mask=mask_dn, other=0.0)
    x = tl.load(x_ptr + pid_b * s_xb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * s_tb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:  # max(x, 0) + log1p(exp(−|x|)), log1p by its series where exp(−|x|) is tiny
        e = tl.exp(-tl.abs(dt))
        dt = tl.maximum(dt, 0.0) + tl.where(e < 1e-3, e * (1.0 - e * (0.5 - e / 3.0)), tl.log(1.0 + e))
    A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b * s_Bb + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * s_Cb + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    s = s * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, s, mask=mask_dn)
    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_zb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(out_ptr + pid_b * s_ob + offs_d, y, mask=mask_d)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True):
    """Contract of scan.selective_state_update: state (b, d, n) fp32 updated in place; returns y (b, d)."""
    b, d, n = state.shape
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    z = z.contiguous() if z is not None else None
    A = A.to(torch.float32).contiguous()
    out = torch.empty(b, d, device=state.device, dtype=torch.float32)
    grid = (b, triton.cdiv(d, 64))
    _state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else A, z if z is not None else x,
        dt_bias if dt_bias is not None else A, out,
        d, n, *state.stride(), x.stride(0), dt.stride(0), B.stride(0), C.stride(0),
        z.stride(0) if z is not None else 0, out.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_D=64, BLOCK_N=_bn(n), num_warps=4,
    )
    return out
