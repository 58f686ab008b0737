// Vectorisable float exp and log for lmlab's C++ CPU kernels (scan_cpu.cpp, kernels_cpu.cpp): the build puts this
// text in front of each kernel's source. Inlined, branch-free polynomials, so loops over them vectorise (libm's
// scalar calls would not).
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
