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


# Where entry-point plugins live (the registry reports each one it loads, so this
# module needs nothing from the registry): their frames are library code too.
_PLUGIN_PATHS: list[str] = []


def skip_frames_of(plugin: object) -> None:
    """Count ``plugin``'s top-level package (or its file) as library code for
    ``warn_user``. The registry calls it for every plugin it loads from an entry
    point; plugins registered at run time are user code and are not skipped."""
    module = (
        plugin if isinstance(plugin, types.ModuleType) else sys.modules.get(type(plugin).__module__)
    )
    top = sys.modules.get(getattr(module, "__name__", "").split(".", 1)[0])
    where = getattr(top, "__file__", None)
    if where is None:
        return
    where = os.path.abspath(where)
    path = os.path.dirname(where) + os.sep if os.path.basename(where) == "__init__.py" else where
    if path not in _PLUGIN_PATHS:
        _PLUGIN_PATHS.append(path)


def _internal_dirs() -> tuple[str, ...]:
    """Where frames to skip live: nnrt, pluggy, and every plugin loaded from an entry
    point (its top-level package's directory, or its file), nnrt's own included."""
    import pluggy

    dirs = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(pluggy.__file__)]
    return tuple(d + os.sep for d in dirs) + tuple(_PLUGIN_PATHS)


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
