"""Plugin: batch normalisation ``batchnorm`` (torch.nn.BatchNorm1d semantics).

Also checks networks (hook ``nnrt_check_network``): a ``dense`` layer with a
bias right before a ``batchnorm`` gets an ``nnrt.BiasBeforeBatchNormWarning``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nnrt_plugins._batchnorm import BatchNorm

from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt.warnings import BiasBeforeBatchNormWarning, warn_user

if TYPE_CHECKING:
    from nnrt.network import Sequential

__all__ = ["BatchNorm", "nnrt_check_network", "nnrt_register_layers"]


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("batchnorm", BatchNorm)


@hookimpl
def nnrt_check_network(net: Sequential) -> None:
    # NOTE: only direct adjacency: a sigmoid (or anything non-affine) in between
    # makes the bias meaningful again.
    layers = net.layers
    for i in range(1, len(layers)):
        prev, bn = layers[i - 1], layers[i]
        if not isinstance(bn, BatchNorm) or "bias" not in prev.params():
            continue
        warn_user(
            f"layer {i - 1} {prev!r} has a bias and feeds layer {i} {bn!r}: BatchNorm "
            f"subtracts the batch mean, which cancels the bias, and its beta does the "
            f"bias's job; use 'dense_nobias' instead of 'dense' here "
            f"(see help(nnrt.BiasBeforeBatchNormWarning))",
            BiasBeforeBatchNormWarning,
        )
