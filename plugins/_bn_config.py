"""Constructor checks of the batch-normalisation layers (``batchnorm``, ``sync_batchnorm``).

Pure Python; the compiled ``BatchNorm`` (and so ``SyncBatchNorm``) calls it with its
class name, so that both refuse the same arguments with the same messages.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["batchnorm_config"]


def _real(owner: str, name: str, value: Any) -> float:
    """``value`` as a float if it is a real number (int or float, numpy's too).

    Strings, bools, None and arrays raise ``TypeError``: a model file's
    ``"momentum": "0.5"`` is refused, not converted. NaN passes (the range
    checks refuse it).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r:.60}")
    return float(value)


def batchnorm_config(
    owner: str, num_features: Any, momentum: Any, eps: Any
) -> tuple[int, float, float]:
    """Checked ``(num_features, momentum, eps)`` of a batch-normalisation layer.

    ``owner`` names the layer class in the error messages: ``num_features`` a
    positive int, ``momentum`` in [0, 1], ``eps`` finite and > 0 (ValueError);
    a non-number (TypeError).
    """
    if (
        isinstance(num_features, (bool, np.bool_))
        or not isinstance(num_features, (int, np.integer))
        or not 0 < num_features <= 2**31 - 1  # as dense's widths
    ):
        raise ValueError(f"{owner}: num_features must be a positive int, got {num_features!r}")
    momentum = _real(owner, "momentum", momentum)
    eps = _real(owner, "eps", eps)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{owner}: momentum must be in [0, 1], got {momentum!r}")
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"{owner}: eps must be finite and > 0, got {eps!r}")
    return int(num_features), momentum, eps
