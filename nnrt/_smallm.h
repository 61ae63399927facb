/* nnrt's GEMM kernel: the eval path's (nnrt/dense.pyx, nnrt/_serve.pyx) and the
 * training GEMM route's (nnrt/_blas.pyx).
 *
 * nnrt_smallm_{f,d}: row-major Y (m x n) = X (m x k) @ W (k x n).
 *   A BLAS GEMM packs W (k x n: the whole weight matrix) into its own panel layout
 *   on every call; at a batch of a few rows that copy costs as much as the product.
 *   This kernel reads W in place, once per block of MR rows, register-blocked as MR
 *   rows x NV vectors of columns (AVX-512: 8 x 3 vectors, 24 accumulators, 3 loads of
 *   W and 8 broadcasts of X per step of k, the broadcasts folded into the FMAs), over
 *   blocks of kc rows of W that every row block reads from L1/L2 before the next
 *   block is streamed in; outputs wider than 512 columns in panels of 288, so that the
 *   blocks of k stay deep (227 rows of float32) and Y is reloaded rarely. From 512
 *   rows, a W that is not 64-byte aligned or whose rows are an even number of cache
 *   lines apart is first copied into an aligned buffer with an odd number of lines per
 *   row. Packing W into panels (as a BLAS does) was measured and lost: 3-10 % slower
 *   than this at every benchmark shape on Zen 5, the packing included.
 *   GCC vector extensions (portable C; AVX-512 and AVX2+FMA builds of it are picked
 *   at run time from the CPU). The caller chooses this kernel or GEMM by the shape
 *   (nnrt/dense.pyx, measured crossover).
 * nnrt_gemm_s_{f,d}: the same loops with strided X (as stored or transposed) and any
 *   row strides: the training route's NN and TN products.
 * nnrt_transpose_{f,d}: W^T into a scratch buffer for the NT route (8 x 8 / 4 x 4
 *   register blocks).
 * Every output element is one chain of fused multiply-adds over p = 0 .. k-1 in order,
 *   whatever block, panel, copy or call computes it: a row's result does not depend on
 *   the rows that share its call (batch size, the row split over threads).
 * The eval forward's epilogue (bias, a following affine, sigmoid) is nnrt/_eval.h.
 */
#ifndef NNRT_SMALLM_H
#define NNRT_SMALLM_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "_vmath.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) \
    && !defined(NNRT_DEBUG_BUILD)
/* x86-64: an AVX-512 build (64-byte vectors) and an AVX2+FMA build (32-byte vectors),
 * picked once at run time from the CPU; SSE2 otherwise */
#define NNRT_SMALLM_X86 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define NNRT_SMALLM_VECTOR 1
/* the _u types may sit at any element boundary (unaligned loads and stores) */
typedef float nnrt_v16f __attribute__((vector_size(64)));
typedef float nnrt_v16f_u __attribute__((vector_size(64), aligned(4)));
typedef double nnrt_v8d __attribute__((vector_size(64)));
typedef double nnrt_v8d_u __attribute__((vector_size(64), aligned(8)));
typedef float nnrt_v8f __attribute__((vector_size(32)));
typedef float nnrt_v8f_u __attribute__((vector_size(32), aligned(4)));
typedef double nnrt_v4d __attribute__((vector_size(32)));
typedef double nnrt_v4d_u __attribute__((vector_size(32), aligned(8)));
typedef float nnrt_v4f __attribute__((vector_size(16)));
typedef float nnrt_v4f_u __attribute__((vector_size(16), aligned(4)));
typedef double nnrt_v2d __attribute__((vector_size(16)));
typedef double nnrt_v2d_u __attribute__((vector_size(16), aligned(8)));
typedef float nnrt_v2f __attribute__((vector_size(8)));
typedef float nnrt_v2f_u __attribute__((vector_size(8), aligned(4)));
typedef double nnrt_v1d __attribute__((vector_size(8)));
typedef double nnrt_v1d_u __attribute__((vector_size(8), aligned(8)));
#endif

/* Depth of a block of k (kc <= 0 picks it): kc rows of W (kc n elements, contiguous)
 * stay in L1/L2 while every row block reads them: about 256 KB of W per block, 64 to
 * 256 rows deep. Measured on Zen 5 (AVX-512, 1 MB L2) on the benchmark shapes: whole
 * rows of W in 64-row blocks beat 192-column panels 256 rows deep by 5-40%; between
 * 32 and 256 rows the differences were within the noise (a few %), 32 the slowest. */
#ifndef NNRT_SMALLM_WIDE
#define NNRT_SMALLM_WIDE 512
#endif
#ifndef NNRT_SMALLM_NC
#define NNRT_SMALLM_NC 288
#endif
static ptrdiff_t nnrt_smallm_kc(ptrdiff_t n, size_t elsize) {
    if (n > NNRT_SMALLM_WIDE) n = NNRT_SMALLM_NC;
    ptrdiff_t kc = (ptrdiff_t)(262144 / ((size_t)(n > 0 ? n : 1) * elsize));
    return kc < 64 ? 64 : kc > 256 ? 256 : kc;
}

