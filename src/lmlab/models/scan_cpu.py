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

`cpu` (C++/OpenMP, compiled at first use with the system C++ compiler into ~/.cache/lmlab or
$LMLAB_CACHE, loaded with ctypes, no torch headers, ~3 s to build) is the same algorithm fused with
everything around it: Δ bias + softplus, the D skip and the SiLU(z) gate, reading the mixer's
transposed views in place through their strides. One OpenMP work item is one (b, d) channel walking
time with its n states in SIMD registers; the backward recomputes states chunk by chunk (CPU_CHUNK)
from the saved boundary states. Its work item is a batch row and a fixed group of channels
(`backward_groups`), which sums its channels' dB, dC into its own partial buffer; the partials, and
dA, dD, dbias over batch rows, are then reduced in a fixed order. So outputs and gradients are
bitwise the same at any thread count and under any OpenMP schedule. Measured
against `chunked` it is 10–15× faster (docs/benchmarks.md), hence `auto` on CPU. Without a working
compiler it warns once and runs `chunked`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

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
GROUP_ITEMS = 64  # backward work items (batch row × channel group); scratch for dB, dC: 2·b·G·l·n, b·G < 64 + b

_CPP_SRC = r"""
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#ifdef _OPENMP
#include <omp.h>
#endif

// exp for float: Cody-Waite range reduction + degree-6 polynomial (~2 ulp), inlined so the
// per-state loop vectorises; below -87 it returns ~1e-38 instead of 0 (harmless for a decay).
static inline float vexp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float k = std::floor(x * 1.44269504f + 0.5f);
    const float r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
    float p = 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float s;
    std::memcpy(&s, &bits, sizeof(float));
    return p * s;
}
static inline double vexp(double x) { return std::exp(x); }
// softplus(x) = max(x, 0) + log1p(e), e = exp(−|x|) ∈ (0, 1]; log1p(e) = 2 atanh(s), s = e / (2 + e) ≤ 1/3,
// by its odd series to s^11 (error < 1e-7, and relative precision kept for tiny e).
static inline float vsoftplus(float x) {
    const float e = vexp(-std::fabs(x)), s = e / (2.0f + e), s2 = s * s;
    const float p = s2 * (2.0f / 9.0f + s2 * (2.0f / 11.0f));
    return std::fmax(x, 0.0f) + s * (2.0f + s2 * (2.0f / 3.0f + s2 * (2.0f / 5.0f + s2 * (2.0f / 7.0f + p))));
}
static inline double vsoftplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
template <typename T> static inline T vsigmoid(T x) { return T(1) / (T(1) + vexp(-x)); }

// Per-thread scratch, 64-byte aligned: every thread's buffers then have the same alignment, so a
// vectorised loop splits into the same head / body / tail on any thread and rounds the same way.
template <typename T> struct Scratch {
    T* p;
    explicit Scratch(int64_t count)
        : p(static_cast<T*>(::operator new[](sizeof(T) * (count > 0 ? count : 1), std::align_val_t(64)))) {}
    ~Scratch() { ::operator delete[](p, std::align_val_t(64)); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    T* data() const { return p; }
    T& operator[](int64_t i) const { return p[i]; }
};

// Everything one call needs. (b, d, l) inputs and (b, n, l) B, C come with their strides, so the
// transposed views the mixer makes are read in place. Outputs are contiguous. Optional pointers are null.
struct Args {
    const void *u, *delta, *bias, *A, *B, *C, *D, *z, *h0, *gout, *ghlast;
    const uint8_t* reset;                          // (b, l) contiguous
    void *out, *hlast, *ckpt;                      // (b, d, l), (b, d, n), (b, d, nc, n)
    void *gu, *gdelta, *gz, *gh0;                  // (b, d, l) x3, (b, d, n)
    void *gA, *gD, *gbias, *gB, *gC;               // (d, n), (d,), (d,), (b, l, n), (b, l, n)
    void *pA, *pD, *pbias, *pB, *pC;               // scratch: (b, d, n), (b, d), (b, d), (b, G, l, n) x2
    int64_t b, d, l, n, chunk, groups;             // groups: G, channel groups per batch row (backward)
    int64_t su[3], sdt[3], sz[3], sB[3], sC[3];    // strides (elements) of u, delta, z, B, C
    int32_t softplus, nthreads;
};

template <typename T> struct Item {  // per (b, d) channel pointers and scalars
    const T *u, *dt, *z, *B, *C, *A;
    const uint8_t* r;
    int64_t su, sdt, sz, sBl, sBn, sCl, sCn;
    T bias, D;
    Item(const Args& a, int64_t bi, int64_t di) {
        u = (const T*)a.u + bi * a.su[0] + di * a.su[1]; su = a.su[2];
        dt = (const T*)a.delta + bi * a.sdt[0] + di * a.sdt[1]; sdt = a.sdt[2];
        z = a.z ? (const T*)a.z + bi * a.sz[0] + di * a.sz[1] : nullptr; sz = a.sz[2];
        B = (const T*)a.B + bi * a.sB[0]; sBn = a.sB[1]; sBl = a.sB[2];
        C = (const T*)a.C + bi * a.sC[0]; sCn = a.sC[1]; sCl = a.sC[2];
        A = (const T*)a.A + di * a.n;
        r = a.reset ? a.reset + bi * a.l : nullptr;
        bias = a.bias ? ((const T*)a.bias)[di] : T(0);
        D = a.D ? ((const T*)a.D)[di] : T(0);
    }
    // Δ (after bias and softplus) and, with z, SiLU(z) and σ(z) of steps [s, e): gathered first,
    // then transformed in branch-free loops that vectorise
    inline void prepare(int64_t s, int64_t e, int softplus_, T* dtr, T* sig_dt, T* silu, T* sig_z) const {
        const int64_t m = e - s;
        for (int64_t j = 0; j < m; ++j) dtr[j] = dt[(s + j) * sdt] + bias;
        if (sig_dt) {
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) sig_dt[j] = vsigmoid(dtr[j]);
        }
        if (softplus_) {
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) dtr[j] = vsoftplus(dtr[j]);
        }
        if (z) {
            for (int64_t j = 0; j < m; ++j) silu[j] = z[(s + j) * sz];
#pragma omp simd
            for (int64_t j = 0; j < m; ++j) {
                const T sg = vsigmoid(silu[j]);
                if (sig_z) sig_z[j] = sg;
                silu[j] *= sg;
            }
        }
    }
};

template <typename T, int NT>
static void fwd(const Args& a) {
    const int64_t n = NT > 0 ? NT : a.n, l = a.l, d = a.d, chunk = a.chunk;
    const int64_t nc = (l + chunk - 1) / chunk;
    const bool contiguous_n = a.sB[1] == 1 && a.sC[1] == 1;
#pragma omp parallel num_threads(a.nthreads)
    {
        Scratch<T> hv(n), Bv(n), Cv(n), dtr(l), silu(l);
        alignas(64) T hloc[NT > 0 ? NT : 1];  // fixed n: the state lives in registers
        T* __restrict__ h = NT > 0 ? hloc : hv.data();
        // any schedule is exact here: a channel's outputs depend on that channel alone
#pragma omp for schedule(dynamic, 16)
        for (int64_t item = 0; item < a.b * d; ++item) {
            const Item<T> it(a, item / d, item % d);
            T* out = (T*)a.out + item * l;
            T* ck = (T*)a.ckpt + item * nc * n;
            for (int64_t k = 0; k < n; ++k) h[k] = a.h0 ? ((const T*)a.h0)[item * n + k] : T(0);
            it.prepare(0, l, a.softplus, dtr.data(), nullptr, silu.data(), nullptr);
            for (int64_t t = 0; t < l; ++t) {
                if (t % chunk == 0) std::memcpy(ck + (t / chunk) * n, h, n * sizeof(T));
                const T dtv = dtr[t], uv = it.u[t * it.su], du = dtv * uv;
                const T keep = (it.r && it.r[t]) ? T(0) : T(1);
                const T* Bt = it.B + t * it.sBl;
                const T* Ct = it.C + t * it.sCl;
                if (!contiguous_n) {
                    for (int64_t k = 0; k < n; ++k) { Bv[k] = Bt[k * it.sBn]; Cv[k] = Ct[k * it.sCn]; }
                    Bt = Bv.data();
                    Ct = Cv.data();
                }
                T acc = 0;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < n; ++k) {
                    const T hk = vexp(dtv * it.A[k]) * keep * h[k] + du * Bt[k];
                    h[k] = hk;
                    acc += hk * Ct[k];
                }
                const T y = acc + it.D * uv;
                out[t] = it.z ? y * silu[t] : y;
            }
            std::memcpy((T*)a.hlast + item * n, h, n * sizeof(T));
        }
    }
}

// The backward. One work item is one batch row bi and one fixed group of channels [d0, d1): it walks
// them in order, each backwards in time, and adds their dB, dC contributions into the group's own
// (l, n) partial sums. The groups are a function of (b, d) only, never of the thread count, and the
// closing reduction (over groups for dB, dC; over batch rows for dA, dD, dbias) runs in a fixed
// order, so every gradient is the same to the bit whichever thread ran which item, with any number
// of threads.
template <typename T, int NT>
static void bwd(const Args& a) {
    const int64_t n = NT > 0 ? NT : a.n, l = a.l, d = a.d, chunk = a.chunk, G = a.groups;
    const int64_t nc = (l + chunk - 1) / chunk;
    const bool contiguous_n = a.sB[1] == 1 && a.sC[1] == 1;
#pragma omp parallel num_threads(a.nthreads)
    {
        Scratch<T> gv(n), gAv(n), hbv(chunk * n), abv(chunk * n), Bbuf(chunk * n), Cbuf(chunk * n);
        Scratch<T> dtbuf(chunk), ybuf(chunk), sdbuf(chunk), silbuf(chunk), szbuf(chunk);
        alignas(64) T gloc[NT > 0 ? NT : 1];
        alignas(64) T gAloc[NT > 0 ? NT : 1];
        T* __restrict__ g = NT > 0 ? gloc : gv.data();
        T* __restrict__ gAl = NT > 0 ? gAloc : gAv.data();
        T* hbuf = hbv.data();
        T* abuf = abv.data();
#pragma omp for schedule(dynamic, 1)
        for (int64_t work = 0; work < a.b * G; ++work) {
            const int64_t bi = work / G, grp = work % G;
            const int64_t d0 = grp * d / G, d1 = (grp + 1) * d / G;
            T* gBb = (T*)a.pB + work * l * n;  // this group's partial sums, (l, n)
            T* gCb = (T*)a.pC + work * l * n;
            std::memset(gBb, 0, l * n * sizeof(T));
            std::memset(gCb, 0, l * n * sizeof(T));
            for (int64_t di = d0; di < d1; ++di) {
                const int64_t item = bi * d + di;
                const Item<T> it(a, bi, di);
                const T* gout = (const T*)a.gout + item * l;
                T* gu = (T*)a.gu + item * l;
                T* gdelta = (T*)a.gdelta + item * l;
                T* gz = a.z ? (T*)a.gz + item * l : nullptr;
                T gD = 0, gbias = 0;
                for (int64_t k = 0; k < n; ++k) {
                    g[k] = a.ghlast ? ((const T*)a.ghlast)[item * n + k] : T(0);
                    gAl[k] = 0;
                }
                for (int64_t c = nc - 1; c >= 0; --c) {
                    const int64_t s = c * chunk, e = (s + chunk < l) ? s + chunk : l;
                    const T* hc = (const T*)a.ckpt + (item * nc + c) * n;
                    // recompute the chunk: Δ, decays, states and C·h
                    it.prepare(s, e, a.softplus, dtbuf.data(), sdbuf.data(), silbuf.data(), szbuf.data());
                    for (int64_t t = s; t < e; ++t) {
                        const int64_t j = t - s;
                        const T dtv = dtbuf[j], du = dtv * it.u[t * it.su];
                        const T keep = (it.r && it.r[t]) ? T(0) : T(1);
                        T* Bt = Bbuf.data() + j * n;
                        T* Ct = Cbuf.data() + j * n;
                        for (int64_t k = 0; k < n; ++k) {
                            Bt[k] = contiguous_n ? it.B[t * it.sBl + k] : it.B[t * it.sBl + k * it.sBn];
                            Ct[k] = contiguous_n ? it.C[t * it.sCl + k] : it.C[t * it.sCl + k * it.sCn];
                        }
                        const T* hp = j > 0 ? hbuf + (j - 1) * n : hc;
                        T* ht = hbuf + j * n;
                        T* at = abuf + j * n;
                        T acc = 0;
#pragma omp simd reduction(+ : acc)
                        for (int64_t k = 0; k < n; ++k) {
                            const T av = vexp(dtv * it.A[k]) * keep;
                            at[k] = av;
                            const T hk = av * hp[k] + du * Bt[k];
                            ht[k] = hk;
                            acc += hk * Ct[k];
                        }
                        ybuf[j] = acc;
                    }
                    // adjoint, backwards in time
                    for (int64_t t = e - 1; t >= s; --t) {
                        const int64_t j = t - s;
                        const T dtv = dtbuf[j], uv = it.u[t * it.su], du = dtv * uv;
                        T gyt = gout[t];
                        // out = (y + D u) · silu(z),  silu' = σ (1 + z (1 − σ)) = σ + silu (1 − σ)
                        if (it.z) {
                            const T sg = szbuf[j], sl = silbuf[j];
                            gz[t] = gyt * (ybuf[j] + it.D * uv) * (sg + sl * (T(1) - sg));
                            gyt *= sl;
                        }
                        gD += gyt * uv;
                        const T* Bt = Bbuf.data() + j * n;
                        const T* Ct = Cbuf.data() + j * n;
                        const T* hp = j > 0 ? hbuf + (j - 1) * n : hc;
                        const T* ht = hbuf + j * n;
                        const T* at = abuf + j * n;
                        T* gBt = gBb + t * n;
                        T* gCt = gCb + t * n;
                        T sB = 0, sA = 0;
#pragma omp simd reduction(+ : sB, sA)
                        for (int64_t k = 0; k < n; ++k) {
                            const T gk = g[k] + gyt * Ct[k];
                            gCt[k] += gyt * ht[k];
                            sB += gk * Bt[k];
                            gBt[k] += gk * du;
                            const T w = gk * hp[k] * at[k];
                            sA += w * it.A[k];
                            gAl[k] += w * dtv;
                            g[k] = gk * at[k];
                        }
                        T gdt = sA + sB * uv;  // ∂L/∂Δ
                        if (a.softplus) gdt *= sdbuf[j];
                        gdelta[t] = gdt;
                        gbias += gdt;
                        gu[t] = sB * dtv + gyt * it.D;
                    }
                }
                for (int64_t k = 0; k < n; ++k) {
                    ((T*)a.gh0)[item * n + k] = g[k];
                    ((T*)a.pA)[item * n + k] = gAl[k];
                }
                ((T*)a.pD)[item] = gD;
                ((T*)a.pbias)[item] = gbias;
            }
        }
        // fixed-order reductions (the implied barrier above makes every partial sum complete)
#pragma omp for schedule(static)
        for (int64_t row = 0; row < a.b * l; ++row) {  // dB, dC of (bi, t): Σ over groups 0..G-1
            const int64_t bi = row / l, t = row % l;
            T* oB = (T*)a.gB + row * n;
            T* oC = (T*)a.gC + row * n;
            const T* pB = (const T*)a.pB + (bi * G * l + t) * n;
            const T* pC = (const T*)a.pC + (bi * G * l + t) * n;
            for (int64_t k = 0; k < n; ++k) { oB[k] = pB[k]; oC[k] = pC[k]; }
            for (int64_t grp = 1; grp < G; ++grp)
                for (int64_t k = 0; k < n; ++k) { oB[k] += pB[grp * l * n + k]; oC[k] += pC[grp * l * n + k]; }
        }
#pragma omp for schedule(static)
        for (int64_t di = 0; di < d; ++di) {  // dA, dD, dbias of channel di: Σ over batch rows 0..b-1
            T* oA = (T*)a.gA + di * n;
            T oD = 0, obias = 0;
            for (int64_t k = 0; k < n; ++k) oA[k] = 0;
            for (int64_t bi = 0; bi < a.b; ++bi) {
                const T* p = (const T*)a.pA + (bi * d + di) * n;
                for (int64_t k = 0; k < n; ++k) oA[k] += p[k];
                oD += ((const T*)a.pD)[bi * d + di];
                obias += ((const T*)a.pbias)[bi * d + di];
            }
            ((T*)a.gD)[di] = oD;
            ((T*)a.gbias)[di] = obias;
        }
    }
}

// d_state 16 (the Mamba default) gets a fully unrolled kernel; anything else the generic one.
extern "C" void scan_fwd_f32(const Args* a) { if (a->n == 16) fwd<float, 16>(*a); else fwd<float, 0>(*a); }
extern "C" void scan_bwd_f32(const Args* a) { if (a->n == 16) bwd<float, 16>(*a); else bwd<float, 0>(*a); }
extern "C" void scan_fwd_f64(const Args* a) { fwd<double, 0>(*a); }
extern "C" void scan_bwd_f64(const Args* a) { bwd<double, 0>(*a); }
extern "C" int64_t scan_args_size() { return sizeof(Args); }
"""

