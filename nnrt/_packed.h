/* Packed-weight kernels of frozen inference sessions (nnrt/_serve.pyx).
 *
 * A session's weights never change, so they are packed once, at freeze time, into
 * panels of NNRT_PANEL_VECS vectors of columns (96 float32 or 48 float64 columns on
 * 64-byte vectors): panel q holds W[:, q*P : (q+1)*P] row after row, contiguous
 * (k x P). The last panel holds only the columns that remain, rounded up to whole
 * vectors (k x Pq, zero-padded to Pq columns): no multiply-add is spent on padding
 * beyond the last vector (a layer 512 wide is 5 panels of 96 and one of 32, not six
 * of 96). The whole copy holds k * round_up(n, lanes) elements. A panel (k x P:
 * 300-400 KB for k = 784-1024 float32) is read as one sequential stream and stays
 * in L2 while every block of rows of X goes over it: W is read from memory once per
 * call whatever the batch, and at one row the product is a GEMV over that stream.
 *
 * Y (m x n, row-major) = X (m x k) @ W, panel by panel (nnrt_packed_{f,d} computes
 * panels q0 .. q1-1, so a caller can split the panels over threads); per panel, rows
 * in blocks whose tile of accumulators fits the 32 vector registers (a full panel of
 * 6 vectors: 4 rows x 6 vectors, 1.5-3 % faster than 8 rows x 3 vectors in two halves
 * on Zen 5; a last panel of NV < 6 vectors: 8 rows x NV (NV <= 3), 6 x 4, 4 x 5; then
 * 4, 2, 1 rows).
 * Every output element is the chain acc = 0; acc += x[p] * w[p] over p = 0 .. k-1
 * in order, contracted to fused multiply-adds, as in the eval path's small-M kernel
 * (nnrt/_smallm.h): a row gives the same bits in any batch, whichever tile or
 * thread computes it. The bias and the sigmoid are then applied to the panel's
 * columns of every row while they are in L1 (nnrt_pk_epilogue below).
 * GCC vector extensions; NNRT_CLONES (nnrt/_vmath.h) compiles AVX-512, AVX2 and
 * baseline builds picked at load.
 *
 * Also here, for the live network's eval path (nnrt/dense.pyx), which cannot pack
 * (W may change between calls): nnrt_rows_cols (2-4 rows on a W beyond L2, W streamed
 * in order), the small-M kernel's chains (the same bits), built for AVX-512 only,
 * where that kernel serves the eval path.
 */
#ifndef NNRT_PACKED_H
#define NNRT_PACKED_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include "_vmath.h"
#include "_smallm.h"

#define NNRT_PANEL_VECS 6

#if defined(__GNUC__) || defined(__clang__)
typedef float nnrt_pk_vf __attribute__((vector_size(64)));
typedef float nnrt_pk_vf_u __attribute__((vector_size(64), aligned(4)));
typedef double nnrt_pk_vd __attribute__((vector_size(64)));
typedef double nnrt_pk_vd_u __attribute__((vector_size(64), aligned(8)));
#define NNRT_PACKED_VECTOR 1
#endif

/* lanes of a 64-byte vector, columns per full panel, panels of a layer n wide */
#define NNRT_PK_LANES_f 16
#define NNRT_PK_LANES_d 8
static ptrdiff_t nnrt_panel_cols_f(void) { return NNRT_PANEL_VECS * NNRT_PK_LANES_f; }
static ptrdiff_t nnrt_panel_cols_d(void) { return NNRT_PANEL_VECS * NNRT_PK_LANES_d; }
static ptrdiff_t nnrt_panels_f(ptrdiff_t n) { return (n + nnrt_panel_cols_f() - 1) / nnrt_panel_cols_f(); }
static ptrdiff_t nnrt_panels_d(ptrdiff_t n) { return (n + nnrt_panel_cols_d() - 1) / nnrt_panel_cols_d(); }
/* elements of the packed copy of a k x n W */
static ptrdiff_t nnrt_packed_size_f(ptrdiff_t k, ptrdiff_t n) {
    return k * ((n + NNRT_PK_LANES_f - 1) / NNRT_PK_LANES_f * NNRT_PK_LANES_f);
}
static ptrdiff_t nnrt_packed_size_d(ptrdiff_t k, ptrdiff_t n) {
    return k * ((n + NNRT_PK_LANES_d - 1) / NNRT_PK_LANES_d * NNRT_PK_LANES_d);
}

/* Pack W (k x n, row-major) into panels (see above): Wp holds
 * nnrt_packed_size(k, n) elements; panel q starts at Wp + q k P. */
