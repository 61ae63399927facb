/* The live eval forward's own kernels (nnrt/dense.pyx dense_eval): its epilogue, and
 * the product of layers with narrow outputs.
 *
 * nnrt_ev_epilogue_{f,d}: after the GEMM of a dense layer, rows 0 .. m-1, columns
 * 0 .. w-1 of S (row stride lds), written to Y (row stride ldy; Y may be S itself):
 *   y = s + bias                       (bias non-NULL)
 *   y = (y - center) * scale + shift   (center non-NULL: a following layer's eval-mode
 *                                        per-feature affine, e.g. BatchNorm with its
 *                                        running statistics)
 *   y = sigmoid(y)                     (act 1: a following sigmoid)
 * Any part may be absent; with none, S is copied to Y (the padded narrow-output path).
 * Every operation rounds as in the separate layers' kernels (nnrt/_vmath.h, the
 * normalisation plugin's affine; no FMA contraction), so the fused eval chain gives the
 * bits of the layers run one by one (tests/test_fused.py), on every CPU and thread.
 *
 * NOTE: this pass is bound by arithmetic, not by memory: on AMD Zen 5 the float32
 * sigmoid cost 0.33 ns per element with Y in L1 as with Y in L3, and applying it to each
 * 8-row tile of the GEMM while the tile was in L1 measured no faster than one pass after
 * the GEMM (1024^3: 8.96 vs 8.86 ms). So the float32 pass on AVX-512 is written with
 * intrinsics, operation for operation the C formula (checked against it on all 2^32
 * float inputs: the same bits, NaN in -> NaN out), in fewer instructions than the
 * compiler's vectorisation of it (-|x| by one OR, the clamp by one max, the selects as
 * masked multiplies) and four vectors interleaved (the sigmoid is a long dependent
 * chain): 0.24 instead of 0.33 ns per element on Zen 5. Contracting its multiply-adds
 * (as the frozen session does, nnrt/_packed.h) would be faster still, but would change
 * the bits.
 */
#ifndef NNRT_EVAL_H
#define NNRT_EVAL_H

#include <stddef.h>
#include <string.h>
#include "_smallm.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#pragma GCC optimize("fp-contract=off")
#endif

/* the portable pass: plain loops the compiler vectorises (NNRT_CLONES) */
#define NNRT_EV_EPILOGUE(T, SUF, SIGMOID)                                                 \
NNRT_CLONES                                                                               \
static void nnrt_ev_epilogue_##SUF##_c(const T *S, ptrdiff_t lds, T *Y, ptrdiff_t ldy,    \
                                       ptrdiff_t m, ptrdiff_t w, const T *bias,           \
                                       const T *center, const T *scale, const T *shift,   \
                                       int act) {                                         \
    for (ptrdiff_t i = 0; i < m; i++) {                                                   \
        const T *s = S + i * lds;                                                         \
        T *y = Y + i * ldy;                                                               \
        if (bias && (center || act == 1)) {                                               \
            for (ptrdiff_t j = 0; j < w; j++) y[j] = s[j] + bias[j];                      \
            s = y;                                                                        \
        }                                                                                 \
        if (center && act == 1) {                                                         \
            for (ptrdiff_t j = 0; j < w; j++)                                             \
                y[j] = SIGMOID((s[j] - center[j]) * scale[j] + shift[j]);                 \
        } else if (center) {                                                              \
            for (ptrdiff_t j = 0; j < w; j++) y[j] = (s[j] - center[j]) * scale[j] + shift[j]; \
        } else if (act == 1) {                                                            \
            for (ptrdiff_t j = 0; j < w; j++) y[j] = SIGMOID(s[j]);                       \
        } else if (bias) {                                                                \
            for (ptrdiff_t j = 0; j < w; j++) y[j] = s[j] + bias[j];                      \
        } else if (y != s) {                                                              \
            memcpy(y, s, (size_t)w * sizeof(T));                                          \
        }                                                                                 \
    }                                                                                     \
}
NNRT_EV_EPILOGUE(float, f, nnrt_sigmoidf)
NNRT_EV_EPILOGUE(double, d, nnrt_sigmoid)

