"""Argument checks shared by layers that live in different modules."""

from __future__ import annotations

import math
from collections.abc import Mapping
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
        or not 0 < num_features <= 2**31 - 1  # kernels index with C int (as dense)
    ):
        raise ValueError(f"{owner}: num_features must be a positive int, got {num_features!r}")
    momentum = real_number(owner, "momentum", momentum)
    eps = real_number(owner, "eps", eps)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{owner}: momentum must be in [0, 1], got {momentum!r}")
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"{owner}: eps must be finite and > 0, got {eps!r}")
    return int(num_features), momentum, eps


def real_number(owner: str, name: str, value: Any) -> float:
    """``value`` as a float if it is a real number (int or float, numpy's too).

    Strings, bools, None and arrays raise ``TypeError``: a model file's
    ``"momentum": "0.5"`` is refused, not converted. NaN passes through (range
    checks refuse it).
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r:.60}")
    return float(value)


def check_state(net: Any, state: Mapping[str, Any]) -> None:
    """Run every plugin's ``nnrt_check_state`` hook on ``state`` (keys ``"<i>.<name>"``).

    Raises what a hook raises (``ValueError`` naming the layer and array).
    """
    from nnrt.registry import registry

    registry.ensure_loaded()
    hook = registry.pm.hook.nnrt_check_state
    if not hook.get_hookimpls():
        return
    per_layer: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        per_layer.setdefault(int(index), {})[name] = value
    for i, layer in enumerate(net.layers):
        if i in per_layer:
            hook(layer=layer, state=per_layer[i])
