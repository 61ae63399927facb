"""Run crash-prone test cases in a child process, so a segfault fails a test.

``isolated(fn, *args)`` calls the module-level function ``fn`` in a long-lived
worker process (one per pytest process, started with the ``spawn`` method so
that it is a fresh interpreter that shares no threads or BLAS state with
pytest) and returns its result. If the worker dies (segfault, abort, ``kill
-9``, an AddressSanitizer report) or hangs (no answer within
``NNRT_TEST_WORKER_TIMEOUT`` seconds, default 120: the worker is killed), the
call raises ``WorkerCrashed`` with the signal and the arguments, and the next
call starts a new worker. Exceptions
raised by ``fn`` are re-raised in the caller as themselves.

``fn`` and its arguments must be picklable: define ``fn`` at module level in a
module the worker can import (``tests/`` is on the worker's ``sys.path``
because multiprocessing's spawn passes the parent's ``sys.path`` on).

Set ``NNRT_TEST_INPROCESS=1`` to call ``fn`` directly (faster to debug, no
crash isolation).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

__all__ = ["WorkerCrashed", "isolated", "shutdown"]

T = TypeVar("T")

_pool: ProcessPoolExecutor | None = None
_TIMEOUT = float(os.environ.get("NNRT_TEST_WORKER_TIMEOUT", "120"))


class WorkerCrashed(AssertionError):
    """The worker process died while running a case (a crash in native code)."""


def _worker_init() -> None:
    # one BLAS thread in the worker: the machine is shared and results must not
    # depend on thread scheduling
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import nnrt  # noqa: F401  (pay the import once, not per case)


def _get_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        ctx = multiprocessing.get_context("spawn")
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_worker_init)
    return _pool


def shutdown() -> None:
    """Stop the worker (called at exit; tests may call it to start afresh)."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True, cancel_futures=True)
        _pool = None


atexit.register(shutdown)


def _describe_exit(pool: ProcessPoolExecutor) -> str:
    codes = []
    for proc in list(getattr(pool, "_processes", {}).values()):
        code = proc.exitcode
        if code is not None and code < 0:
            try:
                codes.append(f"killed by {signal.Signals(-code).name}")
            except ValueError:
                codes.append(f"killed by signal {-code}")
        elif code is not None:
            codes.append(f"exit code {code}")
    return ", ".join(codes) or "died"


def isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the worker process; a crash raises ``WorkerCrashed``."""
    if os.environ.get("NNRT_TEST_INPROCESS", "") not in ("", "0"):
        return fn(*args, **kwargs)
    global _pool
    pool = _get_pool()
    try:
        future = pool.submit(fn, *args, **kwargs)
        return future.result(timeout=_TIMEOUT)
    except TimeoutError as exc:
        # a hang: kill the worker (the next call starts a new one) and fail the case
        _pool = None
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise WorkerCrashed(
            f"the worker process running {fn.__module__}.{fn.__qualname__} hung "
            f"(no answer in {_TIMEOUT:.0f} s; NNRT_TEST_WORKER_TIMEOUT): killed"
        ) from exc
    except BrokenProcessPool as exc:
        how = _describe_exit(pool)
        _pool = None
        try:
            pool.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass
        shown = ", ".join(
            [repr(a)[:300] for a in args] + [f"{k}={v!r:.300}" for k, v in kwargs.items()]
        )
        raise WorkerCrashed(
            f"the worker process running {fn.__module__}.{fn.__qualname__}({shown}) "
            f"crashed ({how}): native code crashed instead of raising an exception"
        ) from exc
