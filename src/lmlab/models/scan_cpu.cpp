// The `cpu` selective-scan backend (scan_cpu.py builds it with the system C++ compiler at first use and loads it
// with ctypes; its module docstring has the algorithm). Plain C++17 + OpenMP, no torch headers: tensors arrive
// as pointers and strides in `struct Args`, mirrored by scan_cpu._Args.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
// 16-lane blocks on AVX-512 (below): GCC must then vectorise the lane loops 16 wide, not as two 8-wide halves
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
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

#if defined(__AVX512F__)
#define LMLAB_SCAN_AVX512 1
// 2^x of 16 floats: x = k + f with k an integer and |f| ≤ 1/2, 2^f by a degree-6 polynomial (Cephes' exp2f, relative
// error < 2.5e-7), the power of two applied by vscalefps. The state loops take their decays exp(Δ·A) as 2^(Δ·log2(e)·A)
// with Δ·log2(e) formed once a step: no range reduction by ln 2 per state, 11 operations in place of vexp16's 15.
static inline __m512 vexp2_16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-150.0f), x));  // NaN stays NaN
    const __m512 k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, k);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.535336188319500e-4f), f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    return _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f)), k);
}
// 1/x of 16 floats x in [1, 3]: the 14-bit reciprocal and one Newton step (within 2 ulp), a third of vdivps's time
static inline __m512 vrcp16(__m512 x) {
    const __m512 r = _mm512_rcp14_ps(x);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.0f)));
}
// σ(x) and softplus(x) of 16 floats, both from e = exp(−|x|) ∈ (0, 1] (so no denominator leaves [1, 3]):
// σ(x) = 1 / (1 + e) for x ≥ 0, e / (1 + e) below; softplus as vsoftplus. vsigmoid16 is σ alone.
static inline __m512 vsigmoid_e(__m512 x, __m512 e) {
    const __m512 r = vrcp16(_mm512_add_ps(_mm512_set1_ps(1.0f), e));
    return _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), r, e);
}
static inline __m512 vexp_neg_abs16(__m512 x) { return vexp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x))); }
static inline __m512 vsigmoid16(__m512 x) { return vsigmoid_e(x, vexp_neg_abs16(x)); }
static inline __m512 vsoftplus_e(__m512 x, __m512 e) {
    const __m512 s = _mm512_mul_ps(e, vrcp16(_mm512_add_ps(_mm512_set1_ps(2.0f), e))), s2 = _mm512_mul_ps(s, s);
    __m512 p = _mm512_fmadd_ps(s2, _mm512_set1_ps(2.0f / 11.0f), _mm512_set1_ps(2.0f / 9.0f));
    p = _mm512_fmadd_ps(s2, p, _mm512_set1_ps(2.0f / 7.0f));
    p = _mm512_fmadd_ps(s2, p, _mm512_set1_ps(2.0f / 5.0f));
    p = _mm512_fmadd_ps(s2, p, _mm512_set1_ps(2.0f / 3.0f));
    p = _mm512_fmadd_ps(s2, p, _mm512_set1_ps(2.0f));
    return _mm512_fmadd_ps(s, p, _mm512_max_ps(x, _mm512_setzero_ps()));
}
#endif

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

// Everything one call needs. Inputs come as (b, d, l) / (b, n, l) with their strides, so the mixer's transposed
// views of its (b, l, ·) rows are read in place. The per-element tensors (u, Δ, z, B, C, the output gradient,
// and out, du, dΔ, dz, dB, dC) are stored in the "storage" type (float, double or bf16); everything else — A, D,
// the Δ bias, the states, the parameter gradients, checkpoints and partial sums — in the compute type (float,
// or double for double). Outputs are written as (b, l, d) / (b, l, n) rows. Optional pointers are null.
struct Args {
    const void *u, *delta, *bias, *A, *B, *C, *D, *z, *h0, *gout, *ghlast;
    const uint8_t* reset;                          // (b, l) contiguous
    void *out, *hlast, *ckpt;                      // (b, l, d), (b, d, n), (b, nb, nc, n, W)
    void *gu, *gdelta, *gz, *gh0;                  // (b, l, d) x3, (b, d, n)
    void *gA, *gD, *gbias, *gB, *gC;               // (d, n), (d,), (d,), (b, l, n), (b, l, n)
    void *pA, *pD, *pbias, *pB, *pC;               // scratch: (b, d, n), (b, d), (b, d), (b, G, l, n) x2
    int64_t b, d, l, n, chunk, groups;             // groups: G, channel-block groups per batch row (backward)
    int64_t su[3], sdt[3], sz[3], sB[3], sC[3], sgo[3];  // strides (elements) of u, delta, z, B, C, gout
    int32_t softplus, nthreads;
};

