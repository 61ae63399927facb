"""Calling a ``firstresult`` hook and knowing which plugin answered.

``nnrt.fold`` and ``nnrt.interop`` ask the plugins one question per layer (or
pair of layers) and must check the answer: a plugin that returns something
other than what the hookspec promises gets a ``PluginError`` that names it.
pluggy's own call returns the first non-None result but not who gave it, so
``first_result`` walks the implementations itself, in pluggy's order (the
last registered first, ``tryfirst``/``trylast`` respected).
"""

from __future__ import annotations

from typing import Any

from nnrt.registry import PluginError, registry

__all__ = [
    "default_block",
    "default_block_spec",
    "first_result",
    "plugin_error",
    "plugin_warnings",
]


def first_result(hook: str, **kwargs: Any) -> tuple[Any, str]:
    """``(result, plugin name)`` of the first implementation of ``hook`` that returns
    something other than None, or ``(None, "")`` when none does.

    What an implementation raises propagates unchanged (a plugin's ``TypeError``
    for a module it cannot convert is the user's error message).
    """
    registry.ensure_loaded()
    caller = getattr(registry.pm.hook, hook)
    impls = caller.get_hookimpls()
    if any(impl.hookwrapper or getattr(impl, "wrapper", False) for impl in impls):
        # NOTE: wrappers change the result on its way out; let pluggy run them
        result = caller(**kwargs)
        return result, ("a plugin" if result is not None else "")
    for impl in reversed(impls):
        result = impl.function(*[kwargs[name] for name in impl.argnames])
        if result is not None:
            return result, str(impl.plugin_name)
    return None, ""


def plugin_error(hook: str, plugin: str, message: str) -> PluginError:
    """A ``PluginError`` for a result of ``hook`` from ``plugin`` that breaks its spec."""
    return PluginError(
        f"nnrt plugin {plugin!r}: its {hook} hook {message} (see nnrt.hookspecs.{hook})"
    )


#: the default hidden block when no plugin offers one (hook ``nnrt_default_block``)
_CORE_BLOCK = ("dense",)


def default_block() -> tuple[str, ...]:
    """The layer names of the default hidden block (hook ``nnrt_default_block``): the
    answer of the earliest-loaded plugin that gives one, else ``("dense",)``.

    The first layer changes the width (``name(in, width)``), the others keep it.
    """
    registry.ensure_loaded()
    hook = "nnrt_default_block"
    # NOTE: registration order (pluggy would ask the last-registered plugin first):
    # the built-in plugins load first and keep the defaults
    for impl in getattr(registry.pm.hook, hook).get_hookimpls():
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            continue
        result = impl.function()
        if result is None:
            continue
        plugin = str(impl.plugin_name)
        if (
            isinstance(result, (str, bytes))
            or not isinstance(result, (tuple, list))
            or not result
            or not all(isinstance(name, str) for name in result)
        ):
            raise plugin_error(
                hook,
                plugin,
                f"returned {type(result).__name__} {result!r:.80}, not a non-empty "
                f"sequence of layer names",
            )
        layers = registry.layers()
        unknown = [name for name in result if name not in layers]
        if unknown:
            raise plugin_error(
                hook, plugin, f"named {', '.join(map(repr, unknown))}, not a registered layer"
            )
        return tuple(result)
    return _CORE_BLOCK


def default_block_spec(width: int) -> str:
    """The default hidden block of ``width`` in the ``--layers`` grammar of ``nnrt train``
    (e.g. ``"dense:64"`` with the core alone)."""
    first, *rest = default_block()
    return ",".join([f"{first}:{int(width)}", *rest])


def plugin_warnings(reserved: Any = ()) -> dict[str, type[Warning]]:
    """``{name: class}`` of the warning categories plugins make public as ``nnrt.<name>``
    (hook ``nnrt_register_warnings``), asked in load order.

    A class that is not a ``Warning`` subclass, a name in ``reserved`` (nnrt's own
    names) or a name another plugin's class holds raises ``PluginError``.
    """
    registry.ensure_loaded()
    hook = "nnrt_register_warnings"
    found: dict[str, tuple[type[Warning], str]] = {}
    for impl in getattr(registry.pm.hook, hook).get_hookimpls():
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            continue
        plugin = str(impl.plugin_name)

        def register(cls: Any, /, plugin: str = plugin) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Warning)):
                raise plugin_error(
                    hook,
                    plugin,
                    f"registered {type(cls).__name__} {cls!r:.80}, not a Warning class",
                )
            name = cls.__name__
            if not name.endswith("Warning") or name.startswith("_"):
                raise plugin_error(
                    hook, plugin, f"registered {name!r}; a public warning's name ends in 'Warning'"
                )
            if name in reserved:
                raise plugin_error(hook, plugin, f"registered {name!r}, a name of nnrt's own")
            held = found.get(name)
            if held is not None and held[0] is not cls:
                raise plugin_error(
                    hook, plugin, f"registered {name!r}, which plugin {held[1]!r} already holds"
                )
            found[name] = (cls, plugin)

        impl.function(register)
    return {name: cls for name, (cls, _) in found.items()}
