"""``Sequential``: the network users hold.

``Sequential`` is ``nnrt._network.Network`` (layers, forward/backward, parameters
and state) plus thin delegations to the modules that work on networks:
``fit``/``predict``/``evaluate`` (nnrt.engine), ``save`` (nnrt.io), ``fold``
(nnrt.fold), ``summary`` (nnrt.summary) and ``to_torch`` (nnrt.interop). Those
modules import ``nnrt._network``, never this module, so there is no import cycle;
the networks they build (``nnrt.load``, ``nnrt.from_torch``, ``net.fold()``) are
``Sequential`` through ``nnrt._network.build``.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

from nnrt import engine as _engine
from nnrt import fold as _fold
from nnrt import interop as _interop
from nnrt import io as _io
from nnrt import summary as _summary

# NOTE: pickles of networks with Python plugin layers written before the split
# name the function that rebuilds such a layer by this module's path
from nnrt._network import (
    Network,
    _rebuild_layer,  # noqa: F401
    set_network_class,
)

__all__ = ["Sequential"]


class Sequential(Network):
    """A network of layers applied in order.

    ``Sequential(layers, seed=0, dtype="float32")`` keeps the given layer
    objects (``net[i] is layers[i]``), re-initialises every layer that has
    ``reset_parameters(rng)`` from one generator seeded with ``seed`` (in
    layer order), and casts all parameters and buffers to ``dtype``.
    """

    def fit(self, X: Any, y: Any, **kwargs: Any) -> _engine.History:
        """Train on (X, y) with mini-batches; returns a ``nnrt.History``.

        ``fit(X, y, loss="softmax_cross_entropy", optimizer=None, epochs=1,
        batch_size=32, shuffle=True, validation=None, validation_split=None,
        callbacks=None, progress=None, seed=None)``. ``loss`` is a registered name
        (``nnrt.available_losses()``) or a callable ``(Y, target) -> (loss, dY)``;
        ``optimizer`` an instance or a registered name built with its defaults
        (``nnrt.available_optimizers()``; default ``"adam"``). Rows are
        shuffled with a generator seeded from the network's seed (or ``seed``),
        so the same seed gives bit-identical weights. NaN/Inf in X or y raise
        ValueError and leave the network and optimizer as before ``fit``; a non-finite loss raises FloatingPointError
        and leaves the weights that gave the last finite loss. A final
        mini-batch of one sample is skipped (one ``nnrt.TrainingWarning``)
        when a layer has ``uses_batch_statistics``. ``progress`` (tqdm bar) defaults to on
        when stderr is a terminal. See ``nnrt.engine.fit``.
        """
        return _engine.fit(self, X, y, **kwargs)

    def predict(self, X: Any, batch_size: int | None = None) -> np.ndarray:
        """Scores (samples, out_features) in eval mode, in batches; a new array."""
        return _engine.predict(self, X, batch_size=batch_size)

    def predict_classes(self, X: Any, batch_size: int | None = None) -> np.ndarray:
        """Class labels: argmax of ``predict`` (``score > 0`` for one output)."""
        return _engine.predict_classes(self, X, batch_size=batch_size)

    def evaluate(
        self, X: Any, y: Any, loss: Any = None, batch_size: int | None = None
    ) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` in eval mode (accuracy for integer labels)."""
        return _engine.evaluate(self, X, y, loss=loss, batch_size=batch_size)

    def save(self, path: Any) -> None:
        """Write the architecture and every parameter/buffer to exactly ``path`` (.npz), atomically."""
        _io.save(self, path)

    def fold(self) -> Sequential:
        """A new eval-only network with each pair of layers a plugin can merge folded into
        one layer (hook ``nnrt_fold_pair``; see ``nnrt.fold.fold``)."""
        return cast(Sequential, _fold.fold(self))

    def summary(self, batch_size: int = 32, **kwargs: Any) -> _summary.ModelSummary:
        """Layers, widths, parameter counts, memory and FLOPs: a ``nnrt.summary.ModelSummary``.

        ``str()`` of it is the table, ``.layers`` / ``.totals`` the data;
        ``summary(print_fn=print)`` prints it. See ``nnrt.summary.summary``.
        """
        return _summary.summary(self, batch_size, **kwargs)

    def to_torch(self) -> Any:
        """A ``torch.nn.Sequential`` holding a copy of the weights (see ``nnrt.interop.to_torch``)."""
        return _interop.to_torch(self)


set_network_class(Sequential)
