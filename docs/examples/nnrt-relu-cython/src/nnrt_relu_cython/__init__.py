"""Example third-party nnrt plugin written in Cython: ``relu`` and ``leaky_relu``."""

from nnrt_relu_cython._relu import LeakyReLU, ReLU

__all__ = ["LeakyReLU", "ReLU"]
__version__ = "0.1.0"