# Tried in order; the first set that compiles wins. -ffast-math is for compiling only: linked with it,
# GCC < 13 would add crtfastmath.o, which flushes denormals for the whole process at load time.
_FLAG_SETS = (
    (["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"], ["-fopenmp", "-lmvec"]),
    (["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only", "-fopenmp"], ["-fopenmp"]),
    (["-O3", "-ffast-math", "-fno-finite-math-only", "-fopenmp"], ["-fopenmp"]),
    (["-O3"], []),  # no OpenMP (e.g. Apple clang): single-threaded
)
_lib = None
_lib_error: str | None = None
_lock = threading.Lock()


def _cache_dir() -> Path:
    root = os.environ.get("LMLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmlab")
    return Path(root) / "scan_cpu"


def _cpu_fingerprint() -> str:
    """The flags line of /proc/cpuinfo (what -march=native depends on), else the platform string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.platform() + platform.processor()


def _compile() -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for cflags, lflags in _FLAG_SETS:
        tag = " ".join(cflags + lflags)
        key = hashlib.sha256("\n".join([_CPP_SRC, cxx, tag, _cpu_fingerprint()]).encode())
        so = out_dir / f"scan_{key.hexdigest()[:16]}.so"
        if not so.exists():
            with tempfile.TemporaryDirectory() as tmp:
                src, obj, tmp_so = Path(tmp) / "scan.cpp", Path(tmp) / "scan.o", Path(tmp) / "scan.so"
                src.write_text(_CPP_SRC)
                for cmd in ([cxx, *cflags, "-std=c++17", "-fPIC", "-c", str(src), "-o", str(obj)],
                            [cxx, "-shared", str(obj), "-o", str(tmp_so), *lflags]):
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode != 0:
                        errors.append(f"{tag}: {res.stderr.strip()[:300]}")
                        break
                else:
                    part = so.with_suffix(f".{os.getpid()}.part")
                    shutil.copyfile(tmp_so, part)
                    os.replace(part, so)  # atomic: concurrent builders never see half a file
            if not so.exists():
                continue
        try:
            return ctypes.CDLL(str(so))
        except OSError as e:
            errors.append(f"{tag}: {e}")
    raise RuntimeError("could not build the C++ scan: " + " | ".join(errors))


def cpu_kernel_available() -> bool:
    """Build (once, cached on disk) and load the C++ scan; False, with one warning, if that fails."""
    global _lib, _lib_error
    if _lib is not None:
        return True
    if _lib_error is not None:
        return False
    with _lock:
        if _lib is None and _lib_error is None:
            if os.environ.get("LMLAB_DISABLE_CPP_SCAN"):
                _lib_error = "disabled by LMLAB_DISABLE_CPP_SCAN"
            else:
                try:
                    _lib = _compile()
                except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                    _lib_error = str(e)
            if _lib_error is not None:
                warnings.warn(f"lmlab: C++ selective scan unavailable ({_lib_error}); using the slower "
                              "pure-torch 'chunked' scan", RuntimeWarning, stacklevel=3)
    return _lib is not None


class _Args(ctypes.Structure):
    """Mirror of `struct Args` in the C++ source."""

    _fields_ = ([(name, ctypes.c_void_p) for name in
                 ("u", "delta", "bias", "A", "B", "C", "D", "z", "h0", "gout", "ghlast", "reset",
                  "out", "hlast", "ckpt", "gu", "gdelta", "gz", "gh0", "gA", "gD", "gbias", "gB", "gC",
                  "pA", "pD", "pbias", "pB", "pC")]
                + [(name, ctypes.c_int64) for name in ("b", "d", "l", "n", "chunk", "groups")]
                + [(name, ctypes.c_int64 * 3) for name in ("su", "sdt", "sz", "sB", "sC")]
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
    fn = getattr(_lib, f"scan_{kind}_{'f64' if dtype == torch.float64 else 'f32'}")
    fn(ctypes.byref(a))


def backward_groups(b: int, d: int) -> int:
    """Channel groups per batch row in the backward: about GROUP_ITEMS work items in all, whatever the
    thread count (the rounding of dB, dC depends on the groups, so they must not depend on threads)."""
    return max(1, min(d, -(-GROUP_ITEMS // b)))


class _CppScan(torch.autograd.Function):
    """The whole selective scan in two C++ calls: Δ bias + softplus, recurrence, D skip and SiLU(z) gate."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, h0, reset, softplus, chunk):
        b, d, l = u.shape
        n = A.shape[1]
        nc = (l + chunk - 1) // chunk
        out, hlast, ckpt = u.new_empty(b, d, l), u.new_empty(b, d, n), u.new_empty(b, d, nc, n)
        r8 = reset.to(torch.uint8).contiguous() if reset is not None else None
        a = _args(u=u, delta=delta, bias=bias, A=A, B=B, C=C, D=D, z=z, h0=h0, reset=r8, out=out, hlast=hlast,
                  ckpt=ckpt, b=b, d=d, l=l, n=n, chunk=chunk, softplus=int(softplus),
                  nthreads=torch.get_num_threads())
        a.su, a.sdt, a.sz, a.sB, a.sC = (_strides(t) for t in (u, delta, z, B, C))
        _call("fwd", u.dtype, a)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, r8, ckpt)
        ctx.softplus, ctx.chunk, ctx.has_h0 = softplus, chunk, h0 is not None
        return out, hlast

    @staticmethod
    def backward(ctx, gout, ghlast):
        u, delta, A, B, C, D, z, bias, r8, ckpt = ctx.saved_tensors
        b, d, l = u.shape
        n = A.shape[1]
        groups = backward_groups(b, d)
        gout = gout.contiguous() if gout is not None else u.new_zeros(b, d, l)
        ghlast = ghlast.contiguous() if ghlast is not None else None
        gu, gdelta = u.new_empty(b, d, l), u.new_empty(b, d, l)
        gz = u.new_empty(b, d, l) if z is not None else None
        gh0, gA, gD, gbias = u.new_empty(b, d, n), u.new_empty(d, n), u.new_empty(d), u.new_empty(d)
        gB, gC = u.new_empty(b, l, n), u.new_empty(b, l, n)
        # partial sums the kernel reduces in a fixed order: per batch row (dA, dD, dbias), per group (dB, dC)
        pA, pD, pbias = u.new_empty(b, d, n), u.new_empty(b, d), u.new_empty(b, d)
        pB, pC = u.new_empty(b, groups, l, n), u.new_empty(b, groups, l, n)
        a = _args(u=u, delta=delta, bias=bias, A=A, B=B, C=C, D=D, z=z, reset=r8, ckpt=ckpt, gout=gout,
                  ghlast=ghlast, gu=gu, gdelta=gdelta, gz=gz, gh0=gh0, gA=gA, gD=gD, gbias=gbias, gB=gB, gC=gC,
                  pA=pA, pD=pD, pbias=pbias, pB=pB, pC=pC, b=b, d=d, l=l, n=n, chunk=ctx.chunk, groups=groups,
                  softplus=int(ctx.softplus), nthreads=torch.get_num_threads())
        a.su, a.sdt, a.sz, a.sB, a.sC = (_strides(t) for t in (u, delta, z, B, C))
        _call("bwd", u.dtype, a)
        return (gu, gdelta, gA, gB.transpose(1, 2), gC.transpose(1, 2), gD if D is not None else None, gz,
                gbias if bias is not None else None, gh0 if ctx.has_h0 else None, None, None, None)


def fused_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, reset=None,
               initial_state=None, chunk: int = CPU_CHUNK):
    """The `cpu` backend's scan: (y, h_last) for CPU tensors; `reset` (b, l) bool as from `scan.reset_mask`.

    Needs `cpu_kernel_available()`; `scan.selective_scan` falls back to `chunked` when it is not.
    """
    if u.device.type != "cpu":
        raise ValueError(f"the C++ scan needs CPU tensors, got {u.device}")
    dtype_in = u.dtype
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, B, C = (t.to(cdt) for t in (u, delta, B, C))
    A = A.to(cdt).contiguous()
    D, bias, h0 = (t.to(cdt).contiguous() if t is not None else None for t in (D, delta_bias, initial_state))
    z = z.to(cdt) if z is not None else None
    out, last = _CppScan.apply(u, delta, A, B, C, D, z, bias, h0, reset, delta_softplus, chunk)
    return out.to(dtype_in), last
