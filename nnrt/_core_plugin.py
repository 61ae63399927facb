"""The core's own plugin: the ``dense`` layer, the built-in losses and optimizers.

They register through the same hooks as any third-party plugin, so a plugin's
``mse`` or ``adam`` would clash with these (and be refused) exactly as two
third-party plugins would clash with each other.
"""

from nnrt import losses, optim
from nnrt.dense import Dense
from nnrt.hookspecs import RegisterLayer, RegisterLoss, RegisterOptimizer, hookimpl
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


@hookimpl
def nnrt_register_losses(register: RegisterLoss) -> None:
    register("softmax_cross_entropy", losses.softmax_cross_entropy)
    register("mse", losses.mse)
    register("bce_with_logits", losses.bce_with_logits)


@hookimpl
def nnrt_register_optimizers(register: RegisterOptimizer) -> None:
    register("sgd", optim.SGD)
    register("adam", optim.Adam)
    register("adamw", optim.AdamW)