#ifdef NNRT_SMALLM_X86
#include <immintrin.h>
#define NNRT_EV_AVX512 __attribute__((target("avx512f")))

/* nnrt_sigmoidf (nnrt/_vmath.h) on 16 lanes, operation for operation */
NNRT_EV_AVX512 static inline __m512 nnrt_ev_sigmoid16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.3f), magic = _mm512_set1_ps(12582912.0f);
    const __m512 one = _mm512_set1_ps(1.0f);
    /* -|x| (the sign bit set), clamped below at -87.3 (max keeps a NaN: its 2nd operand) */
    __m512 nx = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(x),
                                                    _mm512_set1_epi32((int)0x80000000u)));
    __mmask16 keep = _mm512_cmp_ps_mask(nx, lo, _CMP_NLT_UQ); /* !(nx < -87.3) */
    __m512 xc = _mm512_max_ps(lo, nx);
    __m512 n = _mm512_sub_ps(
        _mm512_add_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)), magic), magic);
    __m512 r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), one);
    __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    __m512 z = _mm512_maskz_mul_ps(keep, p, _mm512_castsi512_ps(e)); /* exp(-|x|), or 0 */
    __m512 d = _mm512_div_ps(one, _mm512_add_ps(one, z));
    __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_NGE_UQ); /* !(x >= 0) */
    return _mm512_mask_mul_ps(d, neg, z, d);
}

/* one vector of columns j .. j+15 (lanes outside `mask` neither read nor written) */
NNRT_EV_AVX512 static inline __m512 nnrt_ev_pre16(__m512 v, __mmask16 mask, ptrdiff_t j,
                                                   const float *bias, const float *center,
                                                   const float *scale, const float *shift) {
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + j));
    if (center)
        v = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(v, _mm512_maskz_loadu_ps(mask, center + j)),
                                        _mm512_maskz_loadu_ps(mask, scale + j)),
                          _mm512_maskz_loadu_ps(mask, shift + j));
    return v;
}

NNRT_EV_AVX512 static void nnrt_ev_epilogue_f_avx512(const float *S, ptrdiff_t lds, float *Y,
                                                     ptrdiff_t ldy, ptrdiff_t m, ptrdiff_t w,
                                                     const float *bias, const float *center,
                                                     const float *scale, const float *shift,
                                                     int act) {
    const __mmask16 all = 0xFFFF;
    for (ptrdiff_t i = 0; i < m; i++) {
        const float *s = S + i * lds;
        float *y = Y + i * ldy;
        ptrdiff_t j = 0;
        for (; j + 64 <= w; j += 64) { /* four independent chains in flight */
            __m512 v[4];
            for (int u = 0; u < 4; u++)
                v[u] = nnrt_ev_pre16(_mm512_loadu_ps(s + j + 16 * u), all, j + 16 * u, bias,
                                     center, scale, shift);
            if (act == 1)
                for (int u = 0; u < 4; u++) v[u] = nnrt_ev_sigmoid16(v[u]);
            for (int u = 0; u < 4; u++) _mm512_storeu_ps(y + j + 16 * u, v[u]);
        }
        for (; j < w; j += 16) {
            const __mmask16 mask = w - j >= 16 ? all : (__mmask16)((1u << (w - j)) - 1u);
            __m512 v = nnrt_ev_pre16(_mm512_maskz_loadu_ps(mask, s + j), mask, j, bias, center,
                                     scale, shift);
            if (act == 1) v = nnrt_ev_sigmoid16(v);
            _mm512_mask_storeu_ps(y + j, mask, v);
        }
    }
}

#endif

static void nnrt_ev_epilogue_f(const float *S, ptrdiff_t lds, float *Y, ptrdiff_t ldy,
                               ptrdiff_t m, ptrdiff_t w, const float *bias,
                               const float *center, const float *scale, const float *shift,
                               int act) {
#ifdef NNRT_SMALLM_X86
    if (nnrt_smallm_level() == 2) {
        nnrt_ev_epilogue_f_avx512(S, lds, Y, ldy, m, w, bias, center, scale, shift, act);
        return;
    }
#endif
    nnrt_ev_epilogue_f_c(S, lds, Y, ldy, m, w, bias, center, scale, shift, act);
}

