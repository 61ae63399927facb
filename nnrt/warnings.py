"""Warning classes nnrt emits about networks, and a helper that points them at user code.

Import them as ``nnrt.NetworkWarning`` etc. A plugin's network check defines
its own subclass of ``NetworkWarning``.
"""

from __future__ import annotations

import os
import sys
import types
import warnings as _warnings

__all__ = ["NetworkWarning", "TrainingWarning", "warn_user"]


class NetworkWarning(UserWarning):
    """Base class of the warnings a network check (hook ``nnrt_check_network``) emits."""


class TrainingWarning(UserWarning):
    """Something ``fit`` adjusted for you (e.g. skipped a mini-batch of one sample)."""


def _internal_dirs() -> tuple[str, ...]:
    """Where frames to skip live: nnrt, pluggy, and every plugin loaded from an entry
    point (its top-level package's directory, or its file), nnrt's own included.

    Plugins registered at run time are user code: their frames are not skipped.
    """
    import pluggy

    dirs = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(pluggy.__file__)]
    paths = [d + os.sep for d in dirs]
    from nnrt.registry import registry  # NOTE: here, not on top: the registry imports us

    for name, info in registry.plugins().items():
        if not info.source.startswith("entry point"):
            continue
        plugin = registry.pm.get_plugin(name)
        module = (
            plugin
            if isinstance(plugin, types.ModuleType)
            else sys.modules.get(type(plugin).__module__)
        )
        top = sys.modules.get(getattr(module, "__name__", "").split(".", 1)[0])
        where = getattr(top, "__file__", None)
        if where is None:
            continue
        where = os.path.abspath(where)
        if os.path.basename(where) == "__init__.py":  # a package: all of it
            paths.append(os.path.dirname(where) + os.sep)
        else:
            paths.append(where)
    return tuple(paths)


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the stack level of the first frame outside nnrt, pluggy
    and the installed plugins."""
    internal = _internal_dirs()
    level = 2  # 1 is warn_user itself; 2 its caller
    frame = sys._getframe(1)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        internal
    ):
        frame = frame.f_back
        level += 1
    _warnings.warn(message, category, stacklevel=level)
