"""Plugin: ``sync_batchnorm``, BatchNorm with statistics over the global batch of all
MPI ranks (``nnrt.distributed.SyncBatchNorm``; in one process it equals ``batchnorm``).

The layer is pure Python over numpy and needs mpi4py only when it runs under MPI.
"""

from __future__ import annotations

from nnrt.distributed import SyncBatchNorm
from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt.layer import Layer

__all__ = ["SyncBatchNorm", "nnrt_layer_flops", "nnrt_register_layers"]


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("sync_batchnorm", SyncBatchNorm)


@hookimpl
def nnrt_layer_flops(layer: Layer, in_features: int) -> int | None:
    """FLOPs: as ``batchnorm`` (eval: ``x * a + b`` per feature)."""
    if type(layer) is not SyncBatchNorm:
        return None
    return 2 * in_features
