"""Plugin: the logistic sigmoid ``sigmoid``."""

from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt_plugins._sigmoid import Sigmoid

__all__ = ["Sigmoid", "nnrt_register_layers"]


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("sigmoid", Sigmoid)
