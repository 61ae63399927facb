"""Type stub for the compiled ``nnrt_plugins._batchnorm`` module (``_batchnorm.pyx``)."""

from typing import Any, ClassVar

import numpy as np

from nnrt.layer import Layer

class BatchNorm(Layer):
    """Batch normalisation over the batch axis, as torch.nn.BatchNorm1d (``batchnorm``).

    params ``gamma``, ``beta``; buffers ``running_mean``, ``running_var``.
    """

    uses_batch_statistics: ClassVar[bool]
    in_features: int
    out_features: int
    @property
    def num_features(self) -> int: ...
    @property
    def momentum(self) -> float: ...
    @property
    def eps(self) -> float: ...
    # the live arrays of params(), grads() and buffers() (read-only attributes)
    @property
    def gamma(self) -> np.ndarray: ...
    @property
    def beta(self) -> np.ndarray: ...
    @property
    def dgamma(self) -> np.ndarray: ...
    @property
    def dbeta(self) -> np.ndarray: ...
    @property
    def running_mean(self) -> np.ndarray: ...
    @property
    def running_var(self) -> np.ndarray: ...
    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None: ...
    def reset_parameters(self, rng: np.random.Generator | None = None) -> None:
        """gamma = 1, beta = 0, running_mean = 0, running_var = 1 (``rng`` is unused)."""

class SyncBatchNorm(BatchNorm):
    """BatchNorm with statistics over the global batch of all ranks (``sync_batchnorm``)."""

    uses_communicator: ClassVar[bool]
    #: the communicator: ``allreduce_sum(buf, what)`` (None: the default one)
    comm: Any
