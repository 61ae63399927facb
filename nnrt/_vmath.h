/* Vectorisable element-wise math for nnrt's float32 kernels.
 *
 * glibc's expf is a scalar library call, so a loop over it cannot be
 * vectorised and costs ~5-20 ns per element. nnrt_sigmoidf_array computes
 * exp(-|x|) with the Cephes polynomial (range reduction x = n ln2 + r,
 * |r| <= ln2/2, degree-6 polynomial, 2^n by building the exponent bits), all
 * in branch-free C that gcc/clang vectorise (SSE2 baseline; an AVX2 clone is
 * picked at run time where the compiler supports target_clones).
 * Relative error of the exp: ~2 ulp; results below 2^-126 (x < -87.3) flush
 * to 0. float64 kernels keep libm's exp (exact to ~1 ulp).
 */
#ifndef NNRT_VMATH_H
#define NNRT_VMATH_H

#include <stdint.h>
#include <string.h>
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__)
/* NOTE: gcc if-converts (and so vectorises) the selects below only when float
 * compares may not trap; nnrt never reads the FP exception flags. */
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#define NNRT_VMATH_PUSHED 1
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(NNRT_DEBUG_BUILD)
#define NNRT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NNRT_CLONES
#endif

/* exp(x) for x <= 0; 0 below -87.3 (where exp(x) is subnormal in float32). */
static inline float nnrt_expf_nonpos(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float xc = x < -87.3f ? -87.3f : x;
    float n = (xc * 1.44269504088896341f + magic) - magic;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float e = p * scale;
    return x < -87.3f ? 0.0f : e;
}

/* s = 1 / (1 + exp(-x)), from z = exp(-|x|) in (0, 1]: never overflows. */
static inline float nnrt_sigmoidf(float x) {
    float ax = x < 0.0f ? -x : x;
    float z = nnrt_expf_nonpos(-ax);
    float d = 1.0f / (1.0f + z);
    return x >= 0.0f ? d : z * d;
}

NNRT_CLONES
static void nnrt_sigmoidf_array(const float *x, float *s, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) s[i] = nnrt_sigmoidf(x[i]);
}

/* s = sigmoid(x * scale[j] + shift[j]) over a row-major (n, f) array: BatchNorm's
 * affine step and the sigmoid in one pass (used where the two layers are adjacent). */
NNRT_CLONES
static void nnrt_affine_sigmoidf(const float *x, float *s, ptrdiff_t n, ptrdiff_t f,
                                 const float *scale, const float *shift) {
    for (ptrdiff_t i = 0; i < n; i++) {
        const float *xr = x + i * f;
        float *sr = s + i * f;
        for (ptrdiff_t j = 0; j < f; j++) sr[j] = nnrt_sigmoidf(xr[j] * scale[j] + shift[j]);
    }
}

#ifdef NNRT_VMATH_PUSHED
#pragma GCC pop_options
#endif

#endif /* NNRT_VMATH_H */
