"""Argument checks shared by layers that live in different modules."""

from __future__ import annotations

from typing import Any

import numpy as np


def batchnorm_config(
    owner: str, num_features: Any, momentum: Any, eps: Any
) -> tuple[int, float, float]:
    """Checked ``(num_features, momentum, eps)`` of a batch-normalisation layer.

    ``owner`` names the layer class in the ValueError messages.
    """
    if (
        isinstance(num_features, (bool, np.bool_))
        or not isinstance(num_features, (int, np.integer))
        or num_features <= 0
    ):
        raise ValueError(f"{owner}: num_features must be a positive int, got {num_features!r}")
    momentum = float(momentum)
    eps = float(eps)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{owner}: momentum must be in [0, 1], got {momentum!r}")
    if not eps > 0.0:
        raise ValueError(f"{owner}: eps must be > 0, got {eps!r}")
    return int(num_features), momentum, eps
