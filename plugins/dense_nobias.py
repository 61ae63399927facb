"""Plugin: the bias-free dense layer ``dense_nobias``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt_plugins._dense_nobias import DenseNoBias

if TYPE_CHECKING:
    from nnrt.hookspecs import OnnxExportContext
    from nnrt.layer import Layer

__all__ = ["DenseNoBias", "nnrt_onnx_export", "nnrt_register_layers"]


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
