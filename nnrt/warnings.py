"""Warning classes nnrt emits about networks, and a helper that points them at user code.

Import them as ``nnrt.BiasBeforeBatchNormWarning`` etc.
"""

from __future__ import annotations

import os
import sys
import warnings as _warnings

__all__ = ["BiasBeforeBatchNormWarning", "NetworkWarning", "TrainingWarning", "warn_user"]


class NetworkWarning(UserWarning):
    """Base class of the warnings a network check (hook ``nnrt_check_network``) emits."""


class BiasBeforeBatchNormWarning(NetworkWarning):
    """A ``dense`` layer with a bias feeds a ``batchnorm`` layer: the bias does nothing.

    BatchNorm subtracts the per-feature batch mean right after the dense layer.
    For ``x = u + b`` (``u = X @ W``, ``b`` the bias) the normalised value is
    ``x - E[x] = u + b - (E[u] + b) = u - E[u]``: the bias cancels exactly, in
    training (batch mean) and in eval (the running mean absorbs it too), so it
    receives a gradient whose effect on the output is zero. Ioffe & Szegedy
    make this argument in the BatchNorm paper (2015, section 2: "the
    combination of the update to b and subsequent change in normalization led
    to no change in the output of the layer nor, consequently, the loss") and
    drop the bias in section 3.2: "the bias b can be ignored since its effect
    will be canceled by the subsequent mean subtraction (the role of the bias
    is subsumed by beta)". BatchNorm's learned shift ``beta`` does what the
    bias would have done.

    The network still works; the bias wastes parameters, optimizer state and
    time, and weight decay or a bias that drifts with the running mean make it
    misleading. Use ``dense_nobias`` instead of ``dense`` before ``batchnorm``.
    Silence with ``warnings.filterwarnings("ignore",
    category=nnrt.BiasBeforeBatchNormWarning)``.
    """


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