#define NNRT_PACK(T, SUF, L)                                                              \
static void nnrt_pack_##SUF(const T *W, T *Wp, ptrdiff_t k, ptrdiff_t n) {                \
    const ptrdiff_t P = NNRT_PANEL_VECS * (L);                                            \
    ptrdiff_t q, p, c, np = (n + P - 1) / P;                                              \
    for (q = 0; q < np; q++) {                                                            \
        ptrdiff_t j0 = q * P, w = n - j0 < P ? n - j0 : P;                                 \
        ptrdiff_t pw = (w + (L) - 1) / (L) * (L);                                          \
        T *dst = Wp + q * k * P;                                                          \
        for (p = 0; p < k; p++) {                                                         \
            for (c = 0; c < w; c++) dst[p * pw + c] = W[p * n + j0 + c];                   \
            for (; c < pw; c++) dst[p * pw + c] = 0;                                      \
        }                                                                                 \
    }                                                                                     \
}
NNRT_PACK(float, f, NNRT_PK_LANES_f)
NNRT_PACK(double, d, NNRT_PK_LANES_d)

/* The epilogue of columns j0 .. j0+w-1 of rows 0 .. m-1 of Y (row stride ldy):
 * y = sigmoid(y + b) (bias NULL: no addition; act 0: no sigmoid). The float32 sigmoid
 * is nnrt/_vmath.h's formula (exp(-|x|) by the Cephes polynomial, then 1 / (1 + z))
 * with its multiply-adds contracted to FMAs: 25 % faster than the eval path's
 * separate pass (64 x 512: 8 vs 11 us), within 2 ulp of it. Every path of a session
 * applies this one (nnrt/_serve.pyx), so a row gives the same bits in any batch. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#pragma GCC optimize("fp-contract=fast")
#endif
static inline float nnrt_pk_sigmoidf(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float ax = x < 0.0f ? -x : x;
    float xc = ax > 87.3f ? -87.3f : -ax;
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
    float z = ax > 87.3f ? 0.0f : p * scale; /* exp(-|x|) */
    float d = 1.0f / (1.0f + z);
    return x >= 0.0f ? d : z * d;
}
#define NNRT_PK_EPILOGUE(T, SUF, SIGMOID)                                                 \
NNRT_CLONES                                                                               \
static void nnrt_pk_epilogue_##SUF(T *Y, ptrdiff_t m, ptrdiff_t w, ptrdiff_t ldy,         \
                                   const T *bias, int act) {                              \
    for (ptrdiff_t i = 0; i < m; i++) {                                                   \
        T *y = Y + i * ldy;                                                               \
        if (bias && act == 1)                                                             \
            for (ptrdiff_t j = 0; j < w; j++) y[j] = SIGMOID(y[j] + bias[j]);            \
        else if (bias)                                                                    \
            for (ptrdiff_t j = 0; j < w; j++) y[j] = y[j] + bias[j];                      \
        else if (act == 1)                                                                \
            for (ptrdiff_t j = 0; j < w; j++) y[j] = SIGMOID(y[j]);                       \
    }                                                                                     \
}
NNRT_PK_EPILOGUE(float, f, nnrt_pk_sigmoidf)
NNRT_PK_EPILOGUE(double, d, nnrt_sigmoid)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

#ifdef NNRT_PACKED_VECTOR
/* rows i0 .. i0+MR-1 x vectors v0 .. v0+NV-1 of the panel at `panel` (row stride pw
 * elements, columns j0 ..): into Y directly when all columns exist, else through tmp
 * (the padded columns dropped) */
#define NNRT_PK_TILE(T, V, VU, L, MR, NV, v0)                                             \
    do {                                                                                  \
        V acc[MR][NV];                                                                    \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                              \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[r][v] = (V){0};      \
        const T *wp = panel + (v0) * L;                                                   \
        const T *xp = X + i0 * k;                                                         \
        for (ptrdiff_t p = 0; p < k; p++, wp += pw) {                                     \
            V w[NV];                                                                      \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                          \
                w[v] = *(const VU *)(wp + v * L);                                          \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                        \
                V x = (V){0} + xp[r * k + p];                                             \
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                      \
                    acc[r][v] += x * w[v];                                                \
            }                                                                             \
        }                                                                                 \
        ptrdiff_t jt = j0 + (v0) * L;                                                     \
        if (jt + NV * L <= n) {                                                           \
            for (int r = 0; r < MR; r++)                                                  \
                for (int v = 0; v < NV; v++)                                              \
                    *(VU *)(Y + (i0 + r) * n + jt + v * L) = acc[r][v];                   \
        } else if (jt < n) {                                                              \
            T tmp[NV * L];                                                                \
            for (int r = 0; r < MR; r++) {                                                \
                for (int v = 0; v < NV; v++) *(VU *)(tmp + v * L) = acc[r][v];           \
                memcpy(Y + (i0 + r) * n + jt, tmp, (size_t)(n - jt) * sizeof(T));       \
            }                                                                             \
        }                                                                                 \
    } while (0)

