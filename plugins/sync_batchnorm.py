"""Plugin: ``sync_batchnorm``, BatchNorm with statistics over the global batch of all
MPI ranks (as ``torch.nn.SyncBatchNorm``; in one process it equals ``batchnorm``).

The layer is the compiled ``BatchNorm`` (``nnrt_plugins._batchnorm``) with its
statistics reduced over the ranks: ``SyncBatchNorm`` there is a subclass whose
kernels compute this process's sums and whose communicator adds them up; it
needs mpi4py only when it runs under MPI. It talks to the other ranks through
the communicator that ``nnrt.distributed.GradientAllreduce`` hands to every
layer declaring ``uses_communicator = True`` (its attribute ``comm``:
``allreduce_sum(buf, what)`` sums a float64 buffer over the ranks in place).
torch: ``nn.SyncBatchNorm`` (as ``nn.BatchNorm1d`` for ``batchnorm``); ONNX and
folding as ``batchnorm`` (evaluation is the same).

Across ranks (docs/distributed.md), per feature and in float64: mean and
variance over the *global* batch (allreduce of count and sum, then of the sums
of deviations from that mean) and the backward pass through those global
statistics (allreduce of ``sum(dy)`` and ``sum(dy * (x - mean))``): training on
``k`` ranks equals single-process training with ``batchnorm`` on the global
batches (up to rounding). Three small allreduces per layer and step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnrt.dense import Dense
from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt.layer import Layer
from nnrt.network import Sequential
from nnrt_plugins._batchnorm import BatchNorm, SyncBatchNorm
from nnrt_plugins._dense_nobias import DenseNoBias
from nnrt_plugins.batchnorm import (
    check_running_stats,
    fold_into_dense,
    from_torch_module,
    onnx_export_node,
    to_torch_module,
)

if TYPE_CHECKING:
    from nnrt.hookspecs import OnnxExportContext, TorchModule

__all__ = [
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "nnrt_check_state",
    "nnrt_fold_pair",
    "nnrt_from_torch",
    "nnrt_layer_flops",
    "nnrt_onnx_export",
    "nnrt_register_layers",
    "nnrt_to_torch",
]


def convert_sync_batchnorm(net: Any) -> Any:
    """A new ``Sequential`` with every ``batchnorm`` replaced by a :class:`SyncBatchNorm`
    (same config, parameters and buffers); the other layers are the same objects."""
    state = net.state_dict()
    layers = [
        SyncBatchNorm(**layer.config()) if type(layer) is BatchNorm else layer
        for layer in net.layers
    ]
    new = Sequential(layers, seed=net.seed, dtype=net.dtype)
    new.load_state_dict(state)
    return new


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("sync_batchnorm", SyncBatchNorm)


@hookimpl
def nnrt_check_state(layer: Layer, state: dict[str, Any]) -> None:
    if type(layer) is SyncBatchNorm:
        check_running_stats(layer, state)


@hookimpl
def nnrt_layer_flops(layer: Layer, in_features: int) -> int | None:
    """FLOPs: as ``batchnorm`` (eval: ``x * a + b`` per feature)."""
    if type(layer) is not SyncBatchNorm:
        return None
    return 2 * in_features


@hookimpl
def nnrt_onnx_export(layer: Layer, input: str, ctx: OnnxExportContext) -> str | None:
    """ONNX: ``BatchNormalization`` in inference mode, as ``batchnorm``."""
    if type(layer) is not SyncBatchNorm:
        return None
    return onnx_export_node(layer, input, ctx)


@hookimpl
def nnrt_fold_pair(first: Layer, second: Layer) -> Layer | None:
    """``dense``/``dense_nobias`` followed by ``sync_batchnorm`` -> one ``dense``."""
    if type(second) is not SyncBatchNorm or type(first) not in (Dense, DenseNoBias):
        return None
    return fold_into_dense(first, second)


@hookimpl
def nnrt_to_torch(layer: Layer) -> TorchModule | None:
    """``sync_batchnorm`` -> ``nn.SyncBatchNorm`` (in one process: ``BatchNorm1d``'s maths)."""
    if type(layer) is not SyncBatchNorm:
        return None
    import torch

    return to_torch_module(layer, torch.nn.SyncBatchNorm)


@hookimpl
def nnrt_from_torch(module: TorchModule) -> Layer | None:
    """``nn.SyncBatchNorm`` (affine, tracking running statistics) -> ``sync_batchnorm``."""
    import torch

    if type(module) is not torch.nn.SyncBatchNorm:
        return None
    return from_torch_module(module, SyncBatchNorm, "sync_batchnorm")
