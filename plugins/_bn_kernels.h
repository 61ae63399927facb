/* Batch-normalisation kernels of the batchnorm plugin (used by plugins/_batchnorm.pyx
 * only; the core knows nothing of them).
 *
 * Built on nnrt/_vmath.h: its run-time clones (NNRT_CLONES) and its sigmoids, so the
 * fused batchnorm+sigmoid sweep computes exactly what the sigmoid plugin's kernel
 * does. Same floating-point rules as that header: no trapping math (so gcc
 * vectorises the selects) and no FMA contraction (every clone gives the same bits,
 * and the fused and separate batchnorm/sigmoid paths agree).
 */
#ifndef NNRT_PLUGINS_BN_KERNELS_H
#define NNRT_PLUGINS_BN_KERNELS_H

#include "nnrt/_vmath.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#pragma GCC optimize("fp-contract=off")
#define NNRT_BN_PUSHED 1
#endif

/* ------------------------------------------------------------------------
 * BatchNorm (+ sigmoid) kernels over row-major (n, f) arrays, for T = float
 * (suffix f) and double (suffix d). Inner loops run over features, so they
 * vectorise; statistics and sums accumulate in float64 whatever T is. With a
 * sigmoid: s = sigmoid(bn(x)) in one sweep forward, and backward recomputes
 * dz = ds * s * (1 - s) in both sweeps instead of storing it. Element-wise
 * operations are written in the same order as the separate layers' kernels, so
 * the fused and unfused results are identical (no FMA contraction: the clones
 * do not enable FMA).
 * ---------------------------------------------------------------------- */
#define NNRT_BN_KERNELS(T, SUF, SIGMOID)                                                     \
/* y = (x - center) * scale + shift; then s = sigmoid(y) when sig is set. */              \
NNRT_CLONES                                                                               \
static void nnrt_bn_affine_##SUF(const T *X, T *Y, ptrdiff_t n, ptrdiff_t f,              \
                                 const T *center, const T *scale, const T *shift,         \
                                 int sig) {                                               \
    for (ptrdiff_t i = 0; i < n; i++) {                                                   \
        const T *xr = X + i * f;                                                          \
        T *yr = Y + i * f;                                                                \
        if (sig) {                                                                        \
            for (ptrdiff_t j = 0; j < f; j++)                                             \
                yr[j] = SIGMOID((xr[j] - center[j]) * scale[j] + shift[j]);               \
        } else {                                                                          \
            for (ptrdiff_t j = 0; j < f; j++)                                             \
                yr[j] = (xr[j] - center[j]) * scale[j] + shift[j];                        \
        }                                                                                 \
    }                                                                                     \
}                                                                                         \
/* The batch statistics of the features [j0, j1) (rows f long; a split of the features     \
 * over threads gives the same bits, each feature's sums being one chain of operations).   \
 * One pass, float64 deviations from the first row (no cancellation):                      \
 * mean = K + S1/n, var = S2/n - (S1/n)^2. */                                              \
NNRT_CLONES                                                                                \
static void nnrt_bn_stats_cols_##SUF(const T *X, ptrdiff_t n, ptrdiff_t f, ptrdiff_t j0,   \
                                     ptrdiff_t j1, double *mean, double *var) {            \
    for (ptrdiff_t j = j0; j < j1; j++) { mean[j] = 0; var[j] = 0; }                       \
    for (ptrdiff_t i = 1; i < n; i++) {                                                    \
        const T *row = X + i * f;                                                          \
        for (ptrdiff_t j = j0; j < j1; j++) {                                              \
            double d = (double)row[j] - (double)X[j];                                      \
            mean[j] += d;                                                                  \
            var[j] += d * d;                                                               \
        }                                                                                  \
    }                                                                                      \
    for (ptrdiff_t j = j0; j < j1; j++) {                                                  \
        double d = mean[j] / n;                                                            \
        var[j] = var[j] / n - d * d;                                                       \
        if (var[j] < 0) var[j] = 0;                                                        \
        mean[j] = X[j] + d;                                                                \
    }                                                                                      \
}                                                                                          \
/* s1 = sum_i dz, s2 = sum_i dz (x - mean) over the features [j0, j1), with dz = dy,       \
 * or dy s (1 - s) when S. */                                                              \
