"""Type stub for the compiled ``nnrt.dense`` module (``dense.pyx``)."""

from typing import Any

import numpy as np

from nnrt.layer import Layer

class Dense(Layer):
    use_bias: bool
    in_features: int
    out_features: int
    def __init__(self, in_features: int, out_features: int) -> None: ...
    def reset_parameters(self, rng: np.random.Generator) -> None: ...
    def backward_params(self, dY: Any) -> None: ...