static void nnrt_ev_epilogue_d(const double *S, ptrdiff_t lds, double *Y, ptrdiff_t ldy,
                               ptrdiff_t m, ptrdiff_t w, const double *bias,
                               const double *center, const double *scale, const double *shift,
                               int act) {
    nnrt_ev_epilogue_d_c(S, lds, Y, ldy, m, w, bias, center, scale, shift, act);
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
#ifdef NNRT_SMALLM_X86
/* nnrt_ev_narrow_{f,d}: Y (m x n) = X (m x k) @ W (k x n), all row-major and contiguous,
 * for narrow outputs (n < 32: a classifier's head), where the small-M kernel would run
 * its last columns as scalars. W is read in place, each row of W as one to four vectors
 * whose lanes past n are masked off (neither read nor written); 8 rows of X per block (4
 * with three or four vectors), over blocks of 256 rows of W (in L1 while every row block
 * reads them). Every output element is one chain of fused multiply-adds over p = 0 ..
 * k-1 in order (contracted, as in nnrt/_smallm.h; a block of k stored to Y and read back
 * is exact), so a row's result depends neither on the batch it came in nor on the rows
 * a thread was given. Measured on AMD Zen 5, one thread, float32, against the BLAS GEMM
 * it replaces: 1024 x 1024 -> 10 0.30 -> 0.19 ms, 256 x 512 -> 10 35 -> 22 us, 1 and 4
 * rows of 1024 -> 10 2.5 -> 1.2 and 1.3 us. */
#define NNRT_EV_NARROW_KC 256
#define NNRT_EV_MASK(v, NV) ((v) == (NV) - 1 ? last : full)
/* W's rows as whole vectors: the lanes past n read the next rows of W (used by no
 * column; stored nowhere), in bounds before row `safe`; from there, masked loads */
#define NNRT_EV_NARROW_STEPS(V, VU, L, MR, NV, p0, p1, LOAD)                              \
    for (ptrdiff_t p = p0; p < p1; p++) {                                                 \
        V w[NV];                                                                          \
        for (int v = 0; v < NV; v++) w[v] = LOAD;                                         \
        for (int r = 0; r < MR; r++) {                                                    \
            V x = X[(i0 + r) * k + p] - (V){0}; /* broadcast: x - 0 is x */               \
            for (int v = 0; v < NV; v++) acc[r][v] += x * w[v];                           \
        }                                                                                 \
    }
#define NNRT_EV_NARROW_BLOCK(V, VU, L, MR, NV, LOADM, STOREM)                             \
    do {                                                                                  \
        V acc[MR][NV];                                                                    \
        for (int r = 0; r < MR; r++)                                                      \
            for (int v = 0; v < NV; v++)                                                  \
                acc[r][v] = k0 == 0 ? (V){0}                                              \
                                    : (V)LOADM(NNRT_EV_MASK(v, NV), Y + (i0 + r) * n + v * L); \
        const ptrdiff_t pm = k1 < safe ? k1 : safe > k0 ? safe : k0;                      \
        NNRT_EV_NARROW_STEPS(V, VU, L, MR, NV, k0, pm, *(const VU *)(W + p * n + v * L))  \
        NNRT_EV_NARROW_STEPS(V, VU, L, MR, NV, pm, k1,                                    \
                             (V)LOADM(NNRT_EV_MASK(v, NV), W + p * n + v * L))            \
        for (int r = 0; r < MR; r++)                                                      \
            for (int v = 0; v < NV; v++)                                                  \
                STOREM(Y + (i0 + r) * n + v * L, NNRT_EV_MASK(v, NV), acc[r][v]);         \
    } while (0)
#define NNRT_EV_NARROW_LOOPS(V, VU, L, MR, NV, LOADM, STOREM)                             \
    const ptrdiff_t safe = k - (NV * L + n - 1) / n;                                      \
    for (ptrdiff_t k0 = 0; k0 < k; k0 += NNRT_EV_NARROW_KC) {                             \
        const ptrdiff_t k1 = k0 + NNRT_EV_NARROW_KC < k ? k0 + NNRT_EV_NARROW_KC : k;     \
        ptrdiff_t i0 = 0;                                                                 \
        for (; i0 + MR <= m; i0 += MR)                                                    \
            NNRT_EV_NARROW_BLOCK(V, VU, L, MR, NV, LOADM, STOREM);                        \
        /* the rows left in blocks of 4 and 2: a row is one chain of k dependent FMAs, */ \
        /* so a block's rows run side by side in the time of one */                       \
        if (MR > 4)                                                                       \
            for (; i0 + 4 <= m; i0 += 4) NNRT_EV_NARROW_BLOCK(V, VU, L, 4, NV, LOADM, STOREM); \
        for (; i0 + 2 <= m; i0 += 2) NNRT_EV_NARROW_BLOCK(V, VU, L, 2, NV, LOADM, STOREM); \
        for (; i0 < m; i0++) NNRT_EV_NARROW_BLOCK(V, VU, L, 1, NV, LOADM, STOREM);        \
    }
#define NNRT_EV_NARROW(SUF, T, V, VU, L, MASKT, LOADM, STOREM)                                \
NNRT_EV_AVX512 static void nnrt_ev_narrow_##SUF##_avx512(const T *X, const T *W, T *Y,    \
                                                         ptrdiff_t m, ptrdiff_t k,        \
                                                         ptrdiff_t n) {                   \
    const int nv = (int)((n + L - 1) / L);                                                \
    /* the lanes that hold columns: all of them but in the last vector */                 \
    const MASKT full = (MASKT)((1u << L) - 1u);                                           \
    const MASKT last = (MASKT)((1u << (n - (ptrdiff_t)(nv - 1) * L)) - 1u);               \
    if (nv == 1) {                                                                        \
        NNRT_EV_NARROW_LOOPS(V, VU, L, 8, 1, LOADM, STOREM)                                   \
    } else if (nv == 2) {                                                                 \
        NNRT_EV_NARROW_LOOPS(V, VU, L, 8, 2, LOADM, STOREM)                                   \
    } else if (nv == 3) {                                                                 \
        NNRT_EV_NARROW_LOOPS(V, VU, L, 4, 3, LOADM, STOREM)                                   \
    } else {                                                                              \
        NNRT_EV_NARROW_LOOPS(V, VU, L, 4, 4, LOADM, STOREM)                                   \
    }                                                                                     \
}
NNRT_EV_NARROW(f, float, nnrt_v16f, nnrt_v16f_u, 16, __mmask16, _mm512_maskz_loadu_ps,
               _mm512_mask_storeu_ps)
