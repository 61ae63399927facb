/* Vectorisable element-wise math for nnrt's float32 kernels.
 *
 * glibc's expf is a scalar library call, so a loop over it cannot be
 * vectorised and costs ~5-20 ns per element. nnrt_sigmoidf_array computes
 * exp(-|x|) with the Cephes polynomial (range reduction x = n ln2 + r,
 * |r| <= ln2/2, degree-6 polynomial, 2^n by building the exponent bits), all
 * in branch-free C that gcc/clang vectorise (SSE2 baseline; AVX-512 (x86-64-v4)
 * and AVX2 clones are picked at run time where gcc supports target_clones).
 * Relative error of the exp: ~2 ulp; results below 2^-126 (x < -87.3) flush
 * to 0. float64 kernels keep libm's exp (exact to ~1 ulp).
 */
#ifndef NNRT_VMATH_H
#define NNRT_VMATH_H

#include <stdint.h>
#include <string.h>
#include <stddef.h>
#include <math.h>
#include <stdlib.h>

#if defined(__GNUC__) && !defined(__clang__)
/* NOTE: gcc if-converts (and so vectorises) the selects below only when float
 * compares may not trap; nnrt never reads the FP exception flags. */
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
/* NOTE: no FMA contraction, so every clone (AVX-512, AVX2, SSE2) gives bit-identical
 * element-wise results (plugin kernels built on this header rely on it too). */
#pragma GCC optimize("fp-contract=off")
#define NNRT_VMATH_PUSHED 1
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(NNRT_DEBUG_BUILD)
#if __GNUC__ >= 11 /* -march=x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) is known from gcc 11 */
#define NNRT_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define NNRT_CLONES __attribute__((target_clones("avx2", "default")))
#endif
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

/* float64 sigmoid with libm's exp (the same formula as nnrt_sigmoidf). */
static inline double nnrt_sigmoid(double x) {
    double z = exp(x >= 0.0 ? -x : x);
    return x >= 0.0 ? 1.0 / (1.0 + z) : z / (1.0 + z);
}

/* Sigmoid backward from the cached output: dx = dy s (1 - s). */
#define NNRT_SIGMOID_BWD_KERNEL(T, SUF)                                                      \
NNRT_CLONES                                                                               \
static void nnrt_sigmoid_bwd_##SUF(const T *S, const T *dY, T *dX, ptrdiff_t n) {         \
    for (ptrdiff_t i = 0; i < n; i++) dX[i] = dY[i] * S[i] * ((T)1 - S[i]);               \
}

NNRT_SIGMOID_BWD_KERNEL(float, f)
NNRT_SIGMOID_BWD_KERNEL(double, d)

/* torch.optim.SGD, element by element in the parameter's dtype:
 *   d = g + wd p;  buf = d (first step) or momentum buf + (1 - dampening) d
 *   d = d + momentum buf (nesterov) or buf;  p -= lr d
 * buf NULL: no momentum. */
#define NNRT_SGD_KERNEL(T, SUF)                                                              \
NNRT_CLONES                                                                               \
static void nnrt_sgd_##SUF(T *p, const T *g, T *buf, ptrdiff_t n, T lr, T momentum,       \
                           T one_minus_dampening, T wd, int nesterov, int fresh) {        \
    if (buf == NULL && wd == 0) {                                                         \
        for (ptrdiff_t i = 0; i < n; i++) p[i] -= g[i] * lr;                              \
        return;                                                                           \
    }                                                                                     \
    for (ptrdiff_t i = 0; i < n; i++) {                                                   \
        T d = g[i];                                                                       \
        if (wd != 0) d = d + p[i] * wd;                                                   \
        if (buf != NULL) {                                                                \
            T b;                                                                          \
            if (fresh) b = d;                                                             \
            else if (one_minus_dampening != 1) b = buf[i] * momentum + d * one_minus_dampening; \
            else b = buf[i] * momentum + d;                                               \
            buf[i] = b;                                                                   \
            d = nesterov ? d + b * momentum : b;                                          \
        }                                                                                 \
        p[i] -= d * lr;                                                                   \
    }                                                                                     \
}

NNRT_SGD_KERNEL(float, f)
NNRT_SGD_KERNEL(double, d)

/* torch.optim.Adam / AdamW, element by element in T, every operation rounded to T in
 * the order of nnrt.optim's numpy path (so both give identical results):
 *   AdamW (decoupled, wd != 0): p = p * (1 - lr wd)   Adam (l2): g = g + p wd
 *   m = m + (g - m) w  (w = 1 - beta1 < 0.5)  or  m = g - (g - m) (1 - w)  (torch's lerp)
 *   v = v beta2 + (g (1 - beta2)) g
 *   p = p - (m / (sqrt(v) / sqrt(bc2) + eps)) step_size                                 */
#define NNRT_ADAM_KERNEL(T, SUF, SQRT)                                                       \
NNRT_CLONES                                                                               \
static void nnrt_adam_##SUF(T *p, const T *g, T *m, T *v, ptrdiff_t n, int decoupled,     \
                            int l2, T decay, T wd, int lerp_small, T w, T omw, T beta2,   \
                            T omb2, T sqrt_bc2, T eps, T step_size) {                     \
    for (ptrdiff_t i = 0; i < n; i++) {                                                   \
        T gi = g[i];                                                                      \
        T pi = p[i];                                                                      \
        if (decoupled) pi = pi * decay;                                                   \
        else if (l2) gi = gi + pi * wd;                                                   \
        T d = gi - m[i];                                                                  \
        T mi = lerp_small ? m[i] + d * w : gi - d * omw;                                  \
        m[i] = mi;                                                                        \
        T vi = v[i] * beta2 + (gi * omb2) * gi;                                           \
        v[i] = vi;                                                                        \
        p[i] = pi - (mi / (SQRT(vi) / sqrt_bc2 + eps)) * step_size;                       \
    }                                                                                     \
}

