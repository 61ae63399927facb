"""Per-network locks: what makes one network safe to share between threads.

Layers reuse their output buffers (some their scratch too) and the kernels
release the GIL, so two threads inside ``forward`` of one network would
overwrite each other's results, and a thread reading the weights while another
writes them would see a mix. Each network therefore has two locks:

* the **state lock** (re-entrant): held by ``predict``/``evaluate`` for a whole
  call, by ``fit`` for each training step (forward, loss, backward, optimizer
  step), and by everything that reads or writes the parameters as a whole
  (``state_dict``, ``load_state_dict``, ``save``, ``fold``, optimizer
  steps). So a hot swap (``load_state_dict`` from another thread) during
  ``predict`` gives the old or the new model's answers, never a mix, and
  ``save`` during ``fit`` writes the weights of one whole step. Re-entrant:
  a loss, callback or optimizer may call ``predict`` on the same network from
  the thread that holds it.
* the **training lock**: held for a whole ``fit``; a second ``fit`` on the same
  network (another thread, or a callback of its own fit) raises at once
  instead of waiting.

Locks live in a weak dictionary keyed by the network, not on it, so copying or
pickling a network is unaffected. After ``os.fork`` the child gets fresh locks
(``os.register_at_fork``): a lock held by a thread of the parent at the moment
of the fork would otherwise stay held forever in the child, whose copy of that
thread does not exist, and the child's first ``predict`` would block.

This module imports nothing of nnrt at module level (the network and training
modules import it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

__all__ = ["holding", "network_locks", "serialised", "state_lock", "training_guard"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_LOCKS: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()
# Bumped in a forked child: a lock object cached by a caller (an optimizer's step)
# stays valid while the generation it was fetched in is current.
generation = 0


def network_locks(net: Any) -> tuple[Any, Any]:
    """``(state RLock, training Lock)`` of ``net``, created on first use."""
    locks = _LOCKS.get(net)
    if locks is not None:
        return locks
    with _GUARD:
        locks = _LOCKS.get(net)
        if locks is None:
            locks = _LOCKS[net] = (threading.RLock(), threading.Lock())
        return locks


def state_lock(net: Any) -> Any:
    """The re-entrant lock guarding ``net``'s parameters, buffers and layer buffers.

    Look it up each time it is taken (do not keep it across a step): after a
    fork the child's network gets a new lock.
    """
    return network_locks(net)[0]


def holding(net: Any) -> Any:
    """``with holding(net):`` the state lock of ``net`` (the lock itself: no generator
    overhead on the per-step path)."""
    return state_lock(net)


@contextlib.contextmanager
def training_guard(net: Any, what: str) -> Iterator[None]:
    """Hold ``net``'s training lock; raise ``RuntimeError`` if it is already training."""
    training = network_locks(net)[1]
    if not training.acquire(blocking=False):
        raise RuntimeError(
            f"{what}: this network is already being trained (by another thread, or "
            f"from a callback of its own fit); training one network from two threads "
            f"at once would corrupt its weights. Wait for the first fit, or train a "
            f"copy (save it and nnrt.load the file)."
        )
    try:
        yield
    finally:
        training.release()


def serialised(exclusive: bool) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorate ``fn(net, ...)``.

    ``exclusive=False``: run holding the state lock for the whole call (predict,
    evaluate). ``exclusive=True``: hold the training lock for the whole call and
    refuse a second one; the function takes the state lock itself, per step.
    """

    def deco(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            net = args[0] if args else kwargs["net"]
            if exclusive:
                with training_guard(net, fn.__name__):
                    return fn(*args, **kwargs)
            with holding(net):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def _reset_after_fork() -> None:
    # NOTE: only the forking thread exists in the child; a lock another thread of
    # the parent held is held forever here. Fresh locks for every network; the
    # forking thread keeps (and releases) the old lock objects it already holds.
    global _LOCKS, _GUARD, generation
    _LOCKS = weakref.WeakKeyDictionary()
    _GUARD = threading.Lock()
    generation += 1


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_reset_after_fork)