NNRT_CLONES                                                                                \
static void nnrt_bn_bwd_sums_cols_##SUF(const T *X, const T *dY, const T *S,               \
                                        const T *mean, double *s1, double *s2,             \
                                        ptrdiff_t n, ptrdiff_t f, ptrdiff_t j0,            \
                                        ptrdiff_t j1) {                                    \
    for (ptrdiff_t j = j0; j < j1; j++) { s1[j] = 0; s2[j] = 0; }                          \
    for (ptrdiff_t i = 0; i < n; i++) {                                                    \
        const T *xr = X + i * f;                                                           \
        const T *gr = dY + i * f;                                                          \
        if (S) {                                                                           \
            const T *sr = S + i * f;                                                       \
            for (ptrdiff_t j = j0; j < j1; j++) {                                          \
                T dz = gr[j] * sr[j] * ((T)1 - sr[j]);                                     \
                s1[j] += dz;                                                               \
                s2[j] += (double)dz * (double)(xr[j] - mean[j]);                           \
            }                                                                              \
        } else {                                                                           \
            for (ptrdiff_t j = j0; j < j1; j++) {                                          \
                s1[j] += gr[j];                                                            \
                s2[j] += (double)gr[j] * (double)(xr[j] - mean[j]);                        \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
}                                                                                          \
/* dx = a dz + c (x - mean) + b, per-feature a, b, c folded by the caller. */             \
NNRT_CLONES                                                                               \
static void nnrt_bn_bwd_dx_##SUF(const T *X, const T *dY, const T *S, T *dX,              \
                                 const T *mean, const T *a, const T *b, const T *c,       \
                                 ptrdiff_t n, ptrdiff_t f) {                              \
    for (ptrdiff_t i = 0; i < n; i++) {                                                   \
        const T *xr = X + i * f;                                                          \
        const T *gr = dY + i * f;                                                         \
        T *dxr = dX + i * f;                                                              \
        if (S) {                                                                          \
            const T *sr = S + i * f;                                                      \
            for (ptrdiff_t j = 0; j < f; j++) {                                           \
                T dz = gr[j] * sr[j] * ((T)1 - sr[j]);                                    \
                dxr[j] = a[j] * dz + c[j] * (xr[j] - mean[j]) + b[j];                     \
            }                                                                             \
        } else {                                                                          \
            for (ptrdiff_t j = 0; j < f; j++)                                             \
                dxr[j] = a[j] * gr[j] + c[j] * (xr[j] - mean[j]) + b[j];                  \
        }                                                                                 \
    }                                                                                     \
}

/* Per-feature constants of BatchNorm, in float64, stored in T (see plugins/_batchnorm.pyx).
 * Training forward: invstd, affine scale/centre/shift, running statistics (unbiased
 * variance); the affine pass centres on mean_t (the mean rounded to T) and the rounding
 * error moves into the shift: y = (x - mean_t) sc + beta + (mean_t - mean) sc. */
#define NNRT_BN_FOLDS(T, SUF)                                                                 \
NNRT_CLONES                                                                               \
static void nnrt_bn_fold_train_##SUF(ptrdiff_t f, ptrdiff_t n, double momentum, double eps, \
        const double *mean, const double *var, double *invstd, const T *gamma,            \
        const T *beta, T *scale_t, T *mean_t, T *shift_t, T *running_mean,                \
        T *running_var) {                                                                 \
    double m = momentum, unbias = (double)n / (n - 1);                                    \
    for (ptrdiff_t j = 0; j < f; j++) invstd[j] = 1.0 / sqrt(var[j] + eps);               \
    for (ptrdiff_t j = 0; j < f; j++) {                                                   \
        double sc = (double)gamma[j] * invstd[j];                                         \
        scale_t[j] = (T)sc;                                                               \
        mean_t[j] = (T)mean[j];                                                           \
        shift_t[j] = (T)((double)beta[j] + ((double)mean_t[j] - mean[j]) * sc);           \
        running_mean[j] = (T)((1 - m) * (double)running_mean[j] + m * mean[j]);           \
        running_var[j] = (T)((1 - m) * (double)running_var[j] + m * var[j] * unbias);     \
    }                                                                                     \
}                                                                                         \
/* Eval forward: scale = gamma / sqrt(running_var + eps). */                              \
NNRT_CLONES                                                                               \
static void nnrt_bn_fold_eval_##SUF(ptrdiff_t f, double eps, const T *gamma,              \
                                    const T *running_var, T *scale_t) {                   \
    for (ptrdiff_t j = 0; j < f; j++)                                                     \
        scale_t[j] = (T)((double)gamma[j] / sqrt((double)running_var[j] + eps));          \
}                                                                                         \
/* Backward: dbeta = s1; dgamma = invstd (s2 + (mean_t - mean) s1) (the sums pass centred \
 * on mean_t); dx = a dz + c (x - mean_t) + b with a = gamma invstd,                      \
 * c = -a invstd dgamma / n, b = -a s1 / n + c (mean_t - mean). dgamma_out and         \
 * dbeta_out may be NULL (then only a, b, c are written). */                             \
