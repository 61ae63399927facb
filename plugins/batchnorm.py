"""Plugin: batch normalisation ``batchnorm`` (torch.nn.BatchNorm1d semantics)."""

from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt_plugins._batchnorm import BatchNorm

__all__ = ["BatchNorm", "nnrt_register_layers"]


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("batchnorm", BatchNorm)