// Channels per block: the kernels walk time for W channels at once, one SIMD lane a channel, so a step's Δ, u, z
// and output are contiguous loads and stores in the (b, l, d) layout and the sum over states is a plain add per
// lane. W is one vector register of floats: 16 with AVX-512 (the state loops then in intrinsics, with vexp16),
// else 8; scan_lanes() tells the Python side. The last block of a row may be short: its missing lanes read zeros
// (u = 0, output gradient = 0, state = 0), which keeps them zero and out of every sum.
#ifdef LMLAB_SCAN_AVX512
constexpr int64_t W = 16;
#else
constexpr int64_t W = 8;
#endif

#if defined(__AVX2__)
// 8 bf16 (their uint16 bits) → 8 floats in one register, stored at dst
static inline void widen8(float* __restrict dst, const uint16_t* __restrict p) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    _mm256_storeu_ps(dst, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
}
#endif
// outputs of at least this many bytes per array are written with non-temporal stores (put_row); smaller ones stay in
// the caches for the next operation
constexpr int64_t STREAM_BYTES = int64_t(1) << 20;
// steps ahead that the kernels prefetch their per-step rows of u, Δ, z and the output gradient: a step's rows are
// a row stride apart (1 KiB and more), a pattern the hardware prefetchers do not follow
constexpr int64_t PREFETCH = 8;

template <typename T, typename S>
static inline void gather(T* __restrict dst, const S* __restrict p, int64_t stride, int64_t w) {
    if (w == W && stride == 1) {
        // W bf16 → W floats, and W floats, as one register: the compiler's own versions widen in halves stored
        // separately, or copy through 64-bit integer moves, and the vector load that reads them back stalls on
        // store forwarding
#if defined(LMLAB_SCAN_AVX512)
        constexpr bool f32_or_bf16 = std::is_same_v<S, uint16_t> || std::is_same_v<S, float>;
        if constexpr (f32_or_bf16 && std::is_same_v<T, float> && W == 16) {
            _mm512_storeu_ps(dst, load16(p));
            return;
        }
#elif defined(__AVX2__)
        if constexpr (std::is_same_v<S, uint16_t> && std::is_same_v<T, float> && W == 8) {
            widen8(dst, p);
            return;
        }
        if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float> && W == 8) {
            _mm256_storeu_ps(dst, _mm256_loadu_ps(p));
            return;
        }
#endif
#pragma omp simd
        for (int64_t c = 0; c < W; ++c) dst[c] = load(p, c);
    } else {
        for (int64_t c = 0; c < W; ++c) dst[c] = c < w ? load(p, c * stride) : T(0);
    }
}

template <typename T, typename S>
static inline void scatter(S* __restrict p, const T* __restrict src, int64_t w) {
    if (w == W) {
#pragma omp simd
        for (int64_t c = 0; c < W; ++c) store(p, c, src[c]);
    } else {
        for (int64_t c = 0; c < w; ++c) store(p, c, src[c]);
    }
}

// w values of a row into storage S at p. With `stream` and p 64-byte aligned, whole cache lines (16 floats, or 32
// bf16) go out as non-temporal stores: the backward's dΔ, du, dz are (b, l, d) arrays larger than the caches, written
// a few lines a step, and a plain store would first read each line from memory.
template <typename T, typename S>
static inline void put_row(S* __restrict p, const T* __restrict src, int64_t w, bool stream) {
    int64_t c = 0;
#ifdef LMLAB_SCAN_AVX512
    if (stream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
        if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
            for (; c + 16 <= w; c += 16) _mm512_stream_ps(p + c, _mm512_loadu_ps(src + c));
        } else if constexpr (std::is_same_v<S, uint16_t> && std::is_same_v<T, float>) {
            for (; c + 32 <= w; c += 32) {
                const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16(_mm512_loadu_ps(src + c))),
                                                        bf16x16(_mm512_loadu_ps(src + c + 16)), 1);
                _mm512_stream_si512(reinterpret_cast<__m512i*>(p + c), line);
            }
        }
    }
