"""Type stub for the compiled ``nnrt.dense`` module (``dense.pyx``)."""

import numpy as np

from nnrt.layer import Layer

class Dense(Layer):
    """Fully connected layer ``Y = X @ W + b`` (registry name ``dense``).

    ``in_features``, ``out_features``, ``dtype`` and ``use_bias`` are read-only
    (assignment raises AttributeError): they are those of the parameters.
    """

    @property
    def use_bias(self) -> bool: ...
    in_features: int
    out_features: int
    def __init__(self, in_features: int, out_features: int) -> None: ...
    def reset_parameters(self, rng: np.random.Generator) -> None:
        """Draw weight (then bias) uniform in ±1/sqrt(in_features) from ``rng``."""
    def backward_params(self, dY: np.ndarray) -> None:
        """Like ``backward`` but only writes the parameter gradients (no dX)."""

def check_width(value: object, name: str, owner: str) -> int:
    """``value`` as a positive int, else TypeError/ValueError naming ``owner`` and ``name``."""