/* every row of a panel of NV vectors: blocks of MR rows, then 4, 2, 1 */
#define NNRT_PK_ROWS(T, V, VU, L, MR, NV)                                                 \
    do {                                                                                  \
        for (; i0 + MR <= m; i0 += MR) NNRT_PK_TILE(T, V, VU, L, MR, NV, 0);              \
        if (MR > 4)                                                                       \
            for (; i0 + 4 <= m; i0 += 4) NNRT_PK_TILE(T, V, VU, L, 4, NV, 0);             \
        for (; i0 + 2 <= m; i0 += 2) NNRT_PK_TILE(T, V, VU, L, 2, NV, 0);                 \
        for (; i0 < m; i0++) NNRT_PK_TILE(T, V, VU, L, 1, NV, 0);                         \
    } while (0)

/* panels q0 .. q1-1 (each 64-byte aligned: the caller's buffer, and q k P L is a
 * multiple of 64 bytes), then the epilogue of their columns */
#define NNRT_PACKED_KERNEL(T, SUF, V, VU, L)                                              \
NNRT_CLONES                                                                               \
static void nnrt_packed_##SUF(const T *X, const T *Wp, T *Y, ptrdiff_t m, ptrdiff_t k,    \
                              ptrdiff_t n, ptrdiff_t q0, ptrdiff_t q1, const T *bias,     \
                              int act) {                                                  \
    const ptrdiff_t P = NNRT_PANEL_VECS * L;                                              \
    for (ptrdiff_t q = q0; q < q1; q++) {                                                 \
        const T *panel = Wp + q * k * P;                                                  \
        const ptrdiff_t j0 = q * P, w = n - j0 < P ? n - j0 : P;                          \
        const ptrdiff_t nv = (w + L - 1) / L, pw = nv * L;                                \
        ptrdiff_t i0 = 0;                                                                 \
        switch (nv) {                                                                     \
        case 6: NNRT_PK_ROWS(T, V, VU, L, 4, 6); break;                                   \
        case 5: NNRT_PK_ROWS(T, V, VU, L, 4, 5); break;                                   \
        case 4: NNRT_PK_ROWS(T, V, VU, L, 6, 4); break;                                   \
        case 3: NNRT_PK_ROWS(T, V, VU, L, 8, 3); break;                                   \
        case 2: NNRT_PK_ROWS(T, V, VU, L, 8, 2); break;                                   \
        default: NNRT_PK_ROWS(T, V, VU, L, 8, 1); break;                                  \
        }                                                                                 \
        if (bias || act)                                                                  \
            nnrt_pk_epilogue_##SUF(Y + j0, m, w, n, bias ? bias + j0 : NULL, act);        \
    }                                                                                     \
}
NNRT_PACKED_KERNEL(float, f, nnrt_pk_vf, nnrt_pk_vf_u, 16)
NNRT_PACKED_KERNEL(double, d, nnrt_pk_vd, nnrt_pk_vd_u, 8)
#else
/* no vector extensions: the same sums in scalar code */
#define NNRT_PACKED_SCALAR(T, SUF, L)                                                     \
static void nnrt_packed_##SUF(const T *X, const T *Wp, T *Y, ptrdiff_t m, ptrdiff_t k,    \
                              ptrdiff_t n, ptrdiff_t q0, ptrdiff_t q1, const T *bias,     \
                              int act) {                                                  \
    const ptrdiff_t P = NNRT_PANEL_VECS * L;                                              \
    for (ptrdiff_t q = q0; q < q1; q++) {                                                 \
        const ptrdiff_t j0 = q * P, w = n - j0 < P ? n - j0 : P;                          \
        const ptrdiff_t pw = (w + L - 1) / L * L;                                         \
        const T *panel = Wp + q * k * P;                                                  \
        for (ptrdiff_t i = 0; i < m; i++)                                                 \
            for (ptrdiff_t c = 0; c < w; c++) {                                           \
                T s = 0;                                                                  \
                for (ptrdiff_t p = 0; p < k; p++) s += X[i * k + p] * panel[p * pw + c];  \
                Y[i * n + j0 + c] = s;                                                    \
            }                                                                             \
        if (bias || act)                                                                  \
            nnrt_pk_epilogue_##SUF(Y + j0, m, w, n, bias ? bias + j0 : NULL, act);        \
    }                                                                                     \
}
NNRT_PACKED_SCALAR(float, f, 16)
NNRT_PACKED_SCALAR(double, d, 8)
#endif

