"""The core's own plugin: registers the Cython ``dense`` layer under the name ``dense``."""

from nnrt.dense import Dense
from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt.layer import Layer


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("dense", Dense)


@hookimpl
def nnrt_layer_flops(layer: Layer, in_features: int) -> int | None:
    """``dense``: a multiply-add per weight (2 FLOPs) plus the bias add."""
    if type(layer) is not Dense:
        return None
    out = int(layer.out_features or 0)
    return 2 * in_features * out + out
