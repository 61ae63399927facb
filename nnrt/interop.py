"""Move weights between nnrt and PyTorch: ``nnrt.from_torch`` and ``net.to_torch()``.

Needs ``torch`` (the optional extra ``nnrt[torch]``), imported only when one of
these functions is called. The layer types that map:

=========================================  ======================================
torch                                      nnrt
=========================================  ======================================
``nn.Linear(i, o)``                        ``dense(i, o)``; weight transposed:
                                           torch stores (out, in), nnrt (in, out)
``nn.Linear(i, o, bias=False)``            ``dense_nobias(i, o)``
``nn.BatchNorm1d(n, eps, momentum)``       ``batchnorm(n, momentum, eps)`` with
(affine, tracking running stats)           gamma/beta = weight/bias and the
                                           running statistics
``nn.Sigmoid()``                           ``sigmoid()``
=========================================  ======================================

Both directions copy the arrays (the two networks share no memory) and keep
the float dtype (float32 or float64). ``num_batches_tracked`` has no nnrt
counterpart: it is dropped on import and set to 0 on export (it only matters
for ``BatchNorm1d(momentum=None)``, which nnrt does not support).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from nnrt.network import Sequential
from nnrt.registry import registry

if TYPE_CHECKING:
    import torch

    from nnrt.layer import Layer

__all__ = ["from_torch", "to_torch"]

_DTYPES = ("float32", "float64")


def _require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("nnrt torch interop needs torch: pip install 'nnrt[torch]'") from exc
    return torch


def _np(t: Any) -> np.ndarray:
    return np.array(t.detach().cpu().numpy(), copy=True)


def from_torch(module: torch.nn.Module, *, dtype: Any = None, seed: int | None = 0) -> Sequential:
    """Build an nnrt ``Sequential`` with the weights of a ``torch.nn.Sequential``.

    ``module`` is a ``torch.nn.Sequential`` (or a single supported module) of
    ``Linear`` (with or without bias), ``BatchNorm1d`` (``affine=True``,
    ``track_running_stats=True``, a float ``momentum``) and ``Sigmoid``;
    ``nn.Identity`` is skipped. ``dtype`` defaults to the dtype of the torch
    parameters (float32 or float64). Anything else raises ``TypeError``
    naming the module and its position.
    """
    torch = _require_torch()
    nn = torch.nn
    if isinstance(module, nn.Sequential):
        children = list(module.children())
    elif isinstance(module, nn.Module):
        children = [module]
    else:
        raise TypeError(
            f"nnrt.from_torch: expected a torch.nn.Sequential, got {type(module).__name__}"
        )
    layers: list[Layer] = []
    state: dict[str, np.ndarray] = {}
    found_dtypes: set[str] = set()
    for pos, child in enumerate(children):
        where = f"module {pos} {child!r} ({type(child).__module__}.{type(child).__qualname__})"
        k = len(layers)
        for t in list(child.parameters()) + list(child.buffers()):
            if t.is_floating_point():
                found_dtypes.add(str(t.dtype).removeprefix("torch."))
        if isinstance(child, nn.Identity):
            continue
        if type(child) is nn.Linear:
            W = _np(child.weight).T  # (out, in) -> (in, out)
            if child.bias is None:
                layers.append(registry.make("dense_nobias", child.in_features, child.out_features))
            else:
                layers.append(registry.make("dense", child.in_features, child.out_features))
                state[f"{k}.bias"] = _np(child.bias)
            state[f"{k}.weight"] = W
        elif type(child) is nn.BatchNorm1d:
            if not child.affine or not child.track_running_stats:
                raise TypeError(
                    f"nnrt.from_torch: {where}: only BatchNorm1d(affine=True, "
                    f"track_running_stats=True) maps to nnrt's batchnorm"
                )
            if child.momentum is None:
                raise TypeError(
                    f"nnrt.from_torch: {where}: momentum=None (cumulative moving average) "
                    f"has no nnrt counterpart; set a float momentum"
                )
            layers.append(
                registry.make(
                    "batchnorm",
                    child.num_features,
                    momentum=float(child.momentum),
                    eps=float(child.eps),
                )
            )
            state[f"{k}.gamma"] = _np(child.weight)
            state[f"{k}.beta"] = _np(child.bias)
            state[f"{k}.running_mean"] = _np(child.running_mean)
            state[f"{k}.running_var"] = _np(child.running_var)
        elif type(child) is nn.Sigmoid:
            layers.append(registry.make("sigmoid"))
        else:
            raise TypeError(
                f"nnrt.from_torch: {where} has no nnrt counterpart; supported: Linear, "
                f"BatchNorm1d, Sigmoid, Identity"
            )
    if not layers:
        raise ValueError("nnrt.from_torch: the torch module holds no layer to convert")
    if dtype is None:
        bad = found_dtypes - set(_DTYPES)
        if bad:
            raise TypeError(
                f"nnrt.from_torch: parameters of dtype {sorted(bad)}; nnrt supports float32 "
                f"and float64 (convert the module, or pass dtype=)"
            )
        dtype = "float64" if "float64" in found_dtypes else "float32"
    net = Sequential(layers, seed=seed, dtype=dtype)
    net.load_state_dict(state)
    return net


def to_torch(net: Sequential) -> torch.nn.Sequential:
    """A ``torch.nn.Sequential`` with a copy of ``net``'s weights, in ``net``'s dtype.

    Maps ``dense`` → ``Linear``, ``dense_nobias`` → ``Linear(bias=False)``,
    ``batchnorm`` → ``BatchNorm1d`` (running statistics, momentum and eps
    included) and ``sigmoid`` → ``Sigmoid``. The module is returned in
    training mode, as torch builds modules; call ``.eval()`` for ``net(X)``'s
    semantics. Any other layer raises ``TypeError`` naming it and its plugin.
    """
    torch = _require_torch()
    nn = torch.nn
    tdtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[
        np.dtype(net.dtype)
    ]
    modules: list[Any] = []
    for i, layer in enumerate(net.layers):
        name = registry.name_of(type(layer))
        p, b = layer.params(), layer.buffers()

        def t(a: np.ndarray) -> Any:
            return torch.from_numpy(np.array(a, dtype=net.dtype, copy=True))

        with torch.no_grad():
            if name in ("dense", "dense_nobias"):
                n_in, n_out = p["weight"].shape
                lin = nn.Linear(n_in, n_out, bias=name == "dense", dtype=tdtype)
                lin.weight.copy_(t(p["weight"].T))
                if name == "dense":
                    lin.bias.copy_(t(p["bias"]))
                modules.append(lin)
            elif name == "batchnorm":
                cfg = layer.config()
                bn = nn.BatchNorm1d(
                    int(cfg["num_features"]),
                    eps=float(cfg["eps"]),
                    momentum=float(cfg["momentum"]),
                    dtype=tdtype,
                )
                bn.weight.copy_(t(p["gamma"]))
                bn.bias.copy_(t(p["beta"]))
                bn.running_mean.copy_(t(b["running_mean"]))
                bn.running_var.copy_(t(b["running_var"]))
                modules.append(bn)
            elif name == "sigmoid":
                modules.append(nn.Sigmoid())
            else:
                plugin = registry.get(name).plugin if name is not None else None
                what = (
                    f"registered as {name!r} by plugin {plugin!r}"
                    if name is not None
                    else f"class {type(layer).__module__}.{type(layer).__qualname__}, "
                    f"not a registered layer type"
                )
                raise TypeError(
                    f"nnrt to_torch: layer {i} {layer!r} ({what}) has no torch counterpart; "
                    f"supported: dense, dense_nobias, batchnorm, sigmoid"
                )
    return nn.Sequential(*modules)
