// Fused CPU kernels for the element-wise parts of a MambaSWELU step (lmlab.models.kernels_cpu loads them).
//
//   swelu_fwd / swelu_bwd      SWELU(z) = λ·sign(z)·(1 − exp(−|z|^k)) and its three derivatives in one pass each
//                              (the forward optionally adding a residual: the block's h + SWELU(z))
//   conv_silu_fwd / _bwd       causal depthwise conv over time + bias + SiLU, on (b, l, d) rows, documents kept apart
//   ce_rows                    cross-entropy of logit rows (label smoothing too) and its gradient, in place
//   layer_norm_fwd / _bwd      LayerNorm of rows into another dtype (fp32 rows → bf16 for the next matmul) and back
//   widen_scale                bf16 → fp32 times a scale in one pass (the chunked loss's head gradient)
//
// Everything computes in fp32 (the inputs and outputs may be bf16). Reductions (dk, dλ, the conv's weight and bias
// gradients) are summed per fixed block of elements / rows and the blocks are added in order, so the results do not
// depend on the number of threads. Built by lmlab.models.cpp_build with the same flags as the selective scan.
#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>
// On CPUs with AVX-512, GCC vectorises these loops 8 floats wide unless told otherwise; 16 wide measured faster
// for every kernel here (SWELU's forward 0.57 → 0.35 ms on a (4, 256, 512) tensor, 2 threads; the bf16 loss rows
// 4.6 → 3.3 ms). The selective scan (scan_cpu.cpp) asks the same for its 16-channel blocks.
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("prefer-vector-width=512")
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr float TINY = 1.17549435e-38f;  // the smallest normal float: vlog's domain (a denormal |z| reads as it)
constexpr int64_t SWELU_BLOCK = 4096;  // elements per partial sum of dk, dλ
constexpr int64_t CONV_ROWS = 64;      // (b, t) rows per partial sum of the conv's dw, dbias
constexpr int64_t NORM_ROWS = 64;      // rows per partial sum of the LayerNorm's dw, db

inline int threads_for(int requested) { return requested > 0 ? requested : 1; }

// ------------------------------------------------------------------------------------------------ SWELU
// one block of SWELU's forward: its own function over restrict pointers, so the loop vectorises
#if defined(__AVX512F__)
// the parts of SWELU both passes share, 16 lanes: a = |v|, ln a (at max(a, FLT_MIN): vlog's domain), a^k (0 at a = 0),
// e^(−a^k) and sign(v) (0 at 0; NaN reads as 0, as the scalar loops have it)
struct SweluLanes {
    __m512 a, la, ak, e, s;
    inline SweluLanes(__m512 v, __m512 kq) {
        const __m512 zero = _mm512_setzero_ps();
        a = _mm512_abs_ps(v);
        la = vlog16(_mm512_max_ps(a, _mm512_set1_ps(TINY)));
        ak = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, zero, _CMP_GT_OQ), vexp16(_mm512_mul_ps(kq, la)));
        e = vexp16(_mm512_sub_ps(zero, ak));
        s = _mm512_mask_mov_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0f)),
                               _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.0f));
    }
};
#endif

// y = SWELU(z), or with `res` y = res + SWELU(z) (the block's residual add in the same pass; y in res's dtype)
template <typename T, typename Y>
inline void swelu_fwd_block(const T* __restrict z, Y* __restrict y, int64_t m, float k, float lam,
                            const Y* __restrict res) {
    int64_t i0 = 0;
#if defined(__AVX512F__)
    const __m512 kq = _mm512_set1_ps(k), lq = _mm512_set1_ps(lam);
    for (; i0 + 16 <= m; i0 += 16) {
        const SweluLanes q(load16(z + i0), kq);
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(lq, q.s), _mm512_sub_ps(_mm512_set1_ps(1.0f), q.e));
        store16(y + i0, res ? _mm512_add_ps(load16(res + i0), v) : v);
    }
