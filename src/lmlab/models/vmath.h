// Vectorisable float exp and log for lmlab's C++ CPU kernels (scan_cpu.cpp, kernels_cpu.cpp): the build puts this
// text in front of each kernel's source. Inlined, branch-free polynomials, so loops over them vectorise (libm's
// scalar calls would not); on AVX-512 also the same functions 16 lanes at a time in intrinsics (vexp16, vlog16)
// and 16-lane float/bf16 loads and stores, for the kernels' hand-written loops.
#include <cmath>
#include <cstdint>
#include <cstring>

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

// log for float x >= FLT_MIN (normal numbers): frexp by bit manipulation, then Cephes' degree-9 polynomial of
// the mantissa around 1 (~1 ulp).
static inline float vlog(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof(float));
    float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
    bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
    float m;
    std::memcpy(&m, &bits, sizeof(float));
    const bool low = m < 0.70710678f;
    e = low ? e - 1.0f : e;
    m = low ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += -2.12194440e-4f * e;
    y += -0.5f * z;
    return m + y + 0.693359375f * e;
}

// Element loads and stores that compute in float (or double) whatever the storage: float, double, or bfloat16 as
// its uint16 bits. A bf16 store rounds to nearest even, as torch does, and keeps a NaN a NaN.
static inline float load(const float* p, int64_t i) { return p[i]; }
static inline double load(const double* p, int64_t i) { return p[i]; }
static inline float load(const uint16_t* p, int64_t i) {
    uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
static inline void store(float* p, int64_t i, float v) { p[i] = v; }
static inline void store(double* p, int64_t i, double v) { p[i] = v; }
static inline void store(uint16_t* p, int64_t i, float v) {
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu)) {  // NaN stays NaN
        p[i] = static_cast<uint16_t>((bits >> 16) | 0x40);
        return;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    p[i] = static_cast<uint16_t>(bits >> 16);
}

#if defined(__AVX512F__)
#include <immintrin.h>
// 16 at a time, for the kernels' AVX-512 loops
// exp of 16 floats: vexp's reduction and polynomial, with the power of two applied by vscalefps, which also gives
// 0 and inf past the float range; the compiler's own code for vexp's clamps costs as much again in compares and
// blends. The clamps here keep only ±inf from making the reduction NaN (a NaN stays NaN: max/min return their
// second operand when either is NaN).
static inline __m512 vexp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.3981999507e-3f), r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}
// log of 16 floats x ≥ FLT_MIN: vlog's algorithm, the exponent and mantissa ∈ [0.5, 1) by vgetexpps / vgetmantps
static inline __m512 vlog16(__m512 x) {
    __m512 e = _mm512_add_ps(_mm512_getexp_ps(x), _mm512_set1_ps(1.0f));
    __m512 m = _mm512_getmant_ps(x, _MM_MANT_NORM_p5_1, _MM_MANT_SIGN_src);
    const __mmask16 low = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.70710678f), _CMP_LT_OQ);
    e = _mm512_mask_sub_ps(e, low, e, _mm512_set1_ps(1.0f));
    m = _mm512_sub_ps(_mm512_mask_add_ps(m, low, m, m), _mm512_set1_ps(1.0f));
    const __m512 z = _mm512_mul_ps(m, m);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(7.0376836292e-2f), m, _mm512_set1_ps(-1.1514610310e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.1676998740e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.2420140846e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(1.4249322787e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-1.6668057665e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(2.0000714765e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(-2.4999993993e-1f));
    y = _mm512_fmadd_ps(y, m, _mm512_set1_ps(3.3333331174e-1f));
    y = _mm512_mul_ps(_mm512_mul_ps(y, m), z);
    y = _mm512_fmadd_ps(_mm512_set1_ps(-2.12194440e-4f), e, y);
    y = _mm512_fmadd_ps(_mm512_set1_ps(-0.5f), z, y);
    return _mm512_fmadd_ps(_mm512_set1_ps(0.693359375f), e, _mm512_add_ps(m, y));
}
// 16 floats from p: float as they are, bf16 (uint16 bits) widened
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const uint16_t* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// 16 floats → 16 bf16, as store() rounds them (to nearest even; a NaN stays a NaN)
static inline __m256i bf16x16(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x), top = _mm512_srli_epi32(bits, 16);
    const __m512i odd = _mm512_and_si512(top, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_or_si512(top, _mm512_set1_epi32(0x40)));
    return _mm512_cvtepi32_epi16(r);
}
static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store16(uint16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16x16(v)); }
#endif
