"""Plugin: the bias-free dense layer ``dense_nobias``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt_plugins._dense_nobias import DenseNoBias

if TYPE_CHECKING:
    from nnrt.hookspecs import OnnxExportContext
    from nnrt.layer import Layer

__all__ = ["DenseNoBias", "nnrt_layer_flops", "nnrt_onnx_export", "nnrt_register_layers"]


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