NNRT_EV_NARROW(d, double, nnrt_v8d, nnrt_v8d_u, 8, __mmask8, _mm512_maskz_loadu_pd,
               _mm512_mask_storeu_pd)
#endif

/* 1 when nnrt_ev_narrow serves (AVX-512 builds on a CPU that has it) */
static int nnrt_ev_narrow_ok(void) {
#ifdef NNRT_SMALLM_X86
    return nnrt_smallm_level() == 2;
#else
    return 0;
#endif
}

/* n <= 4 vectors: 64 float32 or 32 float64 columns (the caller sends fewer than 32) */
static void nnrt_ev_narrow_f(const float *X, const float *W, float *Y, ptrdiff_t m,
                             ptrdiff_t k, ptrdiff_t n) {
#ifdef NNRT_SMALLM_X86
    nnrt_ev_narrow_f_avx512(X, W, Y, m, k, n);
#else
    (void)X; (void)W; (void)Y; (void)m; (void)k; (void)n;
#endif
}
static void nnrt_ev_narrow_d(const double *X, const double *W, double *Y, ptrdiff_t m,
                             ptrdiff_t k, ptrdiff_t n) {
#ifdef NNRT_SMALLM_X86
    nnrt_ev_narrow_d_avx512(X, W, Y, m, k, n);
#else
    (void)X; (void)W; (void)Y; (void)m; (void)k; (void)n;
#endif
}

#endif /* NNRT_EVAL_H */
