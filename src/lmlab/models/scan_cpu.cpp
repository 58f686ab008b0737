// The `cpu` selective-scan backend (scan_cpu.py builds it with the system C++ compiler at first use and loads it
// with ctypes; its module docstring has the algorithm). Plain C++17 + OpenMP, no torch headers: tensors arrive
// as pointers and strides in `struct Args`, mirrored by scan_cpu._Args.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#ifdef _OPENMP
#include <omp.h>
#endif

// vexp (float: vectorisable, ~2 ulp) comes from vmath.h, which the build puts in front of this file
// softplus(x) = max(x, 0) + log1p(e), e = exp(−|x|) ∈ (0, 1]; log1p(e) = 2 atanh(s), s = e / (2 + e) ≤ 1/3,
// by its odd series to s^11 (error < 1e-7, and relative precision kept for tiny e).
static inline float vsoftplus(float x) {
    const float e = vexp(-std::fabs(x)), s = e / (2.0f + e), s2 = s * s;
    const float p = s2 * (2.0f / 9.0f + s2 * (2.0f / 11.0f));
    return (x > 0.0f ? x : 0.0f) + s * (2.0f + s2 * (2.0f / 3.0f + s2 * (2.0f / 5.0f + s2 * (2.0f / 7.0f + p))));
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
