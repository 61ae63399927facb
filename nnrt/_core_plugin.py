"""The core's own plugin: registers the Cython ``dense`` layer under the name ``dense``."""

from nnrt.dense import Dense
from nnrt.hookspecs import RegisterLayer, hookimpl


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("dense", Dense)