#endif
#pragma omp simd
    for (int64_t i = i0; i < m; ++i) {
        const float v = load(z, i);
        const float a = std::fabs(v);
        const float safe = a > TINY ? a : (a > 0.f ? TINY : 1.f);  // no fmax: it would not vectorise
        const float ak = a > 0.f ? vexp(k * vlog(safe)) : 0.f;
        const float s = v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f);
        const float out = lam * s * (1.f - vexp(-ak));
        store(y, i, res ? load(res, i) + out : out);
    }
}

template <typename T, typename Y>
void swelu_fwd(const T* z, Y* y, int64_t n, float k, float lam, const Y* res, int nthreads) {
    const int64_t blocks = (n + SWELU_BLOCK - 1) / SWELU_BLOCK;
#pragma omp parallel for num_threads(threads_for(nthreads)) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * SWELU_BLOCK, m = start + SWELU_BLOCK < n ? SWELU_BLOCK : n - start;
        swelu_fwd_block(z + start, y + start, m, k, lam, res ? res + start : res);
    }
}

// gz = g·λ·k·max(a, eps)^(k−1)·e^(−a^k); dk = Σ g·λ·s·e^(−a^k)·a^k·ln a (0 at a = 0); dλ = Σ g·s·(1 − e^(−a^k))
template <typename T, typename G>
inline void swelu_bwd_block(const T* __restrict z, const G* __restrict g, T* __restrict gz, int64_t m, float k,
                            float lam, float eps, float eps_slope, int need_gz, double* partial) {
    float sk = 0.f, sl = 0.f;
    int64_t i0 = 0;
#if defined(__AVX512F__)
    const __m512 kq = _mm512_set1_ps(k), lk = _mm512_set1_ps(lam * k), one = _mm512_set1_ps(1.0f);
    __m512 vk = _mm512_setzero_ps(), vl = _mm512_setzero_ps();
    for (; i0 + 16 <= m; i0 += 16) {
        const SweluLanes q(load16(z + i0), kq);
        const __m512 gi = load16(g + i0), gs = _mm512_mul_ps(gi, q.s);
        if (need_gz) {  // a^(k−1) as a^k / a, its value at eps below eps
            const __m512 pk = _mm512_mask_mov_ps(_mm512_set1_ps(eps_slope),
                                                 _mm512_cmp_ps_mask(q.a, _mm512_set1_ps(eps), _CMP_GE_OQ),
                                                 _mm512_div_ps(q.ak, _mm512_max_ps(q.a, _mm512_set1_ps(TINY))));
            store16(gz + i0, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(gi, lk), pk), q.e));
        }
        vk = _mm512_fmadd_ps(_mm512_mul_ps(gs, q.e), _mm512_mul_ps(q.ak, q.la), vk);
        vl = _mm512_fmadd_ps(gs, _mm512_sub_ps(one, q.e), vl);
    }
    sk = _mm512_reduce_add_ps(vk);
    sl = _mm512_reduce_add_ps(vl);
#endif
#pragma omp simd reduction(+ : sk, sl)
    for (int64_t i = i0; i < m; ++i) {
        const float v = load(z, i), gi = load(g, i);
        const float a = std::fabs(v);
        const float safe = a > TINY ? a : (a > 0.f ? TINY : 1.f);  // no fmax: it would not vectorise
        const float la = vlog(safe);  // 0 at a = 0
        const float ak = a > 0.f ? vexp(k * la) : 0.f;
        const float e = vexp(-ak);
        const float s = v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f);
        if (need_gz) {
            const float pow_km1 = a >= eps ? ak / safe : eps_slope;
            store(gz, i, gi * lam * k * pow_km1 * e);
        }
        sk += gi * s * e * ak * la;
        sl += gi * s * (1.f - e);
    }
    partial[0] = static_cast<double>(sk) * lam;
    partial[1] = sl;
}