#endif
    for (; c < w; ++c) store(p, c, src[c]);
}

// n values p[0], p[stride], … of one time step (a step's B or C) into floats, so the hot loops broadcast them from
// memory; a contiguous bf16 row is widened 8 at a time instead of one scalar conversion per use
template <typename T, typename S>
static inline void row_in(T* __restrict dst, const S* __restrict p, int64_t stride, int64_t n) {
    int64_t k = 0;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<S, uint16_t> && std::is_same_v<T, float>) {
        if (stride == 1)
            for (; k + 8 <= n; k += 8) widen8(dst + k, p + k);
    }
#endif
    for (; k < n; ++k) dst[k] = load(p, k * stride);
}

// (channel, n) values of channels [d0, d0 + w) ↔ lanes [k · W + c]
template <typename T>
static inline void state_in(T* __restrict dst, const T* src, int64_t n, int64_t w) {
    for (int64_t k = 0; k < n; ++k)
        for (int64_t c = 0; c < W; ++c) dst[k * W + c] = (src && c < w) ? src[c * n + k] : T(0);
}
template <typename T>
static inline void state_out(T* dst, const T* __restrict src, int64_t n, int64_t w) {
    for (int64_t k = 0; k < n; ++k)
        for (int64_t c = 0; c < w; ++c) dst[c * n + k] = src[k * W + c];
}

// One step of a block's recurrence over its n states and W lanes: a = exp(Δ·A), h = a·h_prev + Δu·B, and
// y = Σ_k h·C written to y. The forward passes its state as both h_prev and h (updated in place; a document start
// has zeroed it); the backward's recomputation (KEEP) writes the states and the decays a · keep to its chunk
// buffers, keep being 0 at a document start.
template <bool KEEP, typename T>
static inline void advance(int64_t n, const T* __restrict dtv, const T* __restrict du, const T* __restrict Al,
                           const T* hp, T* h, T* __restrict decay, T keep, const T* __restrict Bk,
                           const T* __restrict Ck, T* __restrict y) {
#ifdef LMLAB_SCAN_AVX512
    if constexpr (std::is_same_v<T, float> && W == 16) {
        const __m512 dq = _mm512_mul_ps(_mm512_load_ps(dtv), _mm512_set1_ps(1.44269504088896341f));  // Δ·log2(e)
        const __m512 uq = _mm512_load_ps(du);
        __m512 yq = _mm512_setzero_ps();
        for (int64_t k = 0; k < n; ++k) {
            __m512 av = vexp2_16(_mm512_mul_ps(dq, _mm512_load_ps(Al + k * W)));  // exp(Δ·A)
            if constexpr (KEEP) {
                av = _mm512_mul_ps(av, _mm512_set1_ps(keep));
                _mm512_store_ps(decay + k * W, av);
            }
            const __m512 v = _mm512_fmadd_ps(av, _mm512_loadu_ps(hp + k * W), _mm512_mul_ps(uq, _mm512_set1_ps(Bk[k])));
            _mm512_store_ps(h + k * W, v);
            yq = _mm512_fmadd_ps(v, _mm512_set1_ps(Ck[k]), yq);
        }
        _mm512_store_ps(y, yq);
        return;
    }
#endif
    for (int64_t c = 0; c < W; ++c) y[c] = 0;
    for (int64_t k = 0; k < n; ++k) {
        const T bk = Bk[k], ckv = Ck[k];
        const T* __restrict Ak = Al + k * W;
        const T* hpk = hp + k * W;
        T* hk = h + k * W;
#pragma omp simd
        for (int64_t c = 0; c < W; ++c) {
            T v;
            if constexpr (KEEP) {
                const T av = vexp(dtv[c] * Ak[c]) * keep;
                decay[k * W + c] = av;
                v = av * hpk[c] + du[c] * bk;
            } else {
                v = vexp(dtv[c] * Ak[c]) * hpk[c] + du[c] * bk;
            }
            hk[c] = v;
            y[c] += v * ckv;
        }
    }
}

