"""Example third-party nnrt plugin written in pure Python: ``tanh`` and ``dropout``."""

from nnrt_tanh_dropout.layers import Dropout, Tanh

__all__ = ["Dropout", "Tanh"]
__version__ = "0.1.0"
