"""Folding for inference: adjacent layers merged into one eval-equivalent layer.

``fold(net)`` walks the network from the input side and offers every adjacent
pair ``(first, second)`` to the plugins through the hook ``nnrt_fold_pair``
(``nnrt.hookspecs``). A plugin that can merge the pair returns one new layer
computing ``second(first(X))`` in evaluation mode; that layer is then offered
together with the next one, so a chain folds as far as the plugins allow. A
pair no plugin claims is kept as it is. The core knows no fold itself: e.g.
the normalisation plugin merges a dense layer and the normalisation after it
into one ``dense`` (its module docstring has the formula).

The result is a new network (fresh layer objects, the same dtype and seed)
for inference only; ``net`` is not modified.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nnrt._hooks import first_result, plugin_error
from nnrt._locks import holding
from nnrt._network import Network, build
from nnrt.layer import Layer

__all__ = ["fold"]

_HOOK = "nnrt_fold_pair"


def fold(net: Network) -> Network:
    """A new network equal to ``net`` in eval mode, with every pair a plugin can
    merge (hook ``nnrt_fold_pair``) folded into one layer.

    ``net`` is not modified; the new network has fresh layer objects, the same
    dtype and seed. Reads the weights under the network's lock (those of one
    whole step when another thread is training it). A plugin whose hook
    returns something that is not a new layer of the right widths raises
    ``nnrt.PluginError`` naming it.
    """
    with holding(net):
        return _fold(net)


def _state(layer: Layer) -> dict[str, np.ndarray]:
    """Copies of ``layer``'s parameters and buffers."""
    state = {k: np.array(v, copy=True) for k, v in layer.params().items()}
    state.update({k: np.array(v, copy=True) for k, v in layer.buffers().items()})
    return state


def _copy(layer: Layer) -> Layer:
    return type(layer)(**layer.config())


def _widths(net: Network) -> list[int | None]:
    """``w[k]``: the width of the input of layer ``k`` (``w[len]``: the output's)."""
    widths: list[int | None] = [net.in_features]
    for layer in net.layers:
        out = layer.out_features
        widths.append(widths[-1] if out is None else int(out))
    return widths


def _checked(
    merged: object, plugin: str, first: Layer, second: Layer, i: int, w_in: Any, w_out: Any
) -> Layer:
    """``merged`` if it is a new layer taking ``w_in`` features and giving ``w_out``."""
    where = f"for {first!r} followed by layer {i} {second!r}"
    if not isinstance(merged, Layer):
        raise plugin_error(
            _HOOK, plugin, f"returned {type(merged).__name__} {merged!r:.80} {where}, not a Layer"
        )
    if merged is first or merged is second:
        raise plugin_error(
            _HOOK, plugin, f"returned one of the layers it was given {where}, not a new layer"
        )
    n_in = merged.in_features
    n_out = merged.out_features if merged.out_features is not None else (n_in or w_in)
    for attr, want, got in (("in_features", w_in, n_in), ("out_features", w_out, n_out)):
        if want is not None and got is not None and got != want:
            raise plugin_error(
                _HOOK, plugin, f"returned {merged!r} {where} with {attr}={got}, expected {want}"
            )
    return merged


def _fold(net: Network) -> Network:
    # each entry: (layer for the new network, its parameters/buffers to copy in
    # after Sequential re-initialised it from the seed)
    out: list[tuple[Layer, dict[str, np.ndarray]]] = []
    widths = _widths(net)
    current: Layer | None = None  # the layer waiting to be merged with the next one
    start = 0  # index in net of the first layer that current stands for
    is_original = True  # current is a layer of net (not a plugin's merged layer)
    for i, layer in enumerate(net.layers):
        if current is None:
            current, start, is_original = layer, i, True
            continue
        merged, plugin = first_result(_HOOK, first=current, second=layer)
        if merged is not None:
            current = _checked(merged, plugin, current, layer, i, widths[start], widths[i + 1])
            is_original = False
            continue
        out.append(_take(current, is_original))
        current, start, is_original = layer, i, True
    if current is not None:
        out.append(_take(current, is_original))
    folded = build([layer for layer, _ in out], seed=net.seed, dtype=net.dtype)
    for layer, state in zip(folded.layers, (s for _, s in out), strict=True):
        live = dict(layer.params())
        live.update(layer.buffers())
        for name, value in state.items():
            np.copyto(live[name], value, casting="unsafe")
    return folded


def _take(layer: Layer, is_original: bool) -> tuple[Layer, dict[str, np.ndarray]]:
    """A layer for the new network: a fresh copy of one of ``net``'s, or a merged one."""
    return (_copy(layer) if is_original else layer), _state(layer)