NNRT_CLONES                                                                               \
static void nnrt_bn_fold_backward_##SUF(ptrdiff_t f, ptrdiff_t n, const double *mean,     \
        const double *invstd, const double *s1, const double *s2, const T *mean_t,        \
        const T *gamma, T *dgamma_out, T *dbeta_out, T *a_t, T *b_t, T *c_t) {            \
    for (ptrdiff_t j = 0; j < f; j++) {                                                   \
        double dm = (double)mean_t[j] - mean[j];                                          \
        double dgamma = (s2[j] + dm * s1[j]) * invstd[j];                                 \
        if (dbeta_out) dbeta_out[j] = (T)s1[j];                                           \
        if (dgamma_out) dgamma_out[j] = (T)dgamma;                                        \
        double a = (double)gamma[j] * invstd[j];                                          \
        a_t[j] = (T)a;                                                                    \
        double c = -a * invstd[j] * dgamma / n;                                           \
        c_t[j] = (T)c;                                                                    \
        b_t[j] = (T)(-a * s1[j] / n + c * dm);                                            \
    }                                                                                     \
}

NNRT_BN_FOLDS(float, f)
NNRT_BN_FOLDS(double, d)

NNRT_BN_KERNELS(float, f, nnrt_sigmoidf)
NNRT_BN_KERNELS(double, d, nnrt_sigmoid)

/* Local sums of a batch-normalisation layer whose statistics cover more than this
 * process's rows (SyncBatchNorm: the caller adds them up over the ranks):
 *   s1 = sum_i (x - c),  s2 = sum_i (x - c)^2  per feature, in float64,
 * with the per-feature centre c (float64; NULL: 0). With c the global mean, s1 is the
 * rounding correction of the mean and s2 the sum of squared deviations. */
#define NNRT_BN_MOMENTS(T, SUF)                                                               \
NNRT_CLONES                                                                               \
static void nnrt_bn_moments_##SUF(const T *X, ptrdiff_t n, ptrdiff_t f, const double *c,  \
                                  double *s1, double *s2) {                               \
    for (ptrdiff_t j = 0; j < f; j++) { s1[j] = 0; s2[j] = 0; }                           \
    for (ptrdiff_t i = 0; i < n; i++) {                                                   \
        const T *row = X + i * f;                                                         \
        if (c) {                                                                          \
            for (ptrdiff_t j = 0; j < f; j++) {                                           \
                double d = (double)row[j] - c[j];                                         \
                s1[j] += d;                                                               \
                s2[j] += d * d;                                                           \
            }                                                                             \
        } else {                                                                          \
            for (ptrdiff_t j = 0; j < f; j++) {                                           \
                double d = (double)row[j];                                                \
                s1[j] += d;                                                               \
                s2[j] += d * d;                                                           \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
}

NNRT_BN_MOMENTS(float, f)
NNRT_BN_MOMENTS(double, d)

#ifdef NNRT_BN_PUSHED
#pragma GCC pop_options
#endif

#endif /* NNRT_PLUGINS_BN_KERNELS_H */
