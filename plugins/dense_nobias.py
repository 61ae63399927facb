"""Plugin: the bias-free dense layer ``dense_nobias``.

ONNX: ``MatMul(X, W)``. torch: ``nn.Linear(i, o, bias=False)`` (weight
transposed: torch stores (out, in), nnrt (in, out)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt_plugins._dense_nobias import DenseNoBias

if TYPE_CHECKING:
    from nnrt.hookspecs import OnnxExportContext, TorchModule
    from nnrt.layer import Layer

__all__ = [
    "DenseNoBias",
    "nnrt_from_torch",
    "nnrt_layer_flops",
    "nnrt_onnx_export",
    "nnrt_register_layers",
    "nnrt_to_torch",
]


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("dense_nobias", DenseNoBias)


@hookimpl
def nnrt_onnx_export(layer: Layer, input: str, ctx: OnnxExportContext) -> str | None:
    """ONNX: ``MatMul(X, W)`` with W stored as (in_features, out_features)."""
    if type(layer) is not DenseNoBias:
        return None
    W = ctx.add_initializer("weight", layer.params()["weight"])
    return ctx.add_node("MatMul", [input, W])[0]


@hookimpl
def nnrt_layer_flops(layer: Layer, in_features: int) -> int | None:
    """FLOPs: one multiply-add (2 FLOPs) per weight."""
    if type(layer) is not DenseNoBias:
        return None
    return 2 * in_features * int(layer.out_features or 0)


@hookimpl
def nnrt_to_torch(layer: Layer) -> TorchModule | None:
    """``dense_nobias(i, o)`` -> ``nn.Linear(i, o, bias=False)`` (weight transposed)."""
    if type(layer) is not DenseNoBias:
        return None
    import torch

    W = torch.from_numpy(np.array(layer.params()["weight"].T, copy=True))
    lin = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


@hookimpl
def nnrt_from_torch(module: TorchModule) -> Layer | None:
    """``nn.Linear(i, o, bias=False)`` -> ``dense_nobias(i, o)``."""
    import torch

    if type(module) is not torch.nn.Linear or module.bias is not None:
        return None
    layer = DenseNoBias(module.in_features, module.out_features)
    np.copyto(layer.params()["weight"], module.weight.detach().cpu().numpy().T)
    return layer
