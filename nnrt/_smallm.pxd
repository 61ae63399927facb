# cython: language_level=3
"""Declarations of nnrt/_smallm.h, nnrt's register-blocked GEMM kernel (cimported by
nnrt/dense.pyx, nnrt/_serve.pyx and nnrt/_blas.pyx; no module of its own)."""

cdef extern from "nnrt/_smallm.h" nogil:
    void nnrt_smallm_f(const float* X, const float* W, float* Y, Py_ssize_t m, Py_ssize_t k,
                       Py_ssize_t n, Py_ssize_t kc)
    void nnrt_smallm_d(const double* X, const double* W, double* Y, Py_ssize_t m,
                       Py_ssize_t k, Py_ssize_t n, Py_ssize_t kc)
    void nnrt_gemm_s_f(const float* X, Py_ssize_t xi, Py_ssize_t xk, const float* W,
                       Py_ssize_t ldw, float* Y, Py_ssize_t ldy, int acc_y, Py_ssize_t m,
                       Py_ssize_t k, Py_ssize_t n)
    void nnrt_gemm_s_d(const double* X, Py_ssize_t xi, Py_ssize_t xk, const double* W,
                       Py_ssize_t ldw, double* Y, Py_ssize_t ldy, int acc_y, Py_ssize_t m,
                       Py_ssize_t k, Py_ssize_t n)
    void* nnrt_aligned_alloc(size_t bytes)
    void nnrt_aligned_free(void* p)
    Py_ssize_t nnrt_aligned_ld(Py_ssize_t n, size_t elsize)
    void nnrt_transpose_f(const float* B, Py_ssize_t ldb, Py_ssize_t n, Py_ssize_t k,
                          float* BT, Py_ssize_t ldt)
    void nnrt_transpose_d(const double* B, Py_ssize_t ldb, Py_ssize_t n, Py_ssize_t k,
                          double* BT, Py_ssize_t ldt)
    int nnrt_smallm_enabled()
    Py_ssize_t nnrt_bgpf_set(const char* base, const Py_ssize_t* rows, Py_ssize_t n,
                             Py_ssize_t row_bytes)
    Py_ssize_t nnrt_bgpf_left()
    void nnrt_bgpf_clear(int release)
    const char* nnrt_smallm_isa_name()
