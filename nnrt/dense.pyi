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
    _nnrt_eval_dense: bool

SMALL_M_ISA: str
"""The build of the small-batch eval kernel in use: "avx512", "avx2" or "baseline"."""
SMALL_M_ENABLED: bool
"""Whether the eval forward runs wide layers through the small-batch kernel (AVX-512)."""
EVAL_ACT_NONE: int
EVAL_ACT_SIGMOID: int

def eval_run(layer: Dense, X: object, affine: Layer | None = None, act: int = 0) -> np.ndarray:
    """Eval forward of ``layer`` with the following affine layer and activation fused
    (internal: the eval chain of ``Sequential``)."""

def _set_eval_kernel(mode: str) -> None: ...
def _set_small_m_block(kc: int) -> None: ...
def check_width(value: object, name: str, owner: str) -> int:
    """``value`` as a positive int, else TypeError/ValueError naming ``owner`` and ``name``."""
