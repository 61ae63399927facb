"""Plugin: ``sync_batchnorm``, BatchNorm with statistics over the global batch of all
MPI ranks (``nnrt.distributed.SyncBatchNorm``; in one process it equals ``batchnorm``).

The layer is pure Python over numpy and needs mpi4py only when it runs under MPI.
torch: ``nn.SyncBatchNorm`` (as ``nn.BatchNorm1d`` for ``batchnorm``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nnrt.distributed import SyncBatchNorm
from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt.layer import Layer
from nnrt_plugins.batchnorm import check_running_stats, from_torch_module, to_torch_module

if TYPE_CHECKING:
    from nnrt.hookspecs import TorchModule

__all__ = [
    "SyncBatchNorm",
    "nnrt_check_state",
    "nnrt_from_torch",
    "nnrt_layer_flops",
    "nnrt_register_layers",
    "nnrt_to_torch",
]


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