/* From this many rows a W whose rows are not 64-byte aligned, or are an even number of
 * 64-byte lines apart, is first copied into an aligned buffer whose rows are an odd
 * number of lines apart: the kernel's vector loads of W then never straddle two cache
 * lines, and its rows do not share L1 sets. Measured on Zen 5 at 1024 x 1024 x
 * 1024 (float32): 217-222 -> 233-240 GFLOP/s, the copy included; at 256 rows the copy
 * costs what it saves. The same sums either way. */
#define NNRT_ALIGN_MIN_M 512
#ifdef _WIN32
#include <malloc.h>
static void *nnrt_aligned_alloc(size_t bytes) {
    return _aligned_malloc(bytes ? bytes : 64, 64);
}
static void nnrt_aligned_free(void *p) { _aligned_free(p); }
#else
static void *nnrt_aligned_alloc(size_t bytes) {
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 64) != 0) return NULL;
    return p;
}
static void nnrt_aligned_free(void *p) { free(p); }
#endif
/* row stride (elements) of an aligned copy of rows of n elements: an odd number of
 * 64-byte lines (consecutive rows then fall in different L1 sets; rows 1, 2 or 4 KB
 * apart would share a few) */
static ptrdiff_t nnrt_aligned_ld(ptrdiff_t n, size_t elsize) {
    const ptrdiff_t per = (ptrdiff_t)(64 / elsize);
    ptrdiff_t lines = (n + per - 1) / per;
    return (lines | 1) * per;
}
/* Background prefetch (the training GEMM route only): lines the calling thread will
 * read soon, e.g. the rows of fit's next batch, scattered over a data set larger than
 * the caches. A burst of prefetches stalls the core as a copy does (the miss buffers
 * fill); one prefetch every NNRT_BGPF_EVERY steps of k of the kernel's inner loop
 * overlaps them with the FMAs instead, so that the next gather copies from L2/L3
 * rather than from memory. Per thread: the queue (nnrt/_blas.pyx sets and clears it)
 * holds its own copy of the rows' byte offsets; the base address is only prefetched,
 * never read (a prefetch does not fault). A prefetch changes no result. */
typedef struct {
    const char *base;
    ptrdiff_t *off;       /* byte offsets of the rows from base (owned, malloc'd) */
    ptrdiff_t cap, n, i;  /* entries allocated, queued; the next row */
    ptrdiff_t row, o;     /* bytes per row; the next offset within row i */
} nnrt_bgpf_t;
#if defined(__GNUC__) || defined(__clang__)
static __thread nnrt_bgpf_t nnrt_bgpf;
#define NNRT_BGPF_GET() (&nnrt_bgpf)
#else
#define NNRT_BGPF_GET() ((nnrt_bgpf_t *)NULL)
#endif
#ifndef NNRT_BGPF_EVERY
#define NNRT_BGPF_EVERY 16
#endif
/* Queue rows[0..n) of base (each row_bytes long; rows holds row indices) for this
 * thread's kernel GEMMs to prefetch, replacing what was queued; returns the number of
 * lines queued, -1 if the offsets could not be allocated (nothing queued then). */
static ptrdiff_t nnrt_bgpf_set(const char *base, const ptrdiff_t *rows, ptrdiff_t n,
                               ptrdiff_t row_bytes) {
    nnrt_bgpf_t *q = NNRT_BGPF_GET();
    if (q == NULL) return 0;
    q->n = q->i = q->o = 0;
    if (n <= 0 || row_bytes <= 0) return 0;
    if (n > q->cap) {
        ptrdiff_t *off = (ptrdiff_t *)realloc(q->off, (size_t)n * sizeof(ptrdiff_t));
        if (off == NULL) return -1;
        q->off = off;
        q->cap = n;
    }
    for (ptrdiff_t i = 0; i < n; i++) q->off[i] = rows[i] * row_bytes;
    q->base = base;
    q->row = row_bytes;
    q->n = n;
    return n * ((row_bytes + 63) / 64);
}
/* Lines still queued on this thread (the first of them partly done). */
static ptrdiff_t nnrt_bgpf_left(void) {
    nnrt_bgpf_t *q = NNRT_BGPF_GET();
    if (q == NULL || q->i >= q->n) return 0;
    return (q->n - q->i) * ((q->row + 63) / 64) - q->o / 64;
}
/* Empty the queue; release != 0 frees its offsets too. */
static void nnrt_bgpf_clear(int release) {
    nnrt_bgpf_t *q = NNRT_BGPF_GET();
    if (q == NULL) return;
    q->n = q->i = q->o = 0;
    q->base = NULL;
    if (release) {
        free(q->off);
        q->off = NULL;
        q->cap = 0;
    }
}
#define NNRT_BGPF_TICK(q, p)                                                              \
    do {                                                                                  \
        if (((p) & (NNRT_BGPF_EVERY - 1)) == 0 && (q) != NULL && (q)->i < (q)->n) {       \
            __builtin_prefetch((q)->base + (q)->off[(q)->i] + (q)->o, 0, 1);              \
            if (((q)->o += 64) >= (q)->row) {                                             \
                (q)->o = 0;                                                               \
                (q)->i++;                                                                 \
            }                                                                             \
        }                                                                                 \
    } while (0)

#ifdef NNRT_SMALLM_VECTOR
/* One block: rows i0 .. i0+MR-1, columns j .. j+NV*L-1, k in [k0, k1); the first
 * block of k starts from 0, the others add to Y. */