#ifdef LMLAB_SCAN_AVX512
// the lane sums of 16 consecutive 16-float vectors p[16k .. 16k + 15], k = 0..15, as one vector (lane k: the sum of
// vector k) by a transposing add tree: 15 vector adds in place of 16 horizontal sums, each sum in the order GCC's own
// horizontal sum takes (halves, then quarters, pairs, lanes: the same bits as the loop below, checked with GCC 12)
static inline __m512 lanesum16(const float* p) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i) {  // halves: lanes 0-7 vector 2i, lanes 8-15 vector 2i+1
        const __m512 x = _mm512_loadu_ps(p + 32 * i), y = _mm512_loadu_ps(p + 32 * i + 16);
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int i = 0; i < 4; ++i)  // quarters: 128-bit lane q holds vector 4i + q
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; ++i)  // 128-bit lane q: [vector 8i + q] × 2, [vector 8i + 4 + q] × 2
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
    // 128-bit lane q: vectors q, 4 + q, 8 + q, 12 + q
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, r);
}
#endif

template <typename T, typename S>
struct Lanes {  // batch row bi, channels [d0, d0 + w): the per-step inputs
    const Args& a;
    int64_t bi, d0, w;
    const S *u, *dt, *z;
    alignas(64) T bias[W], D[W];
    Lanes(const Args& a_, int64_t bi_, int64_t d0_, int64_t w_) : a(a_), bi(bi_), d0(d0_), w(w_) {
        u = (const S*)a.u + bi * a.su[0] + d0 * a.su[1];
        dt = (const S*)a.delta + bi * a.sdt[0] + d0 * a.sdt[1];
        z = a.z ? (const S*)a.z + bi * a.sz[0] + d0 * a.sz[1] : nullptr;
        for (int64_t c = 0; c < W; ++c) {
            bias[c] = (a.bias && c < w) ? ((const T*)a.bias)[d0 + c] : T(0);
            D[c] = (a.D && c < w) ? ((const T*)a.D)[d0 + c] : T(0);
        }
    }
    // step t: Δ (bias added, softplus-ed), σ(Δ + bias) if sdt, u, and with z SiLU(z) and σ(z) if sz
    inline void step(int64_t t, T* __restrict dtv, T* __restrict sdt, T* __restrict uv, T* __restrict sil,
                     T* __restrict sz) const {
        if (t + PREFETCH < a.l) {
            __builtin_prefetch(dt + (t + PREFETCH) * a.sdt[2]);
            __builtin_prefetch(u + (t + PREFETCH) * a.su[2]);
            if (z) __builtin_prefetch(z + (t + PREFETCH) * a.sz[2]);
        }
        gather(dtv, dt + t * a.sdt[2], a.sdt[1], w);
#ifdef LMLAB_SCAN_AVX512
        if constexpr (std::is_same_v<T, float> && W == 16) {  // the loops below, in intrinsics
            const __m512 x = _mm512_add_ps(_mm512_load_ps(dtv), _mm512_load_ps(bias));
            if (a.softplus) {
                const __m512 e = vexp_neg_abs16(x);
                if (sdt) _mm512_store_ps(sdt, vsigmoid_e(x, e));
                _mm512_store_ps(dtv, vsoftplus_e(x, e));
            } else {
                if (sdt) _mm512_store_ps(sdt, vsigmoid16(x));
                _mm512_store_ps(dtv, x);
            }
            gather(uv, u + t * a.su[2], a.su[1], w);
            if (z) {
                alignas(64) T zv[W];
                gather(zv, z + t * a.sz[2], a.sz[1], w);
                const __m512 zq = _mm512_load_ps(zv), sg = vsigmoid16(zq);
                _mm512_store_ps(sil, _mm512_mul_ps(zq, sg));
                if (sz) _mm512_store_ps(sz, sg);
            }
            return;
        }
#endif
#pragma omp simd
        for (int64_t c = 0; c < W; ++c) dtv[c] += bias[c];
        if (sdt) {
#pragma omp simd
            for (int64_t c = 0; c < W; ++c) sdt[c] = vsigmoid(dtv[c]);
        }
        if (a.softplus) {
#pragma omp simd
            for (int64_t c = 0; c < W; ++c) dtv[c] = vsoftplus(dtv[c]);
        }
        gather(uv, u + t * a.su[2], a.su[1], w);
        if (z) {
            // z read into its own array and σ(z) written apart from SiLU(z): GCC vectorises these loops only so
            alignas(64) T zv[W], sg[W];
            gather(zv, z + t * a.sz[2], a.sz[1], w);
#pragma omp simd
            for (int64_t c = 0; c < W; ++c) sg[c] = vsigmoid(zv[c]);
#pragma omp simd
            for (int64_t c = 0; c < W; ++c) sil[c] = zv[c] * sg[c];
            if (sz) std::memcpy(sz, sg, sizeof(sg));
        }
    }
};