template <typename T, typename G>
void swelu_bwd(const T* z, const G* g, T* gz, int64_t n, float k, float lam, float eps, double* partial,
               int need_gz, int nthreads) {
    const float eps_slope = std::exp((k - 1.f) * std::log(eps));  // max(a, eps)^(k−1) below eps (libm, once)
    const int64_t blocks = (n + SWELU_BLOCK - 1) / SWELU_BLOCK;
#pragma omp parallel for num_threads(threads_for(nthreads)) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t start = b * SWELU_BLOCK, m = start + SWELU_BLOCK < n ? SWELU_BLOCK : n - start;
        swelu_bwd_block(z + start, g + start, need_gz ? gz + start : gz, m, k, lam, eps, eps_slope, need_gz,
                        partial + 2 * b);
    }
}

// ------------------------------------------------------------------------------------------------ conv + SiLU
// x (b, l, d) with strides (sxb, sxl, 1); wt (K, d) the taps transposed (tap j looks back K−1−j steps);
// bias (d) or null; seq (b, l) int64 document ids or null; out (b, l, d) contiguous. Whether a tap counts depends on
// the row alone (its source position and document), so the inner loops run over channels and vectorise.
inline bool tap_counts(const int64_t* seq, int64_t b, int64_t l, int64_t from, int64_t to) {
    return from >= 0 && from < l && (!seq || seq[b * l + from] == seq[b * l + to]);
}

template <typename T>
inline void conv_row(const T* x, const float* wt, const float* bias, const int64_t* seq, int64_t b, int64_t t,
                     int64_t l, int64_t d, int64_t K, int64_t sxb, int64_t sxl, float* acc) {
    for (int64_t c = 0; c < d; ++c) acc[c] = bias ? bias[c] : 0.f;
    for (int64_t j = 0; j < K; ++j) {
        const int64_t src = t - (K - 1 - j);
        if (!tap_counts(seq, b, l, src, t)) continue;
        const T* xs = x + b * sxb + src * sxl;
        const float* w = wt + j * d;
        for (int64_t c = 0; c < d; ++c) acc[c] += w[c] * load(xs, c);
    }
}

template <typename T, typename O>
void conv_silu_fwd(const T* x, const float* wt, const float* bias, const int64_t* seq, O* out, int64_t B,
                   int64_t l, int64_t d, int64_t K, int64_t sxb, int64_t sxl, int nthreads) {
#pragma omp parallel num_threads(threads_for(nthreads))
    {
        std::vector<float> acc(static_cast<size_t>(d));
#pragma omp for schedule(static)
        for (int64_t row = 0; row < B * l; ++row) {
            conv_row(x, wt, bias, seq, row / l, row % l, l, d, K, sxb, sxl, acc.data());
            O* o = out + row * d;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) store(o, c, acc[c] / (1.f + vexp(-acc[c])));
        }
    }
}

