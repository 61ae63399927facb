"""Type stub for the compiled ``nnrt._blas`` module (``_blas.pyx``): the BLAS backend
of nnrt's GEMM/GEMV helpers."""

from typing import Any

import numpy as np

BACKENDS: tuple[str, ...]
KERNEL_MODES: tuple[str, ...]

def find_numpy_openblas() -> str | None:
    """Path of numpy's bundled OpenBLAS, or None."""

def find_mkl() -> str | None:
    """Path of MKL's ``libmkl_rt`` installed next to this Python, or None."""

def available() -> list[str]:
    """Names of the backends that load on this machine."""

def use(name: str) -> str:
    """Route nnrt's GEMMs through backend ``name``; returns the previous one."""

def use_kernel(mode: str) -> str:
    """Route qualifying GEMMs through nnrt's own kernel: "auto", "on" or "off";
    returns the previous mode."""

def resolve() -> None:
    """Finish the pending automatic choices (MKL and nnrt's kernel calibrations)."""

def threads() -> int:
    """Threads of the backend in use."""

def set_threads(n: int) -> None:
    """Set the thread count of the backend in use."""

def thread_control_addresses() -> tuple[int, int] | None:
    """(set, get) C addresses of the backend's thread controls, or None."""

def info() -> dict[str, Any]:
    """The backend in use: name, library, kernel, threads, reason, ..."""

def _set_split(mode: int | None = None, chunks: int | None = None) -> tuple[int, int]:
    """Change how nnrt's GEMM kernel is split over two threads (measurements): mode 0
    rows, 1 rows (columns for few rows), 2 columns; returns the previous (mode, chunks)."""

def prefetch_rows(src: np.ndarray, rows: np.ndarray) -> int:
    """Queue rows of ``src`` for this thread's kernel GEMMs to prefetch; lines queued."""

def prefetch_left() -> int:
    """Cache lines this thread's prefetch queue still holds."""

def prefetch_clear(release: bool = False) -> None:
    """Empty this thread's prefetch queue."""