template <typename T, typename S, int NT>
static void fwd(const Args& a) {
    const int64_t n = NT > 0 ? NT : a.n, l = a.l, d = a.d, chunk = a.chunk;
    const int64_t nc = (l + chunk - 1) / chunk, nb = (d + W - 1) / W;
#pragma omp parallel num_threads(a.nthreads)
    {
        Scratch<T> hs(n * W), As(n * W), Bs(n), Cs(n);
        // any schedule is exact here: a channel's outputs depend on that channel alone
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < a.b * nb; ++item) {
            const int64_t bi = item / nb, d0 = (item % nb) * W, w = d - d0 < W ? d - d0 : W;
            const Lanes<T, S> in(a, bi, d0, w);
            T* __restrict h = hs.data();
            T* __restrict Al = As.data();
            state_in(Al, (const T*)a.A + d0 * n, n, w);
            state_in(h, a.h0 ? (const T*)a.h0 + (bi * d + d0) * n : nullptr, n, w);
            T* ck = (T*)a.ckpt + item * nc * n * W;
            S* out = (S*)a.out + bi * l * d + d0;
            const S* Bb = (const S*)a.B + bi * a.sB[0];
            const S* Cb = (const S*)a.C + bi * a.sC[0];
            alignas(64) T dtv[W], uv[W], sil[W], du[W], y[W];
            for (int64_t t = 0, next = 0; t < l; ++t) {
                if (t == next) {  // a chunk boundary (a counter: t % chunk would divide at every step)
                    std::memcpy(ck + (t / chunk) * n * W, h, n * W * sizeof(T));
                    next += chunk;
                }
                in.step(t, dtv, nullptr, uv, sil, nullptr);
                if (a.reset && a.reset[bi * l + t]) std::memset(h, 0, n * W * sizeof(T));  // a new document
#pragma omp simd
                for (int64_t c = 0; c < W; ++c) du[c] = dtv[c] * uv[c];
                row_in(Bs.data(), Bb + t * a.sB[2], a.sB[1], n);
                row_in(Cs.data(), Cb + t * a.sC[2], a.sC[1], n);
                advance<false>(n, dtv, du, Al, h, h, static_cast<T*>(nullptr), T(1), Bs.data(), Cs.data(), y);
                if (in.z) {
#pragma omp simd
                    for (int64_t c = 0; c < W; ++c) y[c] = (y[c] + in.D[c] * uv[c]) * sil[c];
                } else {
#pragma omp simd
                    for (int64_t c = 0; c < W; ++c) y[c] += in.D[c] * uv[c];
                }
                scatter(out + t * d, y, w);
            }
            state_out((T*)a.hlast + (bi * d + d0) * n, h, n, w);
        }
    }
}

