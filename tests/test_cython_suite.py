"""Shim collecting the compiled tests in ``nnrt_cytests._cy_layer_tests``.

The .pyx module (built for the tests only, by ``tests/_cytests.py``, from
``tests/cython/``; never installed with nnrt) cimports nnrt's
.pxd files and exercises the ``nogil`` kernels and C-level dispatch directly;
each of its ``test_*`` functions becomes one pytest item here. The Python
tests below put its Cython ``CyScale`` layer, registered at run time through
``nnrt.register_plugin``, inside ``nnrt.Sequential`` next to ``dense`` layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _cytests import load

import nnrt

cy = load("_cy_layer_tests")

CY_TESTS = sorted(name for name in dir(cy) if name.startswith("test_"))


def test_compiled_suite_is_not_empty() -> None:
    assert len(CY_TESTS) >= 10, CY_TESTS


@pytest.mark.parametrize("name", CY_TESTS)
def test_compiled(name: str) -> None:
    fn: Callable[[], Any] = getattr(cy, name)
    fn()


# ------------------------------------------------- CyScale as a run-time plugin
CYSCALE_NAME = "cy_scale_suite"


class CyScalePlugin:
    """A plugin object whose hookimpl registers the compiled CyScale layer."""

    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register(CYSCALE_NAME, cy.CyScale)


@pytest.fixture(scope="module")
def cyscale_registered() -> str:
    """Register CyScale into the global registry once (it is process-global)."""
    if CYSCALE_NAME not in nnrt.available_layers():
        nnrt.register_plugin(CyScalePlugin(), name="cy_scale_suite_plugin")
    return CYSCALE_NAME


def test_cyscale_plugin_is_listed(cyscale_registered: str) -> None:
    layers = nnrt.available_layers()
    assert layers[cyscale_registered] == "cy_scale_suite_plugin"
    layer = nnrt.layer(cyscale_registered, 4)
    assert isinstance(layer, cy.CyScale)
    assert isinstance(layer, nnrt.Layer)


def _reference(
    X: np.ndarray,
    dY: np.ndarray,
    W0: np.ndarray,
    b0: np.ndarray,
    s: np.ndarray,
    W2: np.ndarray,
    b2: np.ndarray,
) -> dict[str, np.ndarray]:
    """float64 numpy: dense -> scale -> dense, forward and backward."""
    X, dY, W0, b0, s, W2, b2 = (np.asarray(a, dtype=np.float64) for a in (X, dY, W0, b0, s, W2, b2))
    H = X @ W0 + b0
    G = H * s
    Y = G @ W2 + b2
    dG = dY @ W2.T
    dH = dG * s
    return {
        "Y": Y,
        "dX": dH @ W0.T,
        "0.weight": X.T @ dH,
        "0.bias": dH.sum(axis=0),
        "1.scale": (dG * H).sum(axis=0),
        "2.weight": G.T @ dY,
        "2.bias": dY.sum(axis=0),
    }


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cyscale_in_sequential(cyscale_registered: str, dtype: str) -> None:
    net = nnrt.Sequential(
        [
            nnrt.layer("dense", 5, 7),
            nnrt.layer(cyscale_registered, 7),
            nnrt.layer("dense", 7, 3),
        ],
        seed=3,
        dtype=dtype,
    )
    rng = np.random.default_rng(7)
    X = rng.standard_normal((6, 5)).astype(dtype)
    dY = rng.standard_normal((6, 3)).astype(dtype)
    p = net.params()
    assert set(p) == {"0.weight", "0.bias", "1.scale", "2.weight", "2.bias"}
    assert all(a.dtype == np.dtype(dtype) for a in p.values())
    # Sequential re-seeds CyScale through reset_parameters: uniform in [0.5, 1.5)
    s = p["1.scale"]
    assert np.all((s >= 0.5) & (s < 1.5))
    assert not np.allclose(s, 1.0)

    Y = net.forward(X, training=True).copy()
    dX = net.backward(dY)
    ref = _reference(X, dY, p["0.weight"], p["0.bias"], s, p["2.weight"], p["2.bias"])
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-12}
    assert Y.dtype == np.dtype(dtype) and dX.dtype == np.dtype(dtype)
    np.testing.assert_allclose(Y, ref["Y"], **tol)
    np.testing.assert_allclose(dX, ref["dX"], **tol)
    for key, g in net.grads().items():
        np.testing.assert_allclose(g, ref[key], **tol, err_msg=key)
    # eval forward gives the same output
    np.testing.assert_allclose(net(X), ref["Y"], **tol)


def test_cyscale_state_dict_roundtrip(cyscale_registered: str) -> None:
    net = nnrt.Sequential([nnrt.layer(cyscale_registered, 4)], seed=1, dtype="float64")
    other = nnrt.Sequential([nnrt.layer(cyscale_registered, 4)], seed=2, dtype="float64")
    X = np.random.default_rng(0).standard_normal((3, 4))
    assert not np.allclose(net(X), other(X))
    other.load_state_dict(net.state_dict())
    np.testing.assert_array_equal(other(X), net(X))


def test_cyscale_gradcheck_finite_differences() -> None:
    # independent of nnrt.testing: central differences of L = sum(Y * R)
    layer = cy.CyScale(3)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((4, 3))
    R = rng.standard_normal((4, 3))
    layer.forward(X, True)
    dX = layer.backward(R).copy()
    ds = layer.grads()["scale"].copy()
    eps = 1e-6

    def loss() -> float:
        return float((layer.forward(X, False) * R).sum())

    num_dX = np.zeros_like(X)
    for idx in np.ndindex(*X.shape):
        orig = X[idx]
        X[idx] = orig + eps
        fp = loss()
        X[idx] = orig - eps
        fm = loss()
        X[idx] = orig
        num_dX[idx] = (fp - fm) / (2 * eps)
    s = layer.params()["scale"]
    num_ds = np.zeros_like(s)
    for j in range(s.size):
        orig = s[j]
        s[j] = orig + eps
        fp = loss()
        s[j] = orig - eps
        fm = loss()
        s[j] = orig
        num_ds[j] = (fp - fm) / (2 * eps)
    np.testing.assert_allclose(dX, num_dX, rtol=1e-7, atol=1e-8)
    np.testing.assert_allclose(ds, num_ds, rtol=1e-7, atol=1e-8)


def test_cyscale_passes_check_layer() -> None:
    testing = pytest.importorskip("nnrt.testing")
    check_layer = getattr(testing, "check_layer", None)
    if check_layer is None:
        pytest.skip("nnrt.testing.check_layer is not available yet")
    assert check_layer(lambda: cy.CyScale(5), 5) is True
    assert testing.gradcheck(cy.CyScale(4), np.random.default_rng(1).standard_normal((6, 4)))
