"""nnrt: a small, fast neural-network runtime for the CPU.

A Cython core runs dense forward/backward passes; every other layer type
arrives as a pluggy plugin (entry-point group ``nnrt``).

    import nnrt
    net = nnrt.Sequential([nnrt.layer("dense", 4, 8), nnrt.layer("sigmoid"),
                           nnrt.layer("dense", 8, 2)], seed=0)
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any, cast

from nnrt import layer as _layer_module
from nnrt import registry
from nnrt.dense import Dense
from nnrt.engine import (
    Callback,
    Checkpoint,
    EarlyStopping,
    History,
    LambdaCallback,
    ProgressBar,
    TrainingState,
)
from nnrt.hookspecs import hookimpl, hookspec
from nnrt.interop import from_torch
from nnrt.layer import ABI_VERSION, Layer, check_abi
from nnrt.network import Sequential
from nnrt.perf import get_num_threads, profile, set_num_threads
from nnrt.registry import PluginError, PluginWarning
from nnrt.serve import InferenceSession, freeze
from nnrt.warnings import NetworkWarning, TrainingWarning

__version__ = "0.1.0"

__all__ = [
    "ABI_VERSION",
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "History",
    "LambdaCallback",
    "NetworkWarning",
    "TrainingState",
    "TrainingWarning",
    "load",
    "Dense",
    "InferenceSession",
    "Layer",
    "PluginError",
    "PluginWarning",
    "ProgressBar",
    "Sequential",
    "available_layers",
    "available_losses",
    "available_optimizers",
    "check_abi",
    "freeze",
    "from_torch",
    "get_num_threads",
    "hookimpl",
    "hookspec",
    "layer",
    "loss",
    "losses",
    "optim",
    "optimizer",
    "profile",
    "register_plugin",
    "set_num_threads",
    "show_config",
    "testing",
]


def available_layers() -> dict[str, str]:
    """Map each registered layer name to the name of the plugin that provides it."""
    return {name: entry.plugin for name, entry in sorted(registry.layers().items())}


def available_losses() -> dict[str, str]:
    """Map each registered loss name to the name of the plugin that provides it."""
    return {name: entry.plugin for name, entry in sorted(registry.losses().items())}


def available_optimizers() -> dict[str, str]:
    """Map each registered optimizer name to the name of the plugin that provides it."""
    return {name: entry.plugin for name, entry in sorted(registry.optimizers().items())}


def loss(name: str) -> Any:
    """The loss function registered as ``name``: ``loss_value, dY = nnrt.loss(name)(Y, target)``.

    Unknown names raise KeyError listing the registered ones.
    """
    return registry.get_loss(name).fn


def optimizer(name: str, net: Any, **kwargs: Any) -> Any:
    """Build the optimizer registered as ``name`` over ``net`` (e.g. ``("sgd", net, lr=0.1)``).

    Unknown names raise KeyError listing the registered ones; keyword arguments
    go to the optimizer's constructor.
    """
    return registry.make_optimizer(name, net, **kwargs)


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin (module or object with ``@nnrt.hookimpl`` functions) now.

    Its pluggy name is ``name``, else the object's ``__name__``, else its class
    name; returns that name. Errors name the plugin; nothing of a failed plugin
    stays registered.
    """
    return registry.register_plugin(plugin, name)


if TYPE_CHECKING:

    def layer(name: str, *args: Any, **kwargs: Any) -> Layer:
        """Build the layer registered as ``name``."""
        ...

else:

    class _CallableLayerModule(types.ModuleType):
        """``nnrt.layer`` is both the module holding ``Layer`` (for ``from
        nnrt.layer import Layer`` and Cython's ``cimport``) and the factory
        ``nnrt.layer(name, *args, **kwargs)``."""

        def __call__(self, name: str, *args: Any, **kwargs: Any) -> Layer:
            """Build the layer registered as ``name``; unknown names raise KeyError
            listing the registered ones."""
            return registry.make(name, *args, **kwargs)

    _layer_module.__class__ = _CallableLayerModule
    layer = sys.modules["nnrt.layer"]


def show_config(file: Any = None, *, as_json: bool = False) -> None:
    """Print what to paste into a bug report: nnrt version and ABI, BLAS libraries
    and threads, build flags, plugins (see ``nnrt.config``; also ``nnrt info``)."""
    from nnrt.config import show_config as _show_config

    _show_config(file, as_json=as_json)


def __getattr__(name: str) -> Any:
    """``nnrt.<SomeWarning>``: a warning category a plugin makes public (hook
    ``nnrt_register_warnings``), found through the registry (the core imports no
    plugin)."""
    # NOTE: only names of warning classes: ``from nnrt import losses`` (and hasattr
    # probes) ask this function about other names, which must not load plugins
    if name.endswith("Warning") and not name.startswith("_"):
        from nnrt._hooks import plugin_warnings

        found = plugin_warnings(reserved=globals())
        if name in found:
            return found[name]
        raise AttributeError(
            f"module 'nnrt' has no attribute {name!r} (nor does a loaded plugin register "
            f"a warning of that name: nnrt plugins)"
        )
    raise AttributeError(f"module 'nnrt' has no attribute {name!r}")


def __dir__() -> list[str]:
    from nnrt._hooks import plugin_warnings

    try:
        extra = list(plugin_warnings(reserved=globals()))
    except PluginError:
        extra = []
    return sorted([*globals(), *extra])


def load(path: Any) -> Sequential:
    """Read a network written by ``Sequential.save`` (see ``nnrt.io.load``)."""
    from nnrt.io import load as _load

    return cast(Sequential, _load(path))  # io builds nnrt.Sequential (nnrt._network.build)


# submodules named in __all__ (imported last: they import nnrt's classes above)
from nnrt import losses, optim, testing  # noqa: E402