// gu (b, l, d) contiguous → gx (b, l, d) contiguous; gw (K, d) and gbias (d) are summed per block of CONV_ROWS rows,
// and the blocks added in order. One pass a block: the gradient before the SiLU (gpre) of its rows and the K − 1
// after them (which its rows' gx reads), kept in the thread's scratch while the block's gx and its partial sums of
// gw, gbias are taken from it, so no (b, l, d) intermediate goes through memory.
template <typename T, typename G>
void conv_silu_bwd(const T* x, const float* wt, const float* bias, const int64_t* seq, const G* gu, G* gx,
                   float* gw, float* gbias, int64_t B, int64_t l, int64_t d, int64_t K, int64_t sxb, int64_t sxl,
                   int nthreads) {
    const int64_t rows = B * l;
    const int64_t nblocks = (rows + CONV_ROWS - 1) / CONV_ROWS;
    // zeroed a block at a time
    std::unique_ptr<float[]> partial(new float[static_cast<size_t>(nblocks * (K + 1) * d)]);
#pragma omp parallel num_threads(threads_for(nthreads))
    {
        std::vector<float> acc(static_cast<size_t>(d));
        std::unique_ptr<float[]> gpre(new float[static_cast<size_t>((CONV_ROWS + K - 1) * d)]);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const int64_t r0 = blk * CONV_ROWS, r1 = r0 + CONV_ROWS < rows ? r0 + CONV_ROWS : rows;
            const int64_t re = r1 + K - 1 < rows ? r1 + K - 1 : rows;
            for (int64_t row = r0; row < re; ++row) {
                conv_row(x, wt, bias, seq, row / l, row % l, l, d, K, sxb, sxl, acc.data());
                float* gp = gpre.get() + (row - r0) * d;
#pragma omp simd
                for (int64_t c = 0; c < d; ++c) {
                    const float p = acc[c], sg = 1.f / (1.f + vexp(-p));
                    gp[c] = load(gu, row * d + c) * sg * (1.f + p * (1.f - sg));
                }
            }
            // gx[t] = Σ_j w_j · gpre[t + K−1−j], where that output position is in the same document as t
            for (int64_t row = r0; row < r1; ++row) {
                const int64_t b = row / l, t = row % l;
                for (int64_t c = 0; c < d; ++c) acc[c] = 0.f;
                for (int64_t j = 0; j < K; ++j) {
                    const int64_t o = t + (K - 1 - j);
                    if (!tap_counts(seq, b, l, o, t)) continue;
                    const float* gp = gpre.get() + (b * l + o - r0) * d;
                    const float* w = wt + j * d;
                    for (int64_t c = 0; c < d; ++c) acc[c] += w[c] * gp[c];
                }
                for (int64_t c = 0; c < d; ++c) store(gx, row * d + c, acc[c]);
            }
            float* pw = partial.get() + blk * (K + 1) * d;
            std::fill(pw, pw + (K + 1) * d, 0.f);
            for (int64_t row = r0; row < r1; ++row) {
                const int64_t b = row / l, o = row % l;
                const float* gp = gpre.get() + (row - r0) * d;
                for (int64_t j = 0; j < K; ++j) {
                    const int64_t src = o - (K - 1 - j);
                    if (!tap_counts(seq, b, l, src, o)) continue;
                    const T* xs = x + b * sxb + src * sxl;
                    float* pj = pw + j * d;
                    for (int64_t c = 0; c < d; ++c) pj[c] += gp[c] * load(xs, c);
                }
                float* pb = pw + K * d;
                for (int64_t c = 0; c < d; ++c) pb[c] += gp[c];
            }
        }
    }
    std::vector<double> sum(static_cast<size_t>(d));
    for (int64_t j = 0; j <= K; ++j) {
        float* dst = j < K ? gw + j * d : gbias;
        if (!dst) continue;
        for (int64_t c = 0; c < d; ++c) sum[c] = 0.0;
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            const float* src = partial.get() + (blk * (K + 1) + j) * d;
            for (int64_t c = 0; c < d; ++c) sum[c] += src[c];
        }
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<float>(sum[c]);
    }
}

