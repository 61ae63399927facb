"""``check_layer``/``gradcheck`` at realistic widths (2 to 512, float64): a correct layer
never fails, a wrong one still does.

Every built-in layer and, when installed, the example plugins of docs/examples run
through ``check_layer``. The wrong layers are the mistakes a plugin author makes: a bias
gradient not summed over the batch, a gradient off by a small factor, a backward that
uses dY where it needs the cached input (which passes only if gradcheck's probe R were
the input X itself).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.testing import check_layer, gradcheck

WIDTHS = [2, 3, 8, 32, 128, 512]


def _mpi_free_sync_batchnorm(width: int) -> Any:
    return nnrt.layer("sync_batchnorm", width)


BUILTIN: dict[str, Callable[[int], tuple[Callable[[], Any], int]]] = {
    "dense-in": lambda w: (lambda: nnrt.layer("dense", w, 3), w),
    "dense-out": lambda w: (lambda: nnrt.layer("dense", 3, w), 3),
    "dense_nobias-in": lambda w: (lambda: nnrt.layer("dense_nobias", w, 2), w),
    "dense_nobias-out": lambda w: (lambda: nnrt.layer("dense_nobias", 2, w), 2),
    "sigmoid": lambda w: (lambda: nnrt.layer("sigmoid"), w),
    "batchnorm": lambda w: (lambda: nnrt.layer("batchnorm", w), w),
    "batchnorm-momentum": lambda w: (lambda: nnrt.layer("batchnorm", w, momentum=0.5), w),
    "sync_batchnorm": lambda w: (lambda: _mpi_free_sync_batchnorm(w), w),
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", sorted(BUILTIN))
def test_builtin_layers_pass_check_layer_at_every_width(kind: str, width: int) -> None:
    factory, in_features = BUILTIN[kind](width)
    assert check_layer(factory, in_features=in_features) is True


@pytest.mark.parametrize("width, batch", [(32, 64), (128, 32)])
def test_batchnorm_with_a_larger_batch(width: int, batch: int) -> None:
    assert check_layer(lambda: nnrt.layer("batchnorm", width), width, batch=batch) is True


EXAMPLES = {
    "tanh": ("nnrt_tanh_dropout", lambda: nnrt.layer("tanh")),
    "dropout": ("nnrt_tanh_dropout", lambda: nnrt.layer("dropout", 0.3, seed=1)),
    "relu": ("nnrt_relu_cython", lambda: nnrt.layer("relu")),
    "leaky_relu": ("nnrt_relu_cython", lambda: nnrt.layer("leaky_relu", 0.1)),
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_plugins_pass_check_layer_at_every_width(name: str, width: int) -> None:
    package, factory = EXAMPLES[name]
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"example plugin {package} is not installed (CI installs it)")
    assert check_layer(factory, in_features=width) is True


# ----------------------------------------------------------------- wrong layers
class _Affine(nnrt.Layer):
    """``Y = X @ W + b`` in Python; ``mistake`` plants one bug in backward."""

    def __init__(self, n_in: int, n_out: int, mistake: str = "") -> None:
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.mistake = mistake
        rng = np.random.default_rng(7)
        self.W = rng.uniform(-1, 1, (n_in, n_out)) / np.sqrt(n_in)
        self.b = rng.uniform(-1, 1, n_out)
        self.dW, self.db = np.zeros_like(self.W), np.zeros_like(self.b)
        self._X: np.ndarray | None = None

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        Xa = self.prepare_input(X)
        if training:
            self._X = Xa.copy()
        return Xa @ self.W + self.b

    def backward(self, dY: Any) -> np.ndarray:
        assert self._X is not None
        g = self.prepare_grad(dY, self._X @ self.W)
        self.dW[...] = self._X.T @ g
        if self.mistake == "bias not summed":
            self.db[...] = g[0]
        elif self.mistake == "bias mean":
            self.db[...] = g.mean(axis=0)
        else:
            self.db[...] = g.sum(axis=0)
        dX = g @ self.W.T
        if self.mistake == "dX off by 0.1%":
            dX *= 1.001
        if self.mistake == "dW off by 0.1%":
            self.dW *= 1.001
        return dX

    def params(self) -> dict[str, np.ndarray]:
        return {"weight": self.W, "bias": self.b}

    def grads(self) -> dict[str, np.ndarray]:
        return {"weight": self.dW, "bias": self.db}

    def config(self) -> dict[str, Any]:
        return {"n_in": self.in_features, "n_out": self.out_features, "mistake": self.mistake}


@pytest.mark.parametrize("width", [2, 32, 512])
def test_the_correct_python_affine_passes(width: int) -> None:
    assert check_layer(lambda: _Affine(width, 4), width) is True
    assert check_layer(lambda: _Affine(4, width), 4) is True


@pytest.mark.parametrize("width", [2, 32, 512])
@pytest.mark.parametrize(
    "mistake, where",
    [
        ("bias not summed", "grad of 'bias'"),
        ("bias mean", "grad of 'bias'"),
        ("dX off by 0.1%", "dX"),
        ("dW off by 0.1%", "grad of 'weight'"),
    ],
)
def test_a_wrong_gradient_still_fails_at_every_width(width: int, mistake: str, where: str) -> None:
    with pytest.raises(AssertionError, match="gradcheck") as info:
        check_layer(lambda: _Affine(width, 4, mistake), width)
    assert where in str(info.value)
    X = np.random.default_rng(11).standard_normal((8, width))
    with pytest.raises(AssertionError, match=where.replace("'", ".")):
        gradcheck(_Affine(width, 4, mistake), X)


class _HalfSquare(nnrt.Layer):
    """``y = x**2 / 2`` whose backward wrongly returns ``dY * dY`` (needs ``dY * x``):
    right only if the probe R equals X."""

    def __init__(self) -> None:
        super().__init__()

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        Xa = self.prepare_input(X)
        return 0.5 * Xa * Xa

    def backward(self, dY: Any) -> np.ndarray:
        g = np.asarray(dY, dtype=np.float64)
        return g * g

    def config(self) -> dict[str, Any]:
        return {}


def test_probe_is_independent_of_the_inputs_check_layer_draws() -> None:
    with pytest.raises(AssertionError, match="gradcheck: .*dX"):
        check_layer(_HalfSquare, in_features=5)
