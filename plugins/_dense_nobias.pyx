# cython: language_level=3
"""Bias-free dense layer ``Y = X @ W`` (registry name ``dense_nobias``).

Built the way a third-party Cython plugin would be: it cimports the core's
``Dense`` from ``nnrt/dense.pxd`` and reuses its GEMM kernels with the bias
switched off. Use it in front of ``batchnorm``, whose mean subtraction would
cancel a bias anyway (the role of the bias is taken by BatchNorm's beta).
"""

from nnrt.dense cimport Dense
from nnrt.layer cimport NNRT_ABI_VERSION

from nnrt.layer import check_abi

check_abi(NNRT_ABI_VERSION, __name__)


cdef class DenseNoBias(Dense):
    """Fully connected layer without bias: ``Y = X @ W``; ``dW = X.T @ dY``, ``dX = dY @ W.T``.

    weight has shape (in_features, out_features), uniform in ±1/sqrt(in_features).
    """

    # eval-chain protocol (nnrt/_kernels.pyx): its eval forward is Dense's (X @ W), so
    # the core may fuse the affine and activation after it into its output pass
    _nnrt_eval_dense = True

    def __init__(self, in_features, out_features):
        self._setup(in_features, out_features, False)