#define NNRT_SMALLM_BLOCK(T, V, VU, L, MR, NV)                                            \
    do {                                                                                  \
        V acc[MR][NV];                                                                    \
        for (int r = 0; r < MR; r++)                                                      \
            for (int v = 0; v < NV; v++)                                                  \
                acc[r][v] = k0 == 0 && !acc_y ? (V){0}                                   \
                                : *(const VU *)(Y + (i0 + r) * ldy + j + v * L);          \
        const T *wp = W + k0 * ldw + j;                                                   \
        const T *xp = X + i0 * xi;                                                        \
        for (ptrdiff_t p = k0; p < k1; p++, wp += ldw) {                                  \
            NNRT_BGPF_TICK(bg, p);                                                        \
            V w[NV];                                                                      \
            for (int v = 0; v < NV; v++) w[v] = *(const VU *)(wp + v * L);                \
            for (int r = 0; r < MR; r++) {                                                \
                V x = xp[r * xi + p * xk] - (V){0}; /* broadcast: x - 0 is x */           \
                for (int v = 0; v < NV; v++) acc[r][v] += x * w[v];                       \
            }                                                                             \
        }                                                                                 \
        for (int r = 0; r < MR; r++)                                                      \
            for (int v = 0; v < NV; v++)                                                  \
                *(VU *)(Y + (i0 + r) * ldy + j + v * L) = acc[r][v];                      \
    } while (0)

/* Rows i0 .. i0+MR-1 over the panel's columns: full blocks of NV vectors, then single
 * 8, 4, 2, 1 vectors, then one of a half-width vector type (H, L/2 lanes), then scalars. */
#define NNRT_SMALLM_ROWS(T, V, VU, L, H, HU, MR, NV)                                      \
    do {                                                                                  \
        ptrdiff_t j = j0;                                                                 \
        for (; j + NV * L <= j1; j += NV * L) NNRT_SMALLM_BLOCK(T, V, VU, L, MR, NV);     \
        if (NV > 8)                                                                       \
            for (; j + 8 * L <= j1; j += 8 * L) NNRT_SMALLM_BLOCK(T, V, VU, L, MR, 8);    \
        if (NV > 4)                                                                       \
            for (; j + 4 * L <= j1; j += 4 * L) NNRT_SMALLM_BLOCK(T, V, VU, L, MR, 4);    \
        if (NV > 2)                                                                       \
            for (; j + 2 * L <= j1; j += 2 * L) NNRT_SMALLM_BLOCK(T, V, VU, L, MR, 2);    \
        for (; j + L <= j1; j += L) NNRT_SMALLM_BLOCK(T, V, VU, L, MR, 1);                \
        for (; j + L / 2 <= j1; j += L / 2) NNRT_SMALLM_BLOCK(T, H, HU, L / 2, MR, 1);    \
        for (; j < j1; j++) {                                                             \
            for (int r = 0; r < MR; r++) {                                                \
                const T *xr = X + (i0 + r) * xi;                                          \
                T s = k0 == 0 && !acc_y ? (T)0 : Y[(i0 + r) * ldy + j];                  \
                for (ptrdiff_t p = k0; p < k1; p++) s += xr[p * xk] * W[p * ldw + j];     \
                Y[(i0 + r) * ldy + j] = s;                                                \
            }                                                                             \
        }                                                                                 \
    } while (0)

/* W larger than this (bytes) is streamed row by row at a batch of one */
#define NNRT_SMALLM_ROW_BYTES 524288

/* One row, W streamed in order (p outer, columns inner, the output row kept in L1): as
 * fast as a BLAS GEMV on a W too large for L2 (1024 x 1024 float32: 40 vs 56 us for the
 * blocked kernel; on a W in L2 the blocked kernel wins: 784 x 128, 2.2 vs 3.3 us). Every output element is the same chain
 * of fused multiply-adds over p = 0 .. k-1 as in the blocked kernel below, so a row's
 * result does not depend on the batch it came in. */
#define NNRT_SMALLM_ROW1(NAME, ATTR, T, V, VU, L, H, HU)                                  \
ATTR static void NAME(const T *x, const T *W, T *y, ptrdiff_t k, ptrdiff_t n) {           \
    for (ptrdiff_t j = 0; j < n; j++) y[j] = 0;                                           \
    for (ptrdiff_t p = 0; p < k; p++) {                                                   \
        const T *w = W + p * n;                                                           \
        const T xp = x[p];                                                                \
        const V xv = xp - (V){0};                                                         \
        const H xh = xp - (H){0};                                                         \
        ptrdiff_t j = 0;                                                                  \
        for (; j + L <= n; j += L)                                                        \
            *(VU *)(y + j) = *(const VU *)(y + j) + xv * *(const VU *)(w + j);            \
        for (; j + L / 2 <= n; j += L / 2)                                                \
            *(HU *)(y + j) = *(const HU *)(y + j) + xh * *(const HU *)(w + j);            \
        for (; j < n; j++) y[j] = y[j] + xp * w[j];                                       \
    }                                                                                     \
}

/* Blocks of kc rows of W (contiguous in memory: read once, sequentially, then served
 * from L1/L2 to every row block); rows in blocks of MR, then 4, then 3, 2 and 1 with
 * wider blocks (4 NV / 3, 2 NV, 4 NV vectors), which keep enough independent sums in
 * flight. */