// ------------------------------------------------------------------------------------------------ cross-entropy rows
// z (n, V) logits of the rows whose target is t (n,); eps the label smoothing. Per row, in fp32 whatever z's
// storage: loss = (1 − ε)(lse − z_t) + ε(lse − mean z), and with `grad` the gradient of that loss in place of z:
// softmax(z) − (1 − ε)·onehot(t) − ε/V. Three vectorised passes over a row: its max (and Σ z); exp(z − max) and
// their sum, the exps kept in the row when a gradient is wanted; their scaling into the softmax.
// `e`: where the exps go, V floats (a bf16 row's: each gradient is then rounded to bf16 once), or null to keep them
// in the row itself (an fp32 row)
template <typename T>
inline void ce_row(T* __restrict row, int64_t t, int64_t V, float eps, float* loss, int grad, float* __restrict e) {
    float m = -INFINITY, sz = 0.f;
#pragma omp simd reduction(max : m) reduction(+ : sz)
    for (int64_t j = 0; j < V; ++j) {
        const float v = load(row, j);
        m = v > m ? v : m;
        sz += v;
    }
    const float picked = load(row, t);
    float s = 0.f;
    if (grad && e) {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; ++j) {
            e[j] = vexp(load(row, j) - m);
            s += e[j];
        }
    } else if (grad) {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; ++j) {
            const float x = vexp(load(row, j) - m);
            s += x;
            store(row, j, x);
        }
    } else {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < V; ++j) s += vexp(load(row, j) - m);
    }
    const float lse = m + std::log(s);
    *loss = (1.f - eps) * (lse - picked) + eps * (lse - sz / static_cast<float>(V));
    if (!grad) return;
    const float inv = 1.f / s, off = eps / static_cast<float>(V);
    if (e) {
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) store(row, j, e[j] * inv - off);
        store(row, t, e[t] * inv - off - (1.f - eps));
        return;
    }
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) store(row, j, load(row, j) * inv - off);
    store(row, t, load(row, t) - (1.f - eps));
}

#if defined(__AVX512F__)
// ce_row for a bf16 row in 16-lane intrinsics (the exps in `e`, bf16 converted 16 lanes at a time)
inline void ce_row_bf16(uint16_t* __restrict row, int64_t t, int64_t V, float eps, float* loss, int grad,
                        float* __restrict e) {
    __m512 mq = _mm512_set1_ps(-INFINITY), sq = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= V; j += 16) {
        const __m512 x = load16(row + j);
        mq = _mm512_max_ps(x, mq);  // a NaN logit is skipped here, as the comparison above skips it
        sq = _mm512_add_ps(sq, x);
    }
    float m = _mm512_reduce_max_ps(mq), sz = _mm512_reduce_add_ps(sq);
    for (; j < V; ++j) {
        const float v = load(row, j);
        m = v > m ? v : m;
        sz += v;
    }
    const float picked = load(row, t);
    const __m512 mm = _mm512_set1_ps(m);
    __m512 es = _mm512_setzero_ps();
    for (j = 0; j + 16 <= V; j += 16) {
        const __m512 x = vexp16(_mm512_sub_ps(load16(row + j), mm));
        es = _mm512_add_ps(es, x);
        if (grad) _mm512_storeu_ps(e + j, x);
    }
    float s = _mm512_reduce_add_ps(es);
    for (; j < V; ++j) {
        const float x = vexp(load(row, j) - m);
        s += x;
        if (grad) e[j] = x;
    }
    const float lse = m + std::log(s);
    *loss = (1.f - eps) * (lse - picked) + eps * (lse - sz / static_cast<float>(V));
    if (!grad) return;
    const float inv = 1.f / s, off = eps / static_cast<float>(V);
    const __m512 iq = _mm512_set1_ps(inv), oq = _mm512_set1_ps(off);
    for (j = 0; j + 16 <= V; j += 16) store16(row + j, _mm512_fmsub_ps(_mm512_loadu_ps(e + j), iq, oq));
    for (; j < V; ++j) store(row, j, e[j] * inv - off);
    store(row, t, e[t] * inv - off - (1.f - eps));
}
#endif

template <typename T>
void ce_rows(T* z, const int64_t* targets, int64_t n, int64_t V, float eps, float* loss, int grad, int nthreads) {
    constexpr bool bf16 = std::is_same_v<T, uint16_t>;
#pragma omp parallel num_threads(threads_for(nthreads))
    {
        std::unique_ptr<float[]> ebuf(bf16 && grad ? new float[static_cast<size_t>(V)] : nullptr);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n; ++r) {
#if defined(__AVX512F__)
            if constexpr (bf16) {
                ce_row_bf16(z + r * V, targets[r], V, eps, loss + r, grad, ebuf.get());
                continue;
            }
#endif
            ce_row(z + r * V, targets[r], V, eps, loss + r, grad, ebuf.get());
        }
    }
}

