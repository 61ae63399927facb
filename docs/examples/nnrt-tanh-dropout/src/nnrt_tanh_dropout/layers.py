"""Two layers written in plain Python on top of ``nnrt.Layer``.

Everything nnrt needs from a layer is here: ``forward``/``backward``, the
parameter/gradient/buffer dicts, ``config`` for saving, and the
``in_features``/``out_features`` widths (``None``: the layer keeps the width).
Inputs go through ``prepare_input``/``prepare_grad``, which validate and cast
them (and raise the errors nnrt users expect) at no cost on the fast path.
"""

from __future__ import annotations

from typing import Any

import nnrt
import numpy as np

__all__ = ["Dropout", "Tanh"]

# Dropout's step counter is a buffer, so it is cast to the network's dtype;
# float32 holds every integer below 2**24 exactly, so it wraps there.
_STEP_WRAP = 2**24


class Tanh(nnrt.Layer):
    """Element-wise hyperbolic tangent (registry name ``tanh``); keeps the width.

    ``y = tanh(x)``; ``dy/dx = 1 - y**2``, computed from the cached *output*.
    """

    def __init__(self) -> None:
        super().__init__()
        self.in_features = None
        self.out_features = None
        self._Y: np.ndarray | None = None  # output of the last training forward

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        Xa = self.prepare_input(X)  # C-contiguous 2-D array of self.dtype, validated
        Y: np.ndarray = np.tanh(Xa)
        if training:
            self._Y = Y  # backward needs the output of the last *training* forward
        return Y

    def backward(self, dY: Any) -> np.ndarray:
        if self._Y is None:
            raise RuntimeError(f"{self!r}: backward() called before forward(X, training=True)")
        g = self.prepare_grad(dY, self._Y)  # shape and dtype of the cached output
        dX: np.ndarray = g * (1.0 - self._Y * self._Y)
        return dX

    def config(self) -> dict[str, Any]:
        return {}


class Dropout(nnrt.Layer):
    """Inverted dropout (registry name ``dropout``); keeps the width.

    Training: each entry is zeroed with probability ``p`` and the survivors are
    scaled by ``1 / (1 - p)``, so the expected output equals the input.
    Eval (``training=False``): the identity.

    Masks are reproducible: the mask of the ``t``-th training forward comes from
    ``numpy.random.default_rng([seed, t])``, and ``t`` is the buffer ``step``
    (saved with the network, so a reloaded network continues the same stream).
    ``seed=None`` takes a seed from the network's generator when the layer is
    put in a ``Sequential`` (so two dropout layers differ), else 0.
    """

    def __init__(self, p: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed or seed < 0):
            raise ValueError(f"Dropout: seed must be a non-negative int or None, got {seed!r}")
        self.in_features = None
        self.out_features = None
        self.p = p
        self._auto_seed = seed is None
        self.seed = 0 if seed is None else int(seed)
        self.step = np.zeros(1)  # training forwards done so far (a buffer: saved)
        self._scale: np.ndarray | None = None  # mask / (1 - p) of the last training forward

    def reset_parameters(self, rng: np.random.Generator) -> None:
        """Called by ``Sequential`` with the network's seeded generator."""
        if self._auto_seed:
            self.seed = int(rng.integers(2**31))

    def buffers(self) -> dict[str, np.ndarray]:
        return {"step": self.step}

    def config(self) -> dict[str, Any]:
        return {"p": self.p, "seed": self.seed}

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        Xa = self.prepare_input(X)
        if not training:
            return Xa
        t = int(self.step[0])
        keep = np.random.default_rng([self.seed, t]).random(Xa.shape) >= self.p
        scale = keep.astype(Xa.dtype)
        scale *= 1.0 / (1.0 - self.p)
        self._scale = scale
        self.step[0] = (t + 1) % _STEP_WRAP
        Y: np.ndarray = Xa * scale
        return Y

    def backward(self, dY: Any) -> np.ndarray:
        if self._scale is None:
            raise RuntimeError(f"{self!r}: backward() called before forward(X, training=True)")
        dX: np.ndarray = self.prepare_grad(dY, self._scale) * self._scale
        return dX
