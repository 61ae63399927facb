"""Type stub for the compiled ``nnrt.layer`` module (``layer.pyx``).

What mypy sees of ``nnrt.Layer``: a plugin author's subclass is checked
against these signatures (override with compatible ones, e.g.
``def forward(self, X: np.ndarray, training: bool = False) -> np.ndarray``).
"""

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

ABI_VERSION: int
"""The running core's ABI version (compiled plugins are checked against it)."""
DEBUG_BUILD: bool
"""True when built with NNRT_DEBUG_BUILD=1 (Cython bounds checks on)."""

def check_abi(compiled_version: int, plugin: str) -> bool:
    """Return True, or raise ImportError naming ``plugin`` and both versions."""

class Layer:
    """Base class of every nnrt layer (a ``cdef class``; subclass it from Python or Cython).

    A Python subclass calls ``super().__init__()``, sets ``in_features`` /
    ``out_features`` (None where the layer keeps the width) and overrides
    ``forward`` and ``backward`` plus whichever of ``params`` / ``grads`` /
    ``buffers`` / ``config`` apply.

    On a compiled built-in layer (dense and the built-in plugins' compiled layers, and
    subclasses of them) ``in_features``, ``out_features`` and ``dtype`` are
    read-only: assigning raises AttributeError (build a new layer, or call
    ``to_dtype``). A compiled layer that was never initialised (made with
    ``__new__``) raises RuntimeError naming its class from every method.
    """

    in_features: int | None
    """Input width, or None; a positive int or None when a Python subclass assigns it."""
    out_features: int | None
    """Output width, or None; a positive int or None when a Python subclass assigns it."""
    uses_batch_statistics: ClassVar[bool]
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    @property
    def dtype(self) -> np.dtype[Any] | None:
        """float32 or float64 once a network has cast the layer; None: follows the input."""
    @dtype.setter
    def dtype(self, value: npt.DTypeLike | None) -> None:
        """Python subclasses only; a compiled built-in layer raises AttributeError."""
    def to_dtype(self, dtype: npt.DTypeLike) -> Self:
        """Cast every parameter, gradient and buffer to ``dtype``; returns the layer."""
    def forward(self, X: np.ndarray, training: bool = False) -> np.ndarray:
        """(batch, in_features) -> (batch, out_features); may return a reused buffer."""
    def backward(self, dY: np.ndarray) -> np.ndarray:
        """dY of the last ``forward(training=True)`` -> dX; overwrites parameter gradients."""
    def params(self) -> dict[str, np.ndarray]:
        """Live trainable arrays (optimizers update them in place)."""
    def grads(self) -> dict[str, np.ndarray]:
        """Live gradient arrays, same keys and shapes as ``params()``."""
    def buffers(self) -> dict[str, np.ndarray]:
        """Live saved state that is not trained (e.g. running statistics)."""
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments: ``type(layer)(**config)`` rebuilds the layer."""
    def prepare_input(self, X: npt.ArrayLike) -> np.ndarray:
        """``X`` as a C-contiguous 2-D array of this layer's dtype (validated, copied if needed)."""
    def prepare_grad(self, dY: npt.ArrayLike, like: np.ndarray) -> np.ndarray:
        """``dY`` as a C-contiguous array with the shape and dtype of ``like``."""
    def _no_forward_error(self) -> RuntimeError: ...