// ------------------------------------------------------------------------------------------------ LayerNorm
// y = (x − mean)·rstd·w + b over rows of d, rstd = 1/√(var + eps) with the biased variance (two passes over the row,
// which sits in L1); mean and rstd kept per row for the backward. x and y each fp32 or bf16; w, b fp32.
template <typename X, typename Y>
void layer_norm_fwd(const X* x, const float* w, const float* b, Y* y, float* mean, float* rstd, int64_t R, int64_t d,
                    float eps, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads))
    for (int64_t r = 0; r < R; ++r) {
        const X* __restrict xr = x + r * d;
        Y* __restrict yr = y + r * d;
        float s = 0.f, v = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < d; ++j) s += load(xr, j);
        const float m = s / static_cast<float>(d);
#pragma omp simd reduction(+ : v)
        for (int64_t j = 0; j < d; ++j) {
            const float c = load(xr, j) - m;
            v += c * c;
        }
        const float rs = 1.f / std::sqrt(v / static_cast<float>(d) + eps);
        int64_t j = 0;
#if defined(__AVX512F__)
        const __m512 mq = _mm512_set1_ps(m), rq = _mm512_set1_ps(rs);
        for (; j + 16 <= d; j += 16)
            store16(yr + j, _mm512_fmadd_ps(_mm512_mul_ps(_mm512_sub_ps(load16(xr + j), mq), rq),
                                            _mm512_loadu_ps(w + j), _mm512_loadu_ps(b + j)));
#endif
        for (; j < d; ++j) store(yr, j, (load(xr, j) - m) * rs * w[j] + b[j]);
        mean[r] = m;
        rstd[r] = rs;
    }
}

// dx = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂)), x̂ = (x − mean)·rstd, in x's dtype; dw = Σ g·x̂ and db = Σ g over rows,
// summed per block of NORM_ROWS rows into `partial` (2, blocks, d) and the blocks added in order into dw, db.
template <typename X, typename G>
void layer_norm_bwd(const X* x, const G* g, const float* w, const float* mean, const float* rstd, X* gx, float* dw,
                    float* db, float* partial, int64_t R, int64_t d, int nthreads) {
    const int64_t nblocks = (R + NORM_ROWS - 1) / NORM_ROWS;
    float* pw = partial;
    float* pb = partial + nblocks * d;
#pragma omp parallel num_threads(threads_for(nthreads))
    {
        std::unique_ptr<float[]> xh(new float[static_cast<size_t>(2 * d)]);
        float* __restrict xhat = xh.get();
        float* __restrict gw = xh.get() + d;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; ++blk) {
            float* __restrict bw = pw + blk * d;
            float* __restrict bb = pb + blk * d;
            for (int64_t j = 0; j < d; ++j) bw[j] = bb[j] = 0.f;
            for (int64_t r = blk * NORM_ROWS; r < R && r < (blk + 1) * NORM_ROWS; ++r) {
                const X* __restrict xr = x + r * d;
                const G* __restrict gr = g + r * d;
                const float m = mean[r], rs = rstd[r];
                float s1 = 0.f, s2 = 0.f;
#pragma omp simd reduction(+ : s1, s2)
                for (int64_t j = 0; j < d; ++j) {
                    const float gj = load(gr, j), xj = (load(xr, j) - m) * rs;
                    xhat[j] = xj;
                    gw[j] = gj * w[j];
                    bw[j] += gj * xj;
                    bb[j] += gj;
                    s1 += gw[j];
                    s2 += gw[j] * xj;
                }
                const float inv = 1.f / static_cast<float>(d), a1 = s1 * inv, a2 = s2 * inv;
                X* __restrict out = gx + r * d;
#pragma omp simd
                for (int64_t j = 0; j < d; ++j) store(out, j, rs * (gw[j] - a1 - xhat[j] * a2));
            }
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < d; ++j) {
            float sw = 0.f, sb = 0.f;
            for (int64_t blk = 0; blk < nblocks; ++blk) {
                sw += pw[blk * d + j];
                sb += pb[blk * d + j];
            }
            dw[j] = sw;
            db[j] = sb;
        }
    }
}

