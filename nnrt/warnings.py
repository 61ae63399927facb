"""Warning classes nnrt emits about networks, and a helper that points them at user code.

Import them as ``nnrt.NetworkWarning`` etc. A plugin's network check defines
its own subclass of ``NetworkWarning``.
"""

from __future__ import annotations

import os
import sys
import warnings as _warnings

__all__ = ["NetworkWarning", "TrainingWarning", "warn_user"]


class NetworkWarning(UserWarning):
    """Base class of the warnings a network check (hook ``nnrt_check_network``) emits."""


class TrainingWarning(UserWarning):
    """Something ``fit`` adjusted for you (e.g. skipped a mini-batch of one sample)."""


def _internal_dirs() -> tuple[str, ...]:
    """Directories of nnrt, its built-in plugins and pluggy (frames to skip)."""
    import pluggy

    dirs = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(pluggy.__file__)]
    try:
        import nnrt_plugins

        dirs.append(os.path.dirname(os.path.abspath(nnrt_plugins.__file__)))
    except ImportError:  # pragma: no cover - nnrt without its built-in plugins
        pass
    return tuple(d + os.sep for d in dirs)


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the stack level of the first frame outside nnrt and pluggy."""
    internal = _internal_dirs()
    level = 2  # 1 is warn_user itself; 2 its caller
    frame = sys._getframe(1)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        internal
    ):
        frame = frame.f_back
        level += 1
    _warnings.warn(message, category, stacklevel=level)