NNRT_ADAM_KERNEL(float, f, sqrtf)
NNRT_ADAM_KERNEL(double, d, sqrt)

/* float64 sigmoid over an array (libm exp: not vectorised). */
static void nnrt_sigmoid_array(const double *x, double *s, ptrdiff_t n) {
    for (ptrdiff_t i = 0; i < n; i++) s[i] = nnrt_sigmoid(x[i]);
}

/* exp(x) in float64 for x <= 0, vectorisable: x = n ln2 + r (ln2 split in two, so
 * n ln2_hi is exact), |r| <= ln2/2, Taylor polynomial of degree 13 (truncation below
 * 5e-18), 2^n from the exponent bits (n from the rounding constant's low bits: integer
 * ops only, which AVX2 has too). Within ~2 ulp of libm's exp; exp(0) = 1 exactly;
 * 0 below -708 (where exp(x) leaves the normal range); NaN stays NaN. */
static inline double nnrt_exp_nonpos(double x) {
    const double magic = 6755399441055744.0; /* 1.5 * 2^52 */
    double xc = x < -708.0 ? -708.0 : x;
    double t = xc * 1.4426950408889634074 + magic;
    double n = t - magic;
    double r = xc - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t tb;
    memcpy(&tb, &t, sizeof tb);
    int64_t bits = (tb - (int64_t)0x4338000000000000LL + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    double e = p * scale;
    return x < -708.0 ? 0.0 : e;
}

/* Softmax cross-entropy of rows lo..hi-1 of x (c classes, labels in range), in float64
 * whatever T is:
 *   row_loss[i] = logsumexp(x_i) - x_i[y_i]   (from the row max m_i)
 *   dY_i = (softmax(x_i) - onehot(y_i)) * inv_n, rounded to T
 * Blocks of rows: z = x - m into a float64 scratch, exp over the whole block in one
 * vectorised pass (libm's scalar exp was a third of a tiny step's loss), then each
 * row's sum (in order), log and scale. A scratch that does not fit on the stack
 * (c > NNRT_CE_SCRATCH) is malloc'd; 1 is returned, computing nothing, if that fails. */
#define NNRT_CE_SCRATCH 1024
#define NNRT_SOFTMAX_CE_KERNEL(T, SUF)                                                       \
NNRT_CLONES                                                                               \
static int nnrt_softmax_ce_##SUF(const T *x, const int64_t *y, T *dY, double *row_loss,   \
                                 ptrdiff_t lo, ptrdiff_t hi, ptrdiff_t c, double inv_n) { \
    double stack[NNRT_CE_SCRATCH];                                                        \
    double *w = stack;                                                                    \
    ptrdiff_t block = NNRT_CE_SCRATCH / c;                                                \
    if (block < 1) {                                                                      \
        w = (double *)malloc((size_t)c * sizeof(double));                                 \
        if (w == NULL) return 1;                                                          \
        block = 1;                                                                        \
    }                                                                                     \
    for (ptrdiff_t i0 = lo; i0 < hi; i0 += block) {                                       \
        ptrdiff_t i1 = i0 + block < hi ? i0 + block : hi;                                 \
        for (ptrdiff_t i = i0; i < i1; i++) {                                             \
            const T *xr = x + i * c;                                                      \
            double *wr = w + (i - i0) * c;                                                \
            T m = xr[0];                                                                  \
            for (ptrdiff_t j = 1; j < c; j++)                                             \
                if (xr[j] > m) m = xr[j];                                                 \
            for (ptrdiff_t j = 0; j < c; j++) wr[j] = (double)xr[j] - (double)m;          \
            row_loss[i] = (double)m; /* kept for the last pass */                         \
        }                                                                                 \
        for (ptrdiff_t k = 0; k < (i1 - i0) * c; k++) w[k] = nnrt_exp_nonpos(w[k]);       \
        for (ptrdiff_t i = i0; i < i1; i++) {                                             \
            const T *xr = x + i * c;                                                      \
            const double *wr = w + (i - i0) * c;                                          \
            T *dr = dY + i * c;                                                           \
            int64_t label = y[i];                                                         \
            double s = 0;                                                                 \
            for (ptrdiff_t j = 0; j < c; j++) s += wr[j];                                 \
            row_loss[i] = log(s) - ((double)xr[label] - row_loss[i]);                     \
            s = inv_n / s;                                                                \
            for (ptrdiff_t j = 0; j < c; j++) dr[j] = (T)(wr[j] * s);                     \
            dr[label] = (T)(wr[label] * s - inv_n);                                       \
        }                                                                                 \
    }                                                                                     \
    if (w != stack) free(w);                                                              \
    return 0;                                                                             \
}

NNRT_SOFTMAX_CE_KERNEL(float, f)
NNRT_SOFTMAX_CE_KERNEL(double, d)

#ifdef NNRT_VMATH_PUSHED
#pragma GCC pop_options
#endif

#endif /* NNRT_VMATH_H */
