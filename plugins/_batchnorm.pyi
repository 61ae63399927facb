"""Type stub for the compiled ``nnrt_plugins._batchnorm`` module (``_batchnorm.pyx``)."""

from typing import ClassVar

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
    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None: ...
    def reset_parameters(self, rng: np.random.Generator | None = None) -> None:
        """gamma = 1, beta = 0, running_mean = 0, running_var = 1 (``rng`` is unused)."""