#if defined(NNRT_SMALLM_X86) && defined(NNRT_SMALLM_VECTOR)
/* nnrt_rows_cols_{f,d}: Y[:, j0:j1] = X (m x k, m <= 8) @ W[:, j0:j1] on a row-major W,
 * W streamed PU rows at a time (PU sequential streams), the m rows' slices of Y kept
 * in L1 and each loaded and stored once per PU rows of W (the live eval path's few
 * rows on a W beyond L2, where the blocked small-M kernel reads W in 192-byte pieces
 * 4 KB apart). The same chain per element as the small-M kernel: the same bits. Only
 * where that kernel's AVX-512 build runs (nnrt_rows_cols_ok()). */
#define NNRT_ROWS_STEP(T, V, VU, L, MR, PU, J)                                            \
    do {                                                                                  \
        V acc[MR];                                                                        \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                              \
            acc[r] = p == 0 ? (V){0} : *(const VU *)(Y + r * n + (J));                    \
        _Pragma("GCC unroll 4") for (int u = 0; u < PU; u++) {                            \
            V w = *(const VU *)(W + (p + u) * n + (J));                                   \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) acc[r] += xb[u][r] * w;  \
        }                                                                                 \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                              \
            *(VU *)(Y + r * n + (J)) = acc[r];                                            \
    } while (0)
#define NNRT_ROWS_BLOCK(T, V, VU, L, MR, PU)                                              \
    do {                                                                                  \
        V xb[PU][MR];                                                                     \
        _Pragma("GCC unroll 4") for (int u = 0; u < PU; u++)                              \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                          \
                xb[u][r] = (V){0} + X[r * k + p + u];                                     \
        for (j = j0; j + L <= j1; j += L) NNRT_ROWS_STEP(T, V, VU, L, MR, PU, j);        \
        for (; j < j1; j++)                                                               \
            for (int r = 0; r < MR; r++) {                                                \
                T s = p == 0 ? (T)0 : Y[r * n + j];                                       \
                for (int u = 0; u < PU; u++) s = s + X[r * k + p + u] * W[(p + u) * n + j]; \
                Y[r * n + j] = s;                                                         \
            }                                                                             \
    } while (0)
#define NNRT_ROWS_M(T, V, VU, L, MR, PU)                                                  \
    do {                                                                                  \
        ptrdiff_t p = 0, j;                                                               \
        for (; p + PU <= k; p += PU) NNRT_ROWS_BLOCK(T, V, VU, L, MR, PU);                \
        for (; p < k; p++) NNRT_ROWS_BLOCK(T, V, VU, L, MR, 1);                           \
    } while (0)
#define NNRT_ROWS_COLS(T, SUF, V, VU, L)                                                  \
__attribute__((target("avx512f,avx512vl,fma")))                                          \
static void nnrt_rows_cols_##SUF(const T *X, const T *W, T *Y, ptrdiff_t m, ptrdiff_t k, \
                                 ptrdiff_t n, ptrdiff_t j0, ptrdiff_t j1) {              \
    switch (m) {                                                                          \
    case 1: NNRT_ROWS_M(T, V, VU, L, 1, 4); break;                                        \
    case 2: NNRT_ROWS_M(T, V, VU, L, 2, 4); break;                                        \
    case 3: NNRT_ROWS_M(T, V, VU, L, 3, 4); break;                                        \
    case 4: NNRT_ROWS_M(T, V, VU, L, 4, 4); break;                                        \
    case 5: NNRT_ROWS_M(T, V, VU, L, 5, 2); break;                                        \
    case 6: NNRT_ROWS_M(T, V, VU, L, 6, 2); break;                                        \
    case 7: NNRT_ROWS_M(T, V, VU, L, 7, 2); break;                                        \
    default: NNRT_ROWS_M(T, V, VU, L, 8, 2); break;                                       \
    }                                                                                     \
}
NNRT_ROWS_COLS(float, f, nnrt_v16f, nnrt_v16f_u, 16)
NNRT_ROWS_COLS(double, d, nnrt_v8d, nnrt_v8d_u, 8)
static int nnrt_rows_cols_ok(void) { return nnrt_smallm_level() == 2; }
#else
#define NNRT_ROWS_COLS_NONE(T, SUF)                                                       \
static void nnrt_rows_cols_##SUF(const T *X, const T *W, T *Y, ptrdiff_t m, ptrdiff_t k, \
                                 ptrdiff_t n, ptrdiff_t j0, ptrdiff_t j1) {              \
    (void)X; (void)W; (void)Y; (void)m; (void)k; (void)n; (void)j0; (void)j1;             \
}
NNRT_ROWS_COLS_NONE(float, f)
NNRT_ROWS_COLS_NONE(double, d)
static int nnrt_rows_cols_ok(void) { return 0; }
#endif

#endif /* NNRT_PACKED_H */