// The backward. One work item is one batch row and a fixed group of channel blocks. It walks time backwards a
// chunk at a time; inside a chunk it takes its blocks in order, recomputes each block's states from the saved
// boundary state and runs the adjoint recurrence (each block's ∂L/∂h is carried from chunk to chunk), adding the
// blocks' dB, dC contributions lane by lane into one (chunk, n, W) buffer, whose lanes are then summed into the
// group's own (l, n) partial sums. The groups are a function of (b, d) only, never of the thread count, and the
// closing reduction (over groups for dB, dC; over batch rows for dA, dD, dbias) runs in a fixed order, so every
// gradient is the same to the bit whichever thread ran which item, with any number of threads.
template <typename T, typename S, int NT>
static void bwd(const Args& a) {
    const int64_t n = NT > 0 ? NT : a.n, l = a.l, d = a.d, chunk = a.chunk, G = a.groups;
    const int64_t nc = (l + chunk - 1) / chunk, nb = (d + W - 1) / W, per = (nb + G - 1) / G;
    const int64_t nw = n * W;
    const bool stream = a.b * l * d * int64_t(sizeof(S)) >= STREAM_BYTES;
#pragma omp parallel num_threads(a.nthreads)
    {
        Scratch<T> hbuf(chunk * nw), abuf(chunk * nw), PB(chunk * nw), PC(chunk * nw), As(nw);
        Scratch<T> dtb(chunk * W), sdb(chunk * W), ub(chunk * W), silb(chunk * W), szb(chunk * W), yb(chunk * W);
        Scratch<T> gcar(per * nw), gAcar(per * nw), gDcar(per * W), gbcar(per * W);
        Scratch<T> Bcs(chunk * n), Ccs(chunk * n);  // the chunk's B, C rows as floats, shared by the group's blocks
        Scratch<T> stz(chunk * per * W), stdt(chunk * per * W), stu(chunk * per * W);  // the chunk's dz, dΔ, du
        T* __restrict Al = As.data();
#pragma omp for schedule(dynamic, 1)
        for (int64_t work = 0; work < a.b * G; ++work) {
            const int64_t bi = work / G, grp = work % G;
            const int64_t k0 = grp * nb / G, k1 = (grp + 1) * nb / G;
            if (k0 == k1) {  // no block (more groups than blocks): its partial sums are zeros
                std::memset((T*)a.pB + work * l * n, 0, l * n * sizeof(T));
                std::memset((T*)a.pC + work * l * n, 0, l * n * sizeof(T));
                continue;
            }
            const S* Bb = (const S*)a.B + bi * a.sB[0];
            const S* Cb = (const S*)a.C + bi * a.sC[0];
            for (int64_t blk = k0; blk < k1; ++blk) {
                const int64_t d0 = blk * W, w = d - d0 < W ? d - d0 : W, o = blk - k0;
                state_in(gcar.data() + o * nw, a.ghlast ? (const T*)a.ghlast + (bi * d + d0) * n : nullptr, n, w);
                std::memset(gAcar.data() + o * nw, 0, nw * sizeof(T));
                std::memset(gDcar.data() + o * W, 0, W * sizeof(T));
                std::memset(gbcar.data() + o * W, 0, W * sizeof(T));
            }
            T* gBb = (T*)a.pB + work * l * n;  // this group's partial sums, (l, n)
            T* gCb = (T*)a.pC + work * l * n;
            for (int64_t c = nc - 1; c >= 0; --c) {
                const int64_t s = c * chunk, e = (s + chunk < l) ? s + chunk : l, m = e - s;
                for (int64_t j = 0; j < m; ++j) {
                    row_in(Bcs.data() + j * n, Bb + (s + j) * a.sB[2], a.sB[1], n);
                    row_in(Ccs.data() + j * n, Cb + (s + j) * a.sC[2], a.sC[1], n);
                }
                for (int64_t blk = k0; blk < k1; ++blk) {
                    const int64_t d0 = blk * W, w = d - d0 < W ? d - d0 : W, o = blk - k0;
                    const Lanes<T, S> in(a, bi, d0, w);
                    const bool first = blk == k0;  // the group's first block: its dB, dC terms start PB, PC
                    state_in(Al, (const T*)a.A + d0 * n, n, w);
                    T* __restrict g = gcar.data() + o * nw;
                    T* __restrict gAl = gAcar.data() + o * nw;
                    T* __restrict gD = gDcar.data() + o * W;
                    T* __restrict gbias = gbcar.data() + o * W;
                    const T* hc = (const T*)a.ckpt + ((bi * nb + blk) * nc + c) * nw;
                    // recompute the chunk: Δ, decays, states and C·h
                    for (int64_t j = 0; j < m; ++j) {
                        const int64_t t = s + j;
                        T* __restrict dtv = dtb.data() + j * W;
                        T* __restrict uv = ub.data() + j * W;
                        in.step(t, dtv, a.softplus ? sdb.data() + j * W : nullptr, uv, silb.data() + j * W,
                                szb.data() + j * W);
                        const T keep = (a.reset && a.reset[bi * l + t]) ? T(0) : T(1);
                        alignas(64) T du[W];
                        T* __restrict y = yb.data() + j * W;
#pragma omp simd
                        for (int64_t cc = 0; cc < W; ++cc) du[cc] = dtv[cc] * uv[cc];
                        const T* hp = j > 0 ? hbuf.data() + (j - 1) * nw : hc;
                        advance<true>(n, dtv, du, Al, hp, hbuf.data() + j * nw, abuf.data() + j * nw, keep,
                                      Bcs.data() + j * n, Ccs.data() + j * n, y);
                    }
                    // adjoint, backwards in time
                    for (int64_t j = m - 1; j >= 0; --j) {
                        const int64_t t = s + j;
                        const T* __restrict dtv = dtb.data() + j * W;
                        const T* __restrict uv = ub.data() + j * W;
                        alignas(64) T gy[W], du[W], sB[W], sA[W], gdt[W], gu[W];
                        if (a.gout) {
                            const S* go = (const S*)a.gout + bi * a.sgo[0] + d0 * a.sgo[1];
                            if (t >= PREFETCH) __builtin_prefetch(go + (t - PREFETCH) * a.sgo[2]);  // walking back
                            gather(gy, go + t * a.sgo[2], a.sgo[1], w);
                        } else {
                            for (int64_t cc = 0; cc < W; ++cc) gy[cc] = 0;
                        }
                        // out = (y + D u) · silu(z),  silu' = σ (1 + z (1 − σ)) = σ + silu (1 − σ)
                        if (in.z) {
                            const T* __restrict sg = szb.data() + j * W;
                            const T* __restrict sl = silb.data() + j * W;
                            const T* __restrict y = yb.data() + j * W;
                            alignas(64) T gz[W];
#pragma omp simd
                            for (int64_t cc = 0; cc < W; ++cc) {
                                gz[cc] = gy[cc] * (y[cc] + in.D[cc] * uv[cc]) * (sg[cc] + sl[cc] * (T(1) - sg[cc]));
                                gy[cc] *= sl[cc];
                            }
                            std::memcpy(stz.data() + (j * per + o) * W, gz, sizeof(gz));
                        }
#pragma omp simd
                        for (int64_t cc = 0; cc < W; ++cc) {
                            gD[cc] += gy[cc] * uv[cc];
                            du[cc] = dtv[cc] * uv[cc];
                            sB[cc] = 0;
                            sA[cc] = 0;
                        }
                        const T* hp = j > 0 ? hbuf.data() + (j - 1) * nw : hc;
                        for (int64_t k = 0; k < n; ++k) {
                            const T bk = Bcs[j * n + k], ckv = Ccs[j * n + k];
                            const T* __restrict Ak = Al + k * W;
                            const T* __restrict hpk = hp + k * W;
                            const T* __restrict ak = abuf.data() + j * nw + k * W;
                            const T* __restrict hk = hbuf.data() + j * nw + k * W;
                            T* __restrict pb = PB.data() + j * nw + k * W;
                            T* __restrict pc = PC.data() + j * nw + k * W;
                            T* __restrict gk_ = g + k * W;
                            T* __restrict gAk = gAl + k * W;
#pragma omp simd
                            for (int64_t cc = 0; cc < W; ++cc) {
                                const T gk = gk_[cc] + gy[cc] * ckv;
                                pc[cc] = first ? gy[cc] * hk[cc] : pc[cc] + gy[cc] * hk[cc];
                                sB[cc] += gk * bk;
                                pb[cc] = first ? gk * du[cc] : pb[cc] + gk * du[cc];
                                const T wv = gk * hpk[cc] * ak[cc];
                                sA[cc] += wv * Ak[cc];
                                gAk[cc] += wv * dtv[cc];
                                gk_[cc] = gk * ak[cc];
                            }
                        }
                        const T* __restrict sd = sdb.data() + j * W;
#pragma omp simd
                        for (int64_t cc = 0; cc < W; ++cc) {
                            T v = sA[cc] + sB[cc] * uv[cc];  // ∂L/∂Δ
                            if (a.softplus) v *= sd[cc];
                            gdt[cc] = v;
                            gbias[cc] += v;
                            gu[cc] = sB[cc] * dtv[cc] + gy[cc] * in.D[cc];
                        }
                        std::memcpy(stdt.data() + (j * per + o) * W, gdt, sizeof(gdt));
                        std::memcpy(stu.data() + (j * per + o) * W, gu, sizeof(gu));
                    }
                }
                // the group's du, dΔ, dz of this chunk's steps, whole rows of its channels at a time
                for (int64_t j = 0, c0 = k0 * W, wid = (k1 * W < d ? k1 * W : d) - c0; j < m; ++j) {
                    const int64_t row = (bi * l + s + j) * d + c0;
                    if (a.gz) put_row((S*)a.gz + row, stz.data() + j * per * W, wid, stream);
                    put_row((S*)a.gdelta + row, stdt.data() + j * per * W, wid, stream);
                    put_row((S*)a.gu + row, stu.data() + j * per * W, wid, stream);
                }
                // the group's dB, dC of this chunk's steps: the lanes summed
                int64_t jk0 = 0;
#ifdef LMLAB_SCAN_AVX512
                if constexpr (std::is_same_v<T, float> && W == 16 && NT == 16) {
                    for (; jk0 < m * n; jk0 += 16) {
                        _mm512_storeu_ps(gBb + s * n + jk0, lanesum16(PB.data() + jk0 * W));
                        _mm512_storeu_ps(gCb + s * n + jk0, lanesum16(PC.data() + jk0 * W));
                    }
                }
#endif
                for (int64_t jk = jk0; jk < m * n; ++jk) {
                    const T* pb = PB.data() + jk * W;
                    const T* pc = PC.data() + jk * W;
                    T sb = 0, sc = 0;
#pragma omp simd reduction(+ : sb, sc)
                    for (int64_t cc = 0; cc < W; ++cc) {
                        sb += pb[cc];
                        sc += pc[cc];
                    }
                    gBb[s * n + jk] = sb;
                    gCb[s * n + jk] = sc;
                }
            }
            for (int64_t blk = k0; blk < k1; ++blk) {
                const int64_t d0 = blk * W, w = d - d0 < W ? d - d0 : W, o = blk - k0;
                state_out((T*)a.gh0 + (bi * d + d0) * n, gcar.data() + o * nw, n, w);
                state_out((T*)a.pA + (bi * d + d0) * n, gAcar.data() + o * nw, n, w);
                for (int64_t cc = 0; cc < w; ++cc) {
                    ((T*)a.pD)[bi * d + d0 + cc] = gDcar[o * W + cc];
                    ((T*)a.pbias)[bi * d + d0 + cc] = gbcar[o * W + cc];
                }
            }
        }
#ifdef LMLAB_SCAN_AVX512
        _mm_sfence();  // this thread's non-temporal stores visible before the barrier
#endif
        // fixed-order reductions (the implied barrier above makes every partial sum complete)
#pragma omp for schedule(static)
        for (int64_t row = 0; row < a.b * l; ++row) {  // dB, dC of (bi, t): Σ over groups 0..G-1
            const int64_t bi = row / l, t = row % l;
            const T* pB = (const T*)a.pB + (bi * G * l + t) * n;
            const T* pC = (const T*)a.pC + (bi * G * l + t) * n;
            // the state index innermost (contiguous, vectorised), each sum still taken over groups 0, 1, … in order
            constexpr int64_t KS = 64;  // states a pass
            alignas(64) T vB[KS], vC[KS];
            for (int64_t k0 = 0; k0 < n; k0 += KS) {
                const int64_t kn = n - k0 < KS ? n - k0 : KS;
                for (int64_t k = 0; k < kn; ++k) {
                    vB[k] = pB[k0 + k];
                    vC[k] = pC[k0 + k];
                }
                for (int64_t grp = 1; grp < G; ++grp) {
                    const T* qB = pB + grp * l * n + k0;
                    const T* qC = pC + grp * l * n + k0;
#pragma omp simd
                    for (int64_t k = 0; k < kn; ++k) {
                        vB[k] += qB[k];
                        vC[k] += qC[k];
                    }
                }
                for (int64_t k = 0; k < kn; ++k) {
                    store((S*)a.gB, row * n + k0 + k, vB[k]);
                    store((S*)a.gC, row * n + k0 + k, vC[k]);
                }
            }
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
extern "C" void scan_fwd_f32(const Args* a) { if (a->n == 16) fwd<float, float, 16>(*a); else fwd<float, float, 0>(*a); }
extern "C" void scan_bwd_f32(const Args* a) { if (a->n == 16) bwd<float, float, 16>(*a); else bwd<float, float, 0>(*a); }
extern "C" void scan_fwd_bf16(const Args* a) {
    if (a->n == 16) fwd<float, uint16_t, 16>(*a); else fwd<float, uint16_t, 0>(*a);
}
extern "C" void scan_bwd_bf16(const Args* a) {
    if (a->n == 16) bwd<float, uint16_t, 16>(*a); else bwd<float, uint16_t, 0>(*a);
}
extern "C" void scan_fwd_f64(const Args* a) { fwd<double, double, 0>(*a); }
extern "C" void scan_bwd_f64(const Args* a) { bwd<double, double, 0>(*a); }
extern "C" int64_t scan_args_size() { return sizeof(Args); }
extern "C" int64_t scan_lanes() { return W; }