#define NNRT_SMALLM_LOOPS(T, V, VU, L, H, HU, MR, NV)                                     \
    const ptrdiff_t ncb = n > NNRT_SMALLM_WIDE ? NNRT_SMALLM_NC : n;                      \
    for (ptrdiff_t j0 = 0; j0 < n; j0 += ncb) {                                           \
        const ptrdiff_t j1 = j0 + ncb < n ? j0 + ncb : n;                                 \
        for (ptrdiff_t k0 = 0; k0 < k; k0 += kc) {                                        \
            ptrdiff_t k1 = k0 + kc < k ? k0 + kc : k;                                     \
            ptrdiff_t i0 = 0;                                                             \
            for (; i0 + MR <= m; i0 += MR) NNRT_SMALLM_ROWS(T, V, VU, L, H, HU, MR, NV);  \
            for (; i0 + 4 <= m; i0 += 4) NNRT_SMALLM_ROWS(T, V, VU, L, H, HU, 4, NV);     \
            for (; i0 + 3 <= m; i0 += 3)                                                  \
                NNRT_SMALLM_ROWS(T, V, VU, L, H, HU, 3, 4 * NV / 3);                      \
            for (; i0 + 2 <= m; i0 += 2) NNRT_SMALLM_ROWS(T, V, VU, L, H, HU, 2, 2 * NV); \
            for (; i0 < m; i0++) NNRT_SMALLM_ROWS(T, V, VU, L, H, HU, 1, 4 * NV);         \
        }                                                                                 \
    }

/* The packed kernel: X row-major (row stride k), W and Y row-major (row stride n).
 * The constant strides make it the same code, and the same sums, as before the strided
 * variant below shared its loops. */
#define NNRT_SMALLM_KERNEL(NAME, ATTR, T, V, VU, L, H, HU, MR, NV)                        \
ATTR static void NAME(const T *X, const T *W, T *Y, ptrdiff_t m, ptrdiff_t k,             \
                      ptrdiff_t n, ptrdiff_t kc) {                                        \
    const ptrdiff_t xi = k, xk = 1, ldw = n, ldy = n;                                     \
    const int acc_y = 0;                                                                  \
    nnrt_bgpf_t *const bg = NULL; /* the eval kernel: no background prefetch */        \
    NNRT_SMALLM_LOOPS(T, V, VU, L, H, HU, MR, NV)                                         \
}

/* The strided kernel of the training GEMMs (nnrt/_blas.pyx): X element (i, p) at
 * X[i * xi + p * xk] (xi = lda, xk = 1: X as stored; xi = 1, xk = lda: X transposed,
 * as dW = X^T dY reads it), W and Y row-major with row strides ldw >= n, ldy >= n.
 * acc_y 0: Y = X W (Y not read); 1: Y = Y + X W (each sum starts from Y). */
#define NNRT_SMALLM_KERNEL_S(NAME, ATTR, T, V, VU, L, H, HU, MR, NV)                      \
ATTR static void NAME(const T *X, ptrdiff_t xi, ptrdiff_t xk, const T *W, ptrdiff_t ldw, \
                      T *Y, ptrdiff_t ldy, int acc_y, ptrdiff_t m, ptrdiff_t k,           \
                      ptrdiff_t n, ptrdiff_t kc) {                                        \
    nnrt_bgpf_t *const bg = NNRT_BGPF_GET();                                              \
    NNRT_SMALLM_LOOPS(T, V, VU, L, H, HU, MR, NV)                                         \
}

#define NNRT_NOATTR
#ifdef NNRT_SMALLM_X86
/* AVX-512: 32 vector registers: 8 rows x 3 vectors of 16 (24 accumulators) */
NNRT_SMALLM_KERNEL(nnrt_smallm_f_avx512, __attribute__((target("avx512f,avx512vl,fma"))),
                   float, nnrt_v16f, nnrt_v16f_u, 16, nnrt_v8f, nnrt_v8f_u, 8, 3)
NNRT_SMALLM_ROW1(nnrt_smallm_row_f_avx512, __attribute__((target("avx512f,avx512vl,fma"))),
                 float, nnrt_v16f, nnrt_v16f_u, 16, nnrt_v8f, nnrt_v8f_u)
NNRT_SMALLM_KERNEL(nnrt_smallm_d_avx512, __attribute__((target("avx512f,avx512vl,fma"))),
                   double, nnrt_v8d, nnrt_v8d_u, 8, nnrt_v4d, nnrt_v4d_u, 8, 3)
NNRT_SMALLM_ROW1(nnrt_smallm_row_d_avx512, __attribute__((target("avx512f,avx512vl,fma"))),
                 double, nnrt_v8d, nnrt_v8d_u, 8, nnrt_v4d, nnrt_v4d_u)
NNRT_SMALLM_KERNEL_S(nnrt_gemm_s_f_avx512, __attribute__((target("avx512f,avx512vl,fma"))),
                     float, nnrt_v16f, nnrt_v16f_u, 16, nnrt_v8f, nnrt_v8f_u, 8, 3)
NNRT_SMALLM_KERNEL_S(nnrt_gemm_s_d_avx512, __attribute__((target("avx512f,avx512vl,fma"))),
                     double, nnrt_v8d, nnrt_v8d_u, 8, nnrt_v4d, nnrt_v4d_u, 8, 3)