// ------------------------------------------------------------------------------------------------ widen + scale
// dst = float(src) · scale: the cast and the multiply of `src.float().mul_(scale)`, the same single rounding
void widen_scale(const uint16_t* src, float* dst, int64_t n, float scale, int nthreads) {
    const int64_t step = 1 << 14;
#pragma omp parallel for schedule(static) num_threads(threads_for(nthreads))
    for (int64_t start = 0; start < n; start += step) {
        const int64_t end = start + step < n ? start + step : n;
        const uint16_t* __restrict p = src;
        float* __restrict q = dst;
        int64_t i = start;
#if defined(__AVX512F__)
        const __m512 sq = _mm512_set1_ps(scale);
        for (; i + 16 <= end; i += 16) _mm512_storeu_ps(q + i, _mm512_mul_ps(load16(p + i), sq));
#endif
        for (; i < end; ++i) q[i] = load(p, i) * scale;
    }
}

}  // namespace

extern "C" {
// dtype codes: 0 = float32, 1 = bfloat16 (as uint16 bits)
void lmlab_ce_rows(int dt, void* z, const int64_t* targets, int64_t n, int64_t V, float eps, float* loss, int grad,
                   int nthreads) {
    if (dt == 0) ce_rows(static_cast<float*>(z), targets, n, V, eps, loss, grad, nthreads);
    else ce_rows(static_cast<uint16_t*>(z), targets, n, V, eps, loss, grad, nthreads);
}

void lmlab_swelu_fwd(int dt, const void* z, void* y, int64_t n, float k, float lam, int nthreads) {
    if (dt == 0) swelu_fwd(static_cast<const float*>(z), static_cast<float*>(y), n, k, lam, (const float*)nullptr,
                           nthreads);
    else swelu_fwd(static_cast<const uint16_t*>(z), static_cast<uint16_t*>(y), n, k, lam, (const uint16_t*)nullptr,
                   nthreads);
}

// y = res + SWELU(z), res and y fp32, z fp32 or bf16
void lmlab_swelu_residual_fwd(int dt, const void* z, const float* res, float* y, int64_t n, float k, float lam,
                              int nthreads) {
    if (dt == 0) swelu_fwd(static_cast<const float*>(z), y, n, k, lam, res, nthreads);
    else swelu_fwd(static_cast<const uint16_t*>(z), y, n, k, lam, res, nthreads);
}

// z (and gz, in z's dtype) fp32 or bf16 (dt); g fp32 or bf16 (gdt)
void lmlab_swelu_bwd(int dt, int gdt, const void* z, const void* g, void* gz, int64_t n, float k, float lam,
                     float eps, double* partial, int need_gz, int nthreads) {
    if (dt == 0 && gdt == 0)
        swelu_bwd(static_cast<const float*>(z), static_cast<const float*>(g), static_cast<float*>(gz), n, k, lam, eps,
                  partial, need_gz, nthreads);
    else if (dt == 0)
        swelu_bwd(static_cast<const float*>(z), static_cast<const uint16_t*>(g), static_cast<float*>(gz), n, k, lam,
                  eps, partial, need_gz, nthreads);
    else if (gdt == 0)
        swelu_bwd(static_cast<const uint16_t*>(z), static_cast<const float*>(g), static_cast<uint16_t*>(gz), n, k,
                  lam, eps, partial, need_gz, nthreads);
    else
        swelu_bwd(static_cast<const uint16_t*>(z), static_cast<const uint16_t*>(g), static_cast<uint16_t*>(gz), n, k,
                  lam, eps, partial, need_gz, nthreads);
}

void lmlab_conv_silu_fwd(int dt, const void* x, const float* wt, const float* bias, const int64_t* seq, void* out,
                         int64_t B, int64_t l, int64_t d, int64_t K, int64_t sxb, int64_t sxl, int nthreads) {
    if (dt == 0)
        conv_silu_fwd(static_cast<const float*>(x), wt, bias, seq, static_cast<float*>(out), B, l, d, K, sxb, sxl,
                      nthreads);
    else
        conv_silu_fwd(static_cast<const uint16_t*>(x), wt, bias, seq, static_cast<uint16_t*>(out), B, l, d, K, sxb,
                      sxl, nthreads);
}

void lmlab_conv_silu_bwd(int dt, const void* x, const float* wt, const float* bias, const int64_t* seq,
                         const void* gu, void* gx, float* gw, float* gbias, int64_t B, int64_t l, int64_t d, int64_t K,
                         int64_t sxb, int64_t sxl, int nthreads) {
    if (dt == 0)
        conv_silu_bwd(static_cast<const float*>(x), wt, bias, seq, static_cast<const float*>(gu),
                      static_cast<float*>(gx), gw, gbias, B, l, d, K, sxb, sxl, nthreads);
    else
        conv_silu_bwd(static_cast<const uint16_t*>(x), wt, bias, seq, static_cast<const uint16_t*>(gu),
                      static_cast<uint16_t*>(gx), gw, gbias, B, l, d, K, sxb, sxl, nthreads);
}

void lmlab_layer_norm_fwd(int xdt, int ydt, const void* x, const float* w, const float* b, void* y, float* mean,
                          float* rstd, int64_t R, int64_t d, float eps, int nthreads) {
    if (xdt == 0 && ydt == 1)
        layer_norm_fwd(static_cast<const float*>(x), w, b, static_cast<uint16_t*>(y), mean, rstd, R, d, eps, nthreads);
    else if (xdt == 0)
        layer_norm_fwd(static_cast<const float*>(x), w, b, static_cast<float*>(y), mean, rstd, R, d, eps, nthreads);
    else if (ydt == 1)
        layer_norm_fwd(static_cast<const uint16_t*>(x), w, b, static_cast<uint16_t*>(y), mean, rstd, R, d, eps,
                       nthreads);
    else
        layer_norm_fwd(static_cast<const uint16_t*>(x), w, b, static_cast<float*>(y), mean, rstd, R, d, eps, nthreads);
}

void lmlab_layer_norm_bwd(int xdt, int gdt, const void* x, const void* g, const float* w, const float* mean,
                          const float* rstd, void* gx, float* dw, float* db, float* partial, int64_t R, int64_t d,
                          int nthreads) {
    if (xdt == 0 && gdt == 1)
        layer_norm_bwd(static_cast<const float*>(x), static_cast<const uint16_t*>(g), w, mean, rstd,
                       static_cast<float*>(gx), dw, db, partial, R, d, nthreads);
    else if (xdt == 0)
        layer_norm_bwd(static_cast<const float*>(x), static_cast<const float*>(g), w, mean, rstd,
                       static_cast<float*>(gx), dw, db, partial, R, d, nthreads);
    else if (gdt == 1)
        layer_norm_bwd(static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(g), w, mean, rstd,
                       static_cast<uint16_t*>(gx), dw, db, partial, R, d, nthreads);
    else
        layer_norm_bwd(static_cast<const uint16_t*>(x), static_cast<const float*>(g), w, mean, rstd,
                       static_cast<uint16_t*>(gx), dw, db, partial, R, d, nthreads);
}

void lmlab_widen_scale(const void* src, float* dst, int64_t n, float scale, int nthreads) {
    widen_scale(static_cast<const uint16_t*>(src), dst, n, scale, nthreads);
}
}
