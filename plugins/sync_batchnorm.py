"""Plugin: ``sync_batchnorm``, BatchNorm with statistics over the global batch of all
MPI ranks (``nnrt.distributed.SyncBatchNorm``; in one process it equals ``batchnorm``).

The layer is pure Python over numpy and needs mpi4py only when it runs under MPI.
"""

from __future__ import annotations

from typing import Any

from nnrt.distributed import SyncBatchNorm
from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt.layer import Layer
from nnrt_plugins.batchnorm import check_running_stats

__all__ = ["SyncBatchNorm", "nnrt_check_state", "nnrt_layer_flops", "nnrt_register_layers"]


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