/* AVX2 + FMA: 16 registers: 4 rows x 3 vectors of 8 (12 accumulators) */
NNRT_SMALLM_KERNEL(nnrt_smallm_f_avx2, __attribute__((target("avx2,fma"))),
                   float, nnrt_v8f, nnrt_v8f_u, 8, nnrt_v4f, nnrt_v4f_u, 4, 3)
NNRT_SMALLM_ROW1(nnrt_smallm_row_f_avx2, __attribute__((target("avx2,fma"))),
                 float, nnrt_v8f, nnrt_v8f_u, 8, nnrt_v4f, nnrt_v4f_u)
NNRT_SMALLM_KERNEL(nnrt_smallm_d_avx2, __attribute__((target("avx2,fma"))),
                   double, nnrt_v4d, nnrt_v4d_u, 4, nnrt_v2d, nnrt_v2d_u, 4, 3)
NNRT_SMALLM_ROW1(nnrt_smallm_row_d_avx2, __attribute__((target("avx2,fma"))),
                 double, nnrt_v4d, nnrt_v4d_u, 4, nnrt_v2d, nnrt_v2d_u)
NNRT_SMALLM_KERNEL_S(nnrt_gemm_s_f_avx2, __attribute__((target("avx2,fma"))),
                     float, nnrt_v8f, nnrt_v8f_u, 8, nnrt_v4f, nnrt_v4f_u, 4, 3)
NNRT_SMALLM_KERNEL_S(nnrt_gemm_s_d_avx2, __attribute__((target("avx2,fma"))),
                     double, nnrt_v4d, nnrt_v4d_u, 4, nnrt_v2d, nnrt_v2d_u, 4, 3)
#endif
/* baseline (SSE2 on x86-64, whatever 16-byte vectors the target has elsewhere) */
NNRT_SMALLM_KERNEL_S(nnrt_gemm_s_f_base, NNRT_NOATTR, float, nnrt_v4f, nnrt_v4f_u, 4,
                     nnrt_v2f, nnrt_v2f_u, 4, 3)
NNRT_SMALLM_KERNEL_S(nnrt_gemm_s_d_base, NNRT_NOATTR, double, nnrt_v2d, nnrt_v2d_u, 2,
                     nnrt_v1d, nnrt_v1d_u, 4, 3)
NNRT_SMALLM_KERNEL(nnrt_smallm_f_base, NNRT_NOATTR, float, nnrt_v4f, nnrt_v4f_u, 4,
                   nnrt_v2f, nnrt_v2f_u, 4, 3)
NNRT_SMALLM_KERNEL(nnrt_smallm_d_base, NNRT_NOATTR, double, nnrt_v2d, nnrt_v2d_u, 2,
                   nnrt_v1d, nnrt_v1d_u, 4, 3)
NNRT_SMALLM_ROW1(nnrt_smallm_row_f_base, NNRT_NOATTR, float, nnrt_v4f, nnrt_v4f_u, 4,
                 nnrt_v2f, nnrt_v2f_u)
NNRT_SMALLM_ROW1(nnrt_smallm_row_d_base, NNRT_NOATTR, double, nnrt_v2d, nnrt_v2d_u, 2,
                 nnrt_v1d, nnrt_v1d_u)

/* nnrt_transpose_{f,d}: BT (k x n, row stride ldt >= n) = B^T, B n x k with row stride
 * ldb:
 * the NT route's copy of W^T (nnrt/_blas.pyx). Blocks of 8 x 8 floats (4 x 4 doubles)
 * moved through registers by shuffles (AVX2 builds), 16 (8) rows of B at a time so
 * that every line of BT is written whole; the ragged edges one element at a time. */
#define NNRT_TRANSPOSE_EDGES                                                              \
    for (ptrdiff_t j = 0; j < jv; j++)                                                    \
        for (ptrdiff_t p = pv; p < k; p++) BT[p * ldt + j] = B[j * ldb + p];              \
    for (ptrdiff_t j = jv; j < n; j++)                                                    \
        for (ptrdiff_t p = 0; p < k; p++) BT[p * ldt + j] = B[j * ldb + p];

static void nnrt_transpose_f_base(const float *B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t k,
                                  float *BT, ptrdiff_t ldt) {
    const ptrdiff_t jv = 0, pv = 0;
    NNRT_TRANSPOSE_EDGES
}
static void nnrt_transpose_d_base(const double *B, ptrdiff_t ldb, ptrdiff_t n,
                                  ptrdiff_t k, double *BT, ptrdiff_t ldt) {
    const ptrdiff_t jv = 0, pv = 0;
    NNRT_TRANSPOSE_EDGES
}

