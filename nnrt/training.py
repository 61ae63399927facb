"""Per-network locks (the training loop itself is ``nnrt.engine``).

``network_locks(net)`` gives the ``(inference RLock, training Lock)`` pair that
``nnrt.engine`` holds: the training lock for a whole ``fit`` (a second one
raises), the inference lock around each training step and each ``predict`` /
``evaluate``.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnrt.network import Sequential

__all__ = ["network_locks"]


# ---------------------------------------------------------------- thread safety
# Layers reuse their output buffers (BatchNorm its scratch too) and the kernels
# release the GIL, so two threads inside forward() of one network would overwrite
# each other's results. predict/evaluate/fit hold a per-network re-entrant lock
# (callbacks may predict inside fit); a second fit on a network that is already
# training raises instead of waiting. Locks live in a weak dictionary, not on the
# network, so copying or pickling a network is unaffected. (docs/reliability.md)
_LOCKS: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def network_locks(net: Sequential) -> tuple[Any, Any]:
    """``(inference RLock, training Lock)`` of ``net``, created on first use."""
    with _LOCKS_GUARD:
        locks = _LOCKS.get(net)
        if locks is None:
            locks = _LOCKS[net] = (threading.RLock(), threading.Lock())
        return locks
