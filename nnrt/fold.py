"""BatchNorm folding for inference: dense (+ bias) followed by batchnorm -> one dense.

In eval mode BatchNorm is a per-feature affine map with the running statistics::

    s = gamma / sqrt(running_var + eps)
    BN(z) = (z - running_mean) * s + beta

so for ``z = X @ W + b`` (``b = 0`` for ``dense_nobias``)::

    BN(z) = X @ (W * s) + ((b - running_mean) * s + beta)      (s scales W's columns)

``fold_batchnorm`` builds a new network where every such pair is one ``dense``
layer with ``W' = W * s`` and ``b' = (b - running_mean) * s + beta``. The
folded weights are computed in float64 and then cast to the network's dtype.
The result is for inference only: it has no batch statistics to train with.
A batchnorm that does not directly follow a dense layer is kept as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from nnrt._locks import holding
from nnrt.network import Sequential
from nnrt.registry import registry

if TYPE_CHECKING:
    from nnrt.layer import Layer

__all__ = ["fold_batchnorm"]

_DENSE_NAMES = ("dense", "dense_nobias")


def _is_batchnorm(layer: Layer) -> bool:
    return registry.name_of(type(layer)) == "batchnorm"


def _is_dense(layer: Layer) -> bool:
    return registry.name_of(type(layer)) in _DENSE_NAMES


def _fold_pair(dense: Layer, bn: Layer) -> tuple[np.ndarray, np.ndarray]:
    p = dense.params()
    W = np.asarray(p["weight"], dtype=np.float64)
    b = np.asarray(p["bias"], dtype=np.float64) if "bias" in p else np.zeros(W.shape[1])
    g = bn.params()
    buf = bn.buffers()
    eps = float(bn.config()["eps"])
    scale = np.asarray(g["gamma"], np.float64) / np.sqrt(
        np.asarray(buf["running_var"], np.float64) + eps
    )
    W_f = W * scale[None, :]
    b_f = (b - np.asarray(buf["running_mean"], np.float64)) * scale + np.asarray(
        g["beta"], np.float64
    )
    return W_f, b_f


def fold_batchnorm(net: Sequential) -> Sequential:
    """A new network equal to ``net`` in eval mode, with dense+batchnorm pairs folded.

    ``net`` is not modified; the new network has fresh layer objects, the same
    dtype and seed, and contains no batchnorm that directly followed a
    ``dense``/``dense_nobias`` layer. Reads the weights under the network's lock
    (those of one whole step when another thread is training it).
    """
    with holding(net):
        return _fold_batchnorm(net)


def _fold_batchnorm(net: Sequential) -> Sequential:
    new_layers: list[Layer] = []
    # (index in the new network, arrays to copy in: name -> float64/any array)
    fills: list[dict[str, np.ndarray]] = []
    i = 0
    layers = net.layers
    while i < len(layers):
        layer = layers[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if nxt is not None and _is_dense(layer) and _is_batchnorm(nxt):
            W_f, b_f = _fold_pair(layer, nxt)
            new_layers.append(registry.make("dense", W_f.shape[0], W_f.shape[1]))
            fills.append({"weight": W_f, "bias": b_f})
            i += 2
            continue
        cfg: dict[str, Any] = layer.config()
        new_layers.append(type(layer)(**cfg))
        state = {k: v.copy() for k, v in layer.params().items()}
        state.update({k: v.copy() for k, v in layer.buffers().items()})
        fills.append(state)
        i += 1
    folded = Sequential(new_layers, seed=net.seed, dtype=net.dtype)
    for layer, state in zip(folded.layers, fills, strict=True):
        live = dict(layer.params())
        live.update(layer.buffers())
        for name, value in state.items():
            np.copyto(live[name], value, casting="unsafe")
    return folded