#ifdef NNRT_SMALLM_X86
typedef int nnrt_v8i __attribute__((vector_size(32)));
typedef long long nnrt_v4l __attribute__((vector_size(32)));
__attribute__((target("avx2,fma"))) static void
nnrt_transpose_f_avx2(const float *B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t k, float *BT,
                      ptrdiff_t ldt) {
    const ptrdiff_t jv = n / 8 * 8, pv = k / 8 * 8;
    const nnrt_v8i lo1 = {0, 8, 1, 9, 4, 12, 5, 13}, hi1 = {2, 10, 3, 11, 6, 14, 7, 15};
    const nnrt_v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
    const nnrt_v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
    for (ptrdiff_t j0 = 0; j0 < jv; j0 += 16) { /* 16 rows of B: whole lines of BT */
        const ptrdiff_t j1 = j0 + 16 <= jv ? j0 + 16 : jv;
        for (ptrdiff_t p0 = 0; p0 < pv; p0 += 8) {
            for (ptrdiff_t j = j0; j < j1; j += 8) {
                nnrt_v8f r[8], t[8], u[8];
                for (int i = 0; i < 8; i++)
                    r[i] = *(const nnrt_v8f_u *)(B + (j + i) * ldb + p0);
                for (int i = 0; i < 8; i += 2) {
                    t[i] = __builtin_shuffle(r[i], r[i + 1], lo1);
                    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi1);
                }
                for (int h = 0; h < 8; h += 4) {
                    u[h] = __builtin_shuffle(t[h], t[h + 2], lo2);
                    u[h + 1] = __builtin_shuffle(t[h], t[h + 2], hi2);
                    u[h + 2] = __builtin_shuffle(t[h + 1], t[h + 3], lo2);
                    u[h + 3] = __builtin_shuffle(t[h + 1], t[h + 3], hi2);
                }
                for (int c = 0; c < 4; c++) {
                    *(nnrt_v8f_u *)(BT + (p0 + c) * ldt + j) =
                        __builtin_shuffle(u[c], u[c + 4], lo4);
                    *(nnrt_v8f_u *)(BT + (p0 + c + 4) * ldt + j) =
                        __builtin_shuffle(u[c], u[c + 4], hi4);
                }
            }
        }
    }
    NNRT_TRANSPOSE_EDGES
}
__attribute__((target("avx2,fma"))) static void
nnrt_transpose_d_avx2(const double *B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t k, double *BT,
                      ptrdiff_t ldt) {
    const ptrdiff_t jv = n / 4 * 4, pv = k / 4 * 4;
    const nnrt_v4l lo1 = {0, 4, 2, 6}, hi1 = {1, 5, 3, 7};
    const nnrt_v4l lo2 = {0, 1, 4, 5}, hi2 = {2, 3, 6, 7};
    for (ptrdiff_t j0 = 0; j0 < jv; j0 += 8) {
        const ptrdiff_t j1 = j0 + 8 <= jv ? j0 + 8 : jv;
        for (ptrdiff_t p0 = 0; p0 < pv; p0 += 4) {
            for (ptrdiff_t j = j0; j < j1; j += 4) {
                nnrt_v4d r[4], t[4];
                for (int i = 0; i < 4; i++)
                    r[i] = *(const nnrt_v4d_u *)(B + (j + i) * ldb + p0);
                t[0] = __builtin_shuffle(r[0], r[1], lo1);
                t[1] = __builtin_shuffle(r[0], r[1], hi1);
                t[2] = __builtin_shuffle(r[2], r[3], lo1);
                t[3] = __builtin_shuffle(r[2], r[3], hi1);
                double *o = BT + p0 * ldt + j;
                *(nnrt_v4d_u *)o = __builtin_shuffle(t[0], t[2], lo2);
                *(nnrt_v4d_u *)(o + ldt) = __builtin_shuffle(t[1], t[3], lo2);
                *(nnrt_v4d_u *)(o + 2 * ldt) = __builtin_shuffle(t[0], t[2], hi2);
                *(nnrt_v4d_u *)(o + 3 * ldt) = __builtin_shuffle(t[1], t[3], hi2);
            }
        }
    }
    NNRT_TRANSPOSE_EDGES
}
#endif

#ifdef NNRT_SMALLM_X86
/* 2: AVX-512F, 1: AVX2 + FMA, 0: neither (checked once; a race writes the same value) */
static int nnrt_smallm_isa = -1;
static int nnrt_smallm_level(void) {
    if (nnrt_smallm_isa < 0) {
        __builtin_cpu_init();
        nnrt_smallm_isa = __builtin_cpu_supports("avx512f") ? 2
            : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
    }
    return nnrt_smallm_isa;
}
#endif

/* 1 when the eval forward should use nnrt_smallm (at every batch: a row's result must
 * not depend on the batch it came in, so the choice is by layer, not by batch size).
 * AVX-512 only. Measured on AMD Zen 5, one thread, the benchmark's shapes: against
 * numpy's OpenBLAS 0.3.31 with its own AVX-512 kernels the small-M kernel was 1.2-4.8x
 * faster up to 64 rows, even at 256 and 1-13% slower at 1024; with
 * OPENBLAS_CORETYPE=Haswell (AVX2 kernels, as set on the project's machines) 1.6-2.5x
 * faster up to 1024 rows. With AVX2 only (the same kernel at 32 bytes) it lost to GEMM
 * from about 48 rows (up to 1.7x at 64): GEMM there, as on every other CPU. */
static int nnrt_smallm_enabled(void) {
#ifdef NNRT_SMALLM_X86
    return nnrt_smallm_level() == 2;
#else
    return 0;
#endif
}

/* "avx512", "avx2" or "baseline": the build nnrt_smallm runs. */
static const char *nnrt_smallm_isa_name(void) {
#ifdef NNRT_SMALLM_X86
    int level = nnrt_smallm_level();
    return level == 2 ? "avx512" : level == 1 ? "avx2" : "baseline";
#else
    return "baseline";
#endif
}

