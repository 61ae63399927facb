"""Plugin: the logistic sigmoid ``sigmoid`` (ONNX ``Sigmoid``, torch ``nn.Sigmoid``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt_plugins._sigmoid import Sigmoid

if TYPE_CHECKING:
    from nnrt.hookspecs import OnnxExportContext, TorchModule
    from nnrt.layer import Layer

__all__ = [
    "Sigmoid",
    "nnrt_from_torch",
    "nnrt_layer_flops",
    "nnrt_onnx_export",
    "nnrt_register_layers",
    "nnrt_to_torch",
]


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("sigmoid", Sigmoid)


@hookimpl
def nnrt_onnx_export(layer: Layer, input: str, ctx: OnnxExportContext) -> str | None:
    """ONNX: ``Sigmoid``."""
    if type(layer) is not Sigmoid:
        return None
    return ctx.add_node("Sigmoid", [input])[0]


@hookimpl
def nnrt_layer_flops(layer: Layer, in_features: int) -> int | None:
    """FLOPs: ``1 / (1 + exp(-x))`` is 4 elementwise operations per feature."""
    if type(layer) is not Sigmoid:
        return None
    return 4 * in_features


@hookimpl
def nnrt_to_torch(layer: Layer) -> TorchModule | None:
    """``sigmoid`` -> ``nn.Sigmoid()``."""
    if type(layer) is not Sigmoid:
        return None
    import torch

    return torch.nn.Sigmoid()


@hookimpl
def nnrt_from_torch(module: TorchModule) -> Layer | None:
    """``nn.Sigmoid()`` -> ``sigmoid``."""
    import torch

    if type(module) is not torch.nn.Sigmoid:
        return None
    return Sigmoid()
