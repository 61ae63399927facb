"""The core's own plugin: the ``dense`` layer, the built-in losses and optimizers.

``dense`` is exported to ONNX (``Gemm``) and mapped to and from torch
(``nn.Linear``, weight transposed: torch stores (out, in), nnrt (in, out))
through the same hooks as every plugin's layers.

They register through the same hooks as any third-party plugin, so a plugin's
``mse`` or ``adam`` would clash with these (and be refused) exactly as two
third-party plugins would clash with each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from nnrt import losses, optim
from nnrt.dense import Dense
from nnrt.hookspecs import RegisterLayer, RegisterLoss, RegisterOptimizer, hookimpl
from nnrt.layer import Layer

if TYPE_CHECKING:
    from nnrt.hookspecs import OnnxExportContext, TorchModule


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
def nnrt_onnx_export(layer: Layer, input: str, ctx: OnnxExportContext) -> str | None:
    """ONNX: ``Gemm(X, W, b)`` with W stored as (in_features, out_features), no transpose."""
    if type(layer) is not Dense:
        return None
    p = layer.params()
    W = ctx.add_initializer("weight", p["weight"])
    b = ctx.add_initializer("bias", p["bias"])
    return ctx.add_node("Gemm", [input, W, b])[0]


def _tensor(torch: Any, a: np.ndarray) -> Any:
    """A torch tensor holding a copy of ``a`` (shares no memory with it)."""
    return torch.from_numpy(np.array(a, copy=True))


@hookimpl
def nnrt_to_torch(layer: Layer) -> TorchModule | None:
    """``dense(i, o)`` -> ``nn.Linear(i, o)`` (weight transposed)."""
    if type(layer) is not Dense:
        return None
    import torch

    p = layer.params()
    n_in, n_out = p["weight"].shape
    W = _tensor(torch, p["weight"].T)
    lin = torch.nn.Linear(n_in, n_out, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(_tensor(torch, p["bias"]))
    return lin


@hookimpl
def nnrt_from_torch(module: TorchModule) -> Layer | None:
    """``nn.Linear(i, o)`` (with a bias) -> ``dense(i, o)``."""
    import torch

    if type(module) is not torch.nn.Linear or module.bias is None:
        return None
    layer = Dense(module.in_features, module.out_features)
    p = layer.params()
    np.copyto(p["weight"], module.weight.detach().cpu().numpy().T)
    np.copyto(p["bias"], module.bias.detach().cpu().numpy())
    return layer


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