/* the copy is skipped above this size (a large layer's weight is not duplicated) */
#define NNRT_ALIGN_MAX_BYTES ((size_t)32 << 20)
static int nnrt_copy_pays(const void *W, ptrdiff_t ldw, size_t elsize, ptrdiff_t m,
                          ptrdiff_t k, ptrdiff_t n) {
    return m >= NNRT_ALIGN_MIN_M
           && (size_t)k * (size_t)nnrt_aligned_ld(n, elsize) * elsize
                  <= NNRT_ALIGN_MAX_BYTES
           && ((uintptr_t)W % 64 != 0 || (size_t)ldw * elsize % 64 != 0
               || (size_t)ldw * elsize / 64 % 2 == 0);
}

static void nnrt_gemm_s_f(const float *X, ptrdiff_t xi, ptrdiff_t xk, const float *W,
                          ptrdiff_t ldw, float *Y, ptrdiff_t ldy, int acc_y, ptrdiff_t m,
                          ptrdiff_t k, ptrdiff_t n);
static void nnrt_gemm_s_d(const double *X, ptrdiff_t xi, ptrdiff_t xk, const double *W,
                          ptrdiff_t ldw, double *Y, ptrdiff_t ldy, int acc_y, ptrdiff_t m,
                          ptrdiff_t k, ptrdiff_t n);

/* Y (m x n) = X (m x k) W (k x n), all row-major and contiguous: the eval forward's
 * small-M entry (float: nnrt_smallm_f, double: nnrt_smallm_d). */
#ifdef NNRT_SMALLM_X86
#define NNRT_SMALLM_ENTRY_X86(S)                                                           \
    int level = nnrt_smallm_level();                                                       \
    if (level == 2) {                                                                      \
        if (m == 1 && row) nnrt_smallm_row_##S##_avx512(X, W, Y, k, n);                    \
        else nnrt_smallm_##S##_avx512(X, W, Y, m, k, n, kc);                               \
        return;                                                                            \
    }                                                                                      \
    if (level == 1) {                                                                      \
        if (m == 1 && row) nnrt_smallm_row_##S##_avx2(X, W, Y, k, n);                      \
        else nnrt_smallm_##S##_avx2(X, W, Y, m, k, n, kc);                                 \
        return;                                                                            \
    }
#else
#define NNRT_SMALLM_ENTRY_X86(S)
#endif
#define NNRT_SMALLM_ENTRY(T, S)                                                            \
static void nnrt_smallm_##S(const T *X, const T *W, T *Y, ptrdiff_t m, ptrdiff_t k,        \
                            ptrdiff_t n, ptrdiff_t kc) {                                   \
    if (kc <= 0) kc = nnrt_smallm_kc(n, sizeof(T));                                        \
    if (nnrt_copy_pays(W, n, sizeof(T), m, k, n)) { /* through an aligned copy of W */     \
        nnrt_gemm_s_##S(X, k, 1, W, n, Y, n, 0, m, k, n);                                  \
        return;                                                                            \
    }                                                                                      \
    /* one row streams W in order when W does not fit in L2 (the blocked kernel's          \
     * registers then wait on memory); the same sums either way */                         \
    int row = (size_t)k * (size_t)n * sizeof(T) > NNRT_SMALLM_ROW_BYTES;                   \
    NNRT_SMALLM_ENTRY_X86(S)                                                               \
    if (m == 1 && row) nnrt_smallm_row_##S##_base(X, W, Y, k, n);                          \
    else nnrt_smallm_##S##_base(X, W, Y, m, k, n, kc);                                     \
}
NNRT_SMALLM_ENTRY(float, f)
NNRT_SMALLM_ENTRY(double, d)

/* nnrt_gemm_s_{f,d}: Y (m x n, row stride ldy) = op(X) (m x k) @ W (k x n, row stride
 * ldw), X element (i, p) at X[i * xi + p * xk], plus Y itself when acc_y (else Y is
 * written, never read). The
 * training GEMM route of nnrt/_blas.pyx (chosen there by measurement). */
