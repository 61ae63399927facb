"""Plugin: the bias-free dense layer ``dense_nobias``."""

from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt_plugins._dense_nobias import DenseNoBias

__all__ = ["DenseNoBias", "nnrt_register_layers"]


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("dense_nobias", DenseNoBias)
