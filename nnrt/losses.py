"""Loss functions: ``loss, dY = fn(Y, target)``.

Every loss is reduced as torch's ``reduction="mean"`` and returns the loss as a
Python float (the final mean accumulated in float64) together with
``dY = dloss/dY``, which already carries the ``1/N`` of the mean. ``dY`` has the
shape of ``Y`` and its dtype (float32 or float64; any other real dtype is
computed in float64). Inputs are never modified.

The functions are written for small batches: ``softmax_cross_entropy`` is one
C pass (nnrt/_kernels.pyx) over already-valid input and validates and converts
anything else once before that pass; ``mse`` and ``bce_with_logits`` are a
handful of numpy calls working in place on at most three temporaries. A call on
a (32, 10) float32 array costs a few microseconds. No state is kept between
calls (thread safe). The float64 references these are tested against live in
tests/test_losses.py.

Derivations (docs/derivations.md):
  softmax_cross_entropy  l_i = logsumexp(x_i) - x_i[y_i];  dY = (softmax(x) - onehot(y)) / N
  mse                    l   = mean((p - t)^2);            dY = 2 (p - t) / size
  bce_with_logits        l   = mean(max(x,0) - x t + log1p(exp(-|x|)));
                         dY  = (sigmoid(x) - t) / size
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from nnrt._kernels import softmax_cross_entropy as _sce_kernel

__all__ = [
    "LossFn",
    "bce_with_logits",
    "mse",
    "softmax_cross_entropy",
]

FloatArray = npt.NDArray[np.floating[Any]]
LossFn = Callable[[Any, Any], tuple[float, FloatArray]]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _describe(a: np.ndarray) -> str:
    return f"shape {a.shape} dtype {a.dtype}"


def _as_array(x: Any, fn: str, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists, unconvertible objects
        raise TypeError(f"{fn}: {what} must be an array, got {type(x).__name__}") from exc


def _as_float(x: Any, fn: str, what: str) -> np.ndarray:
    """``x`` as a non-empty float32/float64 array (other real dtypes become float64)."""
    a = _as_array(x, fn, what)
    if a.dtype not in _FLOAT_DTYPES:
        if a.dtype.kind not in "fiub":
            raise TypeError(
                f"{fn}: {what} must be a real numeric array (float, int or bool), "
                f"got {_describe(a)}"
            )
        a = a.astype(np.float64)
    if a.ndim == 0:
        raise ValueError(f"{fn}: {what} must have at least one dimension, got {_describe(a)}")
    if a.size == 0:
        raise ValueError(f"{fn}: {what} is empty: got {_describe(a)}")
    return a


def _target_like(pred: np.ndarray, target: Any, fn: str) -> np.ndarray:
    """``target`` checked against ``pred``'s shape and cast to ``pred``'s dtype."""
    t = _as_array(target, fn, "target")
    if t.dtype.kind not in "fiub":
        raise TypeError(
            f"{fn}: target must be a real numeric array (float, int or bool), got {_describe(t)}"
        )
    if t.shape != pred.shape:
        raise ValueError(
            f"{fn}: target must have the shape of the prediction {pred.shape} "
            f"(no broadcasting), got {_describe(t)}"
        )
    if t.dtype != pred.dtype:
        t = t.astype(pred.dtype)
    return t


def softmax_cross_entropy(logits: Any, labels: Any) -> tuple[float, FloatArray]:
    """Mean softmax cross-entropy of ``logits`` (batch, classes) against integer ``labels``.

    ``labels`` are class indices of shape (batch,) in ``[0, classes)``. Equals
    ``torch.nn.functional.cross_entropy(logits, labels)``. Returns ``(loss, dY)``
    with ``dY = (softmax(logits) - onehot(labels)) / batch``.
    """
    # NOTE: one implementation, the C kernel (nnrt/_kernels.pyx); it takes plain
    # float32/float64 C-contiguous logits and int64 labels in range and returns None for
    # anything else, which is then validated (descriptive errors) and converted once.
    result = _sce_kernel(logits, labels)
    if result is None:
        x, y = _sce_inputs(logits, labels)
        result = _sce_kernel(x, y)
        if result is None:  # pragma: no cover - _sce_inputs guarantees the kernel's input
            raise RuntimeError("softmax_cross_entropy: the kernel refused validated input")
    loss, dY = result
    return loss, dY


def _sce_inputs(logits: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated C-contiguous float logits and int64 labels in range, or a clear error."""
    fn = "softmax_cross_entropy"
    x = _as_float(logits, fn, "logits")
    if x.ndim != 2:
        raise ValueError(f"{fn}: logits must be 2-D (batch, classes), got {_describe(x)}")
    n, c = x.shape
    y = _as_array(labels, fn, "labels")
    if y.dtype.kind not in "iu":
        raise TypeError(
            f"{fn}: labels must be integer class indices, got {_describe(y)} "
            f"(use labels.astype(np.int64) if they hold whole numbers)"
        )
    if y.shape != (n,):
        raise ValueError(
            f"{fn}: labels must have shape ({n},) to match logits {x.shape}, got {_describe(y)}"
        )
    bad = y[(y < 0) | (y >= c)]
    if bad.size:
        raise ValueError(
            f"{fn}: labels must lie in [0, {c}) for logits {_describe(x)}; "
            f"{bad.size} label(s) out of range, e.g. {int(bad[0])}"
        )
    return np.ascontiguousarray(x), np.ascontiguousarray(y, dtype=np.int64)


def mse(pred: Any, target: Any) -> tuple[float, FloatArray]:
    """Mean squared error over all elements (``torch.nn.functional.mse_loss``).

    Returns ``(loss, dY)`` with ``dY = 2 (pred - target) / pred.size``.
    """
    fn = "mse"
    p = _as_float(pred, fn, "pred")
    t = _target_like(p, target, fn)
    d = np.subtract(p, t)
    flat = d.reshape(-1)
    if d.dtype != np.float64:
        flat = flat.astype(np.float64)
    loss = float(np.dot(flat, flat)) / d.size
    np.multiply(d, 2.0 / d.size, out=d)
    return loss, d


def bce_with_logits(logits: Any, target: Any) -> tuple[float, FloatArray]:
    """Mean binary cross-entropy of ``sigmoid(logits)`` against ``target`` in [0, 1].

    Equals ``torch.nn.functional.binary_cross_entropy_with_logits`` (mean over all
    elements); stable for any finite logit. Returns ``(loss, dY)`` with
    ``dY = (sigmoid(logits) - target) / logits.size``. Soft targets are allowed;
    the target's range is not scanned (cost).
    """
    fn = "bce_with_logits"
    x = _as_float(logits, fn, "logits")
    t = _target_like(x, target, fn)
    size = x.size
    e = np.abs(x)
    np.negative(e, out=e)
    np.exp(e, out=e)  # e = exp(-|x|) lies in (0, 1]: never overflows
    # l = max(x, 0) - x t + log1p(exp(-|x|))
    out = np.log1p(e)
    tmp = np.multiply(x, t)
    out -= tmp
    np.maximum(x, 0, out=tmp)
    out += tmp
    loss = float(out.sum(dtype=np.float64)) / size
    # NOTE: sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0; neither
    # form overflows or cancels.
    np.add(e, 1, out=tmp)
    np.divide(1, tmp, out=out)
    np.multiply(out, e, out=out, where=x < 0)
    out -= t
    out *= 1.0 / size
    return loss, out
