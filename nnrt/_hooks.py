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

__all__ = ["first_result", "plugin_error"]


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
