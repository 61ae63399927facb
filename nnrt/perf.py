"""Performance controls: BLAS thread count and a per-layer profiler.

``set_num_threads(n)`` limits every BLAS library loaded in the process (numpy
and scipy each ship their own OpenBLAS; nnrt's kernels call scipy's) through
threadpoolctl. nnrt's own element-wise kernels are single-threaded; only the
GEMMs use BLAS threads. The default is whatever the BLAS libraries start
with: one thread per core unless ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``
say otherwise. On small networks (batch x width below ~10^6) one thread is
usually fastest: idle OpenBLAS workers spin after each call and compete with
the Python thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["get_num_threads", "profile", "set_num_threads"]


def _blas_controller() -> Any:
    # imported lazily: threadpoolctl scans the loaded libraries when created
    import scipy.linalg.cython_blas  # noqa: F401  (make sure scipy's OpenBLAS is loaded)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in every loaded BLAS library (numpy's and scipy's OpenBLAS).

    Applies process-wide until changed again; ``n`` must be a positive int.
    Libraries loaded after the call (e.g. torch's) are not affected.
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n!r}")
    controller = _blas_controller()
    controller.select(user_api="blas").limit(limits=int(n))


def get_num_threads() -> int:
    """Threads of the BLAS that nnrt's kernels use (scipy's), else the largest of any BLAS."""
    controller = _blas_controller()
    infos = controller.select(user_api="blas").info()
    if not infos:
        return 1
    for info in infos:
        if "scipy.libs" in info.get("filepath", "") or "scipy" in info.get("prefix", ""):
            return int(info["num_threads"])
    return int(max(info["num_threads"] for info in infos))


def _now() -> float:
    return time.perf_counter()


Timer = Callable[[], float]


def profile(net: Any, X: Any, y: Any = None, **kwargs: Any) -> Any:
    raise NotImplementedError
