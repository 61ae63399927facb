/* Packed-weight kernels of frozen inference sessions (nnrt/_serve.pyx).
 *
 * A session's weights never change, so they are packed once, at freeze time, into
 * panels of NNRT_PANEL_VECS vectors of columns (96 float32 or 48 float64 columns on
 * 64-byte vectors): panel q holds W[:, q*P : (q+1)*P] row after row, contiguous
 * (k x P), the last panel zero-padded to P columns. A panel (k x P: 300-400 KB for
 * k = 784-1024 float32) is then read as one sequential stream and stays in L2 while
 * every block of rows of X goes over it: W is read from memory once per call
 * whatever the batch.
 *
 * Y (m x n, row-major) = X (m x k) @ W: per panel, rows in blocks of 8 (8 rows x 3
 * vectors: 24 accumulators, the panel in two halves), then 4 rows x 6 vectors, 2 x 6
 * and 1 x 6. Every output element is the chain acc = 0; acc += x[p] * w[p] over
 * p = 0 .. k-1 in order, contracted to fused multiply-adds, as in the eval path's
 * small-M kernel (nnrt/_smallm.h), so a row gives the same bits in any batch.
 * GCC vector extensions; NNRT_CLONES (nnrt/_vmath.h) compiles AVX-512, AVX2 and
 * baseline builds picked at load. The session uses it only where the eval path
 * uses the small-M kernel (AVX-512 CPUs, layers >= 32 wide and a multiple of 8).
 */
#ifndef NNRT_PACKED_H
#define NNRT_PACKED_H

#include <stddef.h>
#include <string.h>
#include "_vmath.h"

#define NNRT_PANEL_VECS 6

#if defined(__GNUC__) || defined(__clang__)
typedef float nnrt_pk_vf __attribute__((vector_size(64)));
typedef float nnrt_pk_vf_u __attribute__((vector_size(64), aligned(4)));
typedef double nnrt_pk_vd __attribute__((vector_size(64)));
typedef double nnrt_pk_vd_u __attribute__((vector_size(64), aligned(8)));
#define NNRT_PACKED_VECTOR 1
#endif

/* columns per panel */
static ptrdiff_t nnrt_panel_cols_f(void) { return NNRT_PANEL_VECS * 16; }
static ptrdiff_t nnrt_panel_cols_d(void) { return NNRT_PANEL_VECS * 8; }

/* Pack W (k x n, row-major) into panels (see above): Wp holds
 * ceil(n / P) * k * P elements. */
#define NNRT_PACK(T, SUF, P)                                                              \
static void nnrt_pack_##SUF(const T *W, T *Wp, ptrdiff_t k, ptrdiff_t n) {                \
    ptrdiff_t q, p, c, np = (n + (P) - 1) / (P);                                           \
    for (q = 0; q < np; q++) {                                                            \
        ptrdiff_t j0 = q * (P), w = n - j0 < (P) ? n - j0 : (P);                            \
        T *dst = Wp + q * k * (P);                                                         \
        for (p = 0; p < k; p++) {                                                         \
            for (c = 0; c < w; c++) dst[p * (P) + c] = W[p * n + j0 + c];                   \
            for (; c < (P); c++) dst[p * (P) + c] = 0;                                     \
        }                                                                                 \
    }                                                                                     \
}
NNRT_PACK(float, f, NNRT_PANEL_VECS * 16)
NNRT_PACK(double, d, NNRT_PANEL_VECS * 8)

#ifdef NNRT_PACKED_VECTOR
/* rows i0 .. i0+MR-1 of one panel's vectors v0 .. v0+NV-1 (L lanes each): into Y
 * directly when all columns exist, else through tmp (the padded columns dropped) */
#define NNRT_PK_TILE(T, V, VU, L, P, MR, NV, v0)                                          \
    do {                                                                                  \
        V acc[MR][NV];                                                                    \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                              \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[r][v] = (V){0};      \
        const T *wp = panel + (v0) * L;                                                   \
        const T *xp = X + i0 * k;                                                         \
        for (ptrdiff_t p = 0; p < k; p++, wp += (P)) {                                    \
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

/* panels must be 64-byte aligned (the caller's buffer; Wp + q k P keeps it: P L is a
 * multiple of 64 bytes) */
#define NNRT_PACKED_KERNEL(T, SUF, V, VU, L)                                              \
NNRT_CLONES                                                                               \
static void nnrt_packed_##SUF(const T *X, const T *Wp, T *Y, ptrdiff_t m, ptrdiff_t k,    \
                              ptrdiff_t n) {                                              \
    const ptrdiff_t P = NNRT_PANEL_VECS * L, np = (n + P - 1) / P;                        \
    for (ptrdiff_t q = 0; q < np; q++) {                                                  \
        const T *panel = Wp + q * k * P;                                                  \
        const ptrdiff_t j0 = q * P;                                                       \
        ptrdiff_t i0 = 0;                                                                 \
        for (; i0 + 8 <= m; i0 += 8) {                                                    \
            NNRT_PK_TILE(T, V, VU, L, P, 8, 3, 0);                                        \
            NNRT_PK_TILE(T, V, VU, L, P, 8, 3, 3);                                        \
        }                                                                                 \
        for (; i0 + 4 <= m; i0 += 4) NNRT_PK_TILE(T, V, VU, L, P, 4, 6, 0);               \
        for (; i0 + 2 <= m; i0 += 2) NNRT_PK_TILE(T, V, VU, L, P, 2, 6, 0);               \
        for (; i0 < m; i0++) NNRT_PK_TILE(T, V, VU, L, P, 1, 6, 0);                       \
    }                                                                                     \
}
NNRT_PACKED_KERNEL(float, f, nnrt_pk_vf, nnrt_pk_vf_u, 16)
NNRT_PACKED_KERNEL(double, d, nnrt_pk_vd, nnrt_pk_vd_u, 8)
#else
/* no vector extensions: the same sums in scalar code */
#define NNRT_PACKED_SCALAR(T, SUF, L)                                                     \
static void nnrt_packed_##SUF(const T *X, const T *Wp, T *Y, ptrdiff_t m, ptrdiff_t k,    \
                              ptrdiff_t n) {                                              \
    const ptrdiff_t P = NNRT_PANEL_VECS * L;                                              \
    for (ptrdiff_t i = 0; i < m; i++)                                                     \
        for (ptrdiff_t j = 0; j < n; j++) {                                               \
            const T *w = Wp + (j / P) * k * P + j % P;                                    \
            T s = 0;                                                                      \
            for (ptrdiff_t p = 0; p < k; p++) s += X[i * k + p] * w[p * P];               \
            Y[i * n + j] = s;                                                             \
        }                                                                                 \
}
NNRT_PACKED_SCALAR(float, f, 16)
NNRT_PACKED_SCALAR(double, d, 8)
#endif

#endif /* NNRT_PACKED_H */
