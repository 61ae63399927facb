"""Move weights between nnrt and PyTorch: ``nnrt.from_torch`` and ``net.to_torch()``.

Needs ``torch`` (the optional extra ``nnrt[torch]``), imported only when one of
these functions is called. Which module a layer becomes, and back, is the
business of the plugin that provides the layer, through two hooks
(``nnrt.hookspecs``): ``nnrt_to_torch(layer)`` and ``nnrt_from_torch(module)``.
The core's own plugin maps ``dense(i, o)`` <-> ``nn.Linear(i, o)`` (weight
transposed: torch stores (out, in), nnrt (in, out)); each built-in plugin
documents its mapping in its module docstring (``nnrt_plugins.sigmoid`` etc.),
exactly as a third-party plugin would.

Both directions copy the arrays (the two networks share no memory) and keep
the float dtype (float32 or float64). ``nn.Identity`` is skipped on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from nnrt._hooks import first_result, plugin_error
from nnrt._locks import holding
from nnrt._network import Network, build
from nnrt.layer import Layer
from nnrt.registry import registry

if TYPE_CHECKING:
    import torch

__all__ = ["from_torch", "to_torch"]

_DTYPES = ("float32", "float64")


def _require_torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("nnrt torch interop needs torch: pip install 'nnrt[torch]'") from exc
    return torch


def from_torch(module: torch.nn.Module, *, dtype: Any = None, seed: int | None = 0) -> Network:
    """Build an nnrt ``Sequential`` with the weights of a ``torch.nn.Sequential``.

    ``module`` is a ``torch.nn.Sequential`` (or a single supported module) of
    modules some plugin converts (hook ``nnrt_from_torch``: the core's
    ``Linear``, the built-in plugins' ``Linear(bias=False)``, ``Sigmoid`` and
    their normalisation modules); ``nn.Identity`` is skipped. ``dtype``
    defaults to the dtype of the torch parameters (float32 or float64).
    Anything else raises ``TypeError`` naming the module and its position.
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
        for t in list(child.parameters()) + list(child.buffers()):
            if t.is_floating_point():
                found_dtypes.add(str(t.dtype).removeprefix("torch."))
        if isinstance(child, nn.Identity):
            continue
        try:
            layer, plugin = first_result("nnrt_from_torch", module=child)
        except (TypeError, ValueError) as exc:
            # a plugin that knows the class refuses a setting: say where it is
            kind = TypeError if isinstance(exc, TypeError) else ValueError
            raise kind(f"nnrt.from_torch: {where}: {exc}") from exc
        if layer is None:
            raise TypeError(
                f"nnrt.from_torch: {where} has no nnrt counterpart: no plugin's "
                f"nnrt_from_torch hook converts it (the plugin that provides a matching "
                f"layer can implement that hook; see nnrt.hookspecs.nnrt_from_torch)"
            )
        if not isinstance(layer, Layer):
            raise plugin_error(
                "nnrt_from_torch",
                plugin,
                f"returned {type(layer).__name__} {layer!r:.80} for {where}, not an nnrt.Layer",
            )
        k = len(layers)
        layers.append(layer)
        # NOTE: copied now: Network re-initialises the layers from its seed
        for name, arr in [*layer.params().items(), *layer.buffers().items()]:
            state[f"{k}.{name}"] = np.array(arr, copy=True)
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
    net = build(layers, seed=seed, dtype=dtype)
    net.load_state_dict(state)
    return net


def to_torch(net: Network) -> torch.nn.Sequential:
    """A ``torch.nn.Sequential`` with a copy of ``net``'s weights, in ``net``'s dtype.

    Each layer becomes the module its plugin's ``nnrt_to_torch`` hook builds
    (``dense`` → ``Linear``; see each plugin for its layers). The module is returned in
    training mode, as torch builds modules; call ``.eval()`` for ``net(X)``'s
    semantics. Any other layer raises ``TypeError`` naming it and its plugin.
    """
    torch = _require_torch()
    # the weights of one whole step when another thread trains the network
    with holding(net):
        return _to_torch(net, torch)


def _to_torch(net: Network, torch: Any) -> Any:
    nn = torch.nn
    tdtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[
        np.dtype(net.dtype)
    ]
    modules: list[Any] = []
    for i, layer in enumerate(net.layers):
        module, plugin = first_result("nnrt_to_torch", layer=layer)
        if module is None:
            name = registry.name_of(type(layer))
            owner = registry.get(name).plugin if name is not None else None
            what = (
                f"registered as {name!r} by plugin {owner!r}"
                if name is not None
                else f"class {type(layer).__module__}.{type(layer).__qualname__}, "
                f"not a registered layer type"
            )
            raise TypeError(
                f"nnrt to_torch: layer {i} {layer!r} ({what}) has no torch counterpart: no "
                f"plugin's nnrt_to_torch hook converts it (the plugin that provides the layer "
                f"can implement that hook; see nnrt.hookspecs.nnrt_to_torch)"
            )
        if not isinstance(module, nn.Module):
            raise plugin_error(
                "nnrt_to_torch",
                plugin,
                f"returned {type(module).__name__} {module!r:.80} for layer {i} {layer!r}, "
                f"not a torch.nn.Module",
            )
        modules.append(module.to(dtype=tdtype))
    return nn.Sequential(*modules)