#define NNRT_GEMM_S_DISPATCH(T, SUF)                                                      \
static void nnrt_gemm_s_##SUF##_run(const T *X, ptrdiff_t xi, ptrdiff_t xk, const T *W,   \
                                    ptrdiff_t ldw, T *Y, ptrdiff_t ldy, int acc_y,        \
                                    ptrdiff_t m, ptrdiff_t k, ptrdiff_t n, ptrdiff_t kc) {\
    NNRT_GEMM_S_X86(SUF)                                                                  \
    nnrt_gemm_s_##SUF##_base(X, xi, xk, W, ldw, Y, ldy, acc_y, m, k, n, kc);              \
}                                                                                         \
static void nnrt_gemm_s_##SUF(const T *X, ptrdiff_t xi, ptrdiff_t xk, const T *W,         \
                              ptrdiff_t ldw, T *Y, ptrdiff_t ldy, int acc_y,              \
                              ptrdiff_t m, ptrdiff_t k, ptrdiff_t n) {                    \
    ptrdiff_t kc = nnrt_smallm_kc(n, sizeof(T));                                          \
    if (nnrt_copy_pays(W, ldw, sizeof(T), m, k, n)) {                                     \
        const ptrdiff_t ld = nnrt_aligned_ld(n, sizeof(T));                               \
        T *Wc = (T *)nnrt_aligned_alloc((size_t)k * (size_t)ld * sizeof(T));              \
        if (Wc != NULL) {                                                                 \
            for (ptrdiff_t p = 0; p < k; p++)                                             \
                memcpy(Wc + p * ld, W + p * ldw, (size_t)n * sizeof(T));                  \
            nnrt_gemm_s_##SUF##_run(X, xi, xk, Wc, ld, Y, ldy, acc_y, m, k, n, kc);       \
            nnrt_aligned_free(Wc);                                                        \
            return;                                                                       \
        }                                                                                 \
    }                                                                                     \
    nnrt_gemm_s_##SUF##_run(X, xi, xk, W, ldw, Y, ldy, acc_y, m, k, n, kc);               \
}
#ifdef NNRT_SMALLM_X86
#define NNRT_GEMM_S_X86(SUF)                                                              \
    int level = nnrt_smallm_level();                                                      \
    if (level == 2) {                                                                     \
        nnrt_gemm_s_##SUF##_avx512(X, xi, xk, W, ldw, Y, ldy, acc_y, m, k, n, kc);        \
        return;                                                                           \
    }                                                                                     \
    if (level == 1) {                                                                     \
        nnrt_gemm_s_##SUF##_avx2(X, xi, xk, W, ldw, Y, ldy, acc_y, m, k, n, kc);          \
        return;                                                                           \
    }
#else
#define NNRT_GEMM_S_X86(SUF)
#endif
NNRT_GEMM_S_DISPATCH(float, f)
NNRT_GEMM_S_DISPATCH(double, d)

static void nnrt_transpose_f(const float *B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t k,
                             float *BT, ptrdiff_t ldt) {
#ifdef NNRT_SMALLM_X86
    if (nnrt_smallm_level() >= 1) {
        nnrt_transpose_f_avx2(B, ldb, n, k, BT, ldt);
        return;
    }
#endif
    nnrt_transpose_f_base(B, ldb, n, k, BT, ldt);
}
static void nnrt_transpose_d(const double *B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t k,
                             double *BT, ptrdiff_t ldt) {
#ifdef NNRT_SMALLM_X86
    if (nnrt_smallm_level() >= 1) {
        nnrt_transpose_d_avx2(B, ldb, n, k, BT, ldt);
        return;
    }
#endif
    nnrt_transpose_d_base(B, ldb, n, k, BT, ldt);
}
#else
/* other compilers: the plain triple loop (the caller uses GEMM there anyway) */
#define NNRT_SMALLM_PLAIN(T, SUF)                                                         \
static void nnrt_smallm_##SUF(const T *X, const T *W, T *Y, ptrdiff_t m, ptrdiff_t k,     \
                              ptrdiff_t n, ptrdiff_t kc) {                                \
    (void)kc;                                                                             \
    for (ptrdiff_t i = 0; i < m; i++) {                                                   \
        for (ptrdiff_t j = 0; j < n; j++) Y[i * n + j] = 0;                               \
        for (ptrdiff_t p = 0; p < k; p++) {                                               \
            T x = X[i * k + p];                                                           \
            for (ptrdiff_t j = 0; j < n; j++) Y[i * n + j] += x * W[p * n + j];           \
        }                                                                                 \
    }                                                                                     \
}
NNRT_SMALLM_PLAIN(float, f)
NNRT_SMALLM_PLAIN(double, d)
#define NNRT_GEMM_S_PLAIN(T, SUF)                                                         \
static void nnrt_gemm_s_##SUF(const T *X, ptrdiff_t xi, ptrdiff_t xk, const T *W,         \
                              ptrdiff_t ldw, T *Y, ptrdiff_t ldy, int acc_y,              \
                              ptrdiff_t m, ptrdiff_t k, ptrdiff_t n) {                    \
    for (ptrdiff_t i = 0; i < m; i++) {                                                   \
        if (!acc_y)                                                                       \
            for (ptrdiff_t j = 0; j < n; j++) Y[i * ldy + j] = 0;                         \
        for (ptrdiff_t p = 0; p < k; p++) {                                               \
            T x = X[i * xi + p * xk];                                                     \
            for (ptrdiff_t j = 0; j < n; j++) Y[i * ldy + j] += x * W[p * ldw + j];       \
        }                                                                                 \
    }                                                                                     \
}
NNRT_GEMM_S_PLAIN(float, f)
NNRT_GEMM_S_PLAIN(double, d)
#define NNRT_TRANSPOSE_PLAIN(T, SUF)                                                      \
static void nnrt_transpose_##SUF(const T *B, ptrdiff_t ldb, ptrdiff_t n, ptrdiff_t k,      \
                                 T *BT, ptrdiff_t ldt) {                                  \
    for (ptrdiff_t j = 0; j < n; j++)                                                     \
        for (ptrdiff_t p = 0; p < k; p++) BT[p * ldt + j] = B[j * ldb + p];               \
}
NNRT_TRANSPOSE_PLAIN(float, f)
NNRT_TRANSPOSE_PLAIN(double, d)
#endif

#endif /* NNRT_SMALLM_H */
