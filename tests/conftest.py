"""Shared fixtures for the nnrt test suite.

References live in the tests themselves (float64 numpy formulas, finite
differences); torch is an extra oracle used only when it is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

FLOAT_DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]

# Tolerances for comparing a layer's output (in its own dtype) with a float64
# reference computed from the same (already rounded) inputs and parameters.
_TOLERANCES = {
    np.dtype(np.float32): {"rtol": 2e-5, "atol": 2e-5},
    np.dtype(np.float64): {"rtol": 1e-12, "atol": 1e-12},
}


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, fixed-seed generator per test (tests stay independent of order)."""
    return np.random.default_rng(20240531)


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: d.name)
def dtype(request: pytest.FixtureRequest) -> np.dtype:
    """Both supported float dtypes."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def tol() -> Callable[[Any], dict[str, float]]:
    """``tol(dtype)`` -> ``{"rtol": ..., "atol": ...}`` for ``assert_allclose``."""

    def _tol(dt: Any) -> dict[str, float]:
        return dict(_TOLERANCES[np.dtype(dt)])

    return _tol


@pytest.fixture(scope="session")
def torch() -> Any:
    """torch as an extra oracle; the test is skipped cleanly when it is not installed."""
    return pytest.importorskip("torch")


@pytest.fixture
def fd_grad() -> Callable[[Callable[[], float], np.ndarray, float], np.ndarray]:
    """``fd_grad(f, x, eps)``: central finite differences of scalar ``f()`` w.r.t. ``x``.

    ``x`` is perturbed in place (and restored), so it may be a live parameter
    array or the input array that ``f`` closes over.
    """

    def _fd(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
        g = np.zeros(x.shape, dtype=np.float64)
        it = np.nditer(x, flags=["multi_index"])
        for _ in it:
            idx = it.multi_index
            orig = x[idx].copy()
            x[idx] = orig + eps
            fp = f()
            x[idx] = orig - eps
            fm = f()
            x[idx] = orig
            g[idx] = (fp - fm) / (2 * eps)
        return g

    return _fd


# ---- hypothesis profiles (reliability suite, tests/test_fuzz_api.py; docs/reliability.md)
# "ci": 300 examples for the main fuzz test (others run a fraction), the default when
# CI=true; "long": 10^4, by hand with `pytest --hypothesis-profile=long`.
try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hyp_settings
except ImportError:  # hypothesis is in the [test] extra
    pass
else:
    _hyp_common: dict[str, Any] = {
        "deadline": None,  # shared CI machines: timing varies
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        "print_blob": True,
    }
    _hyp_settings.register_profile("ci", max_examples=300, **_hyp_common)
    _hyp_settings.register_profile("long", max_examples=10_000, **_hyp_common)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        _hyp_settings.load_profile("ci")
