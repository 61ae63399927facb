"""Tests of the example Cython plugin package ``nnrt-relu-cython``.

Run after ``pip install --no-build-isolation docs/examples/nnrt-relu-cython``:
the layers must be found through the installed entry point.
"""

from __future__ import annotations

import json
import pathlib
import types

import nnrt
import nnrt.losses
import nnrt.optim
import nnrt.testing
import numpy as np
import pytest
from nnrt.registry import registry

from nnrt_relu_cython import LeakyReLU, ReLU
from nnrt_relu_cython import _relu as relu_module


def test_found_by_entry_point() -> None:
    layers = nnrt.available_layers()
    assert layers["relu"] == "relu_cython"
    assert layers["leaky_relu"] == "relu_cython"
    assert type(nnrt.layer("relu")) is ReLU
    assert type(nnrt.layer("leaky_relu", 0.1)) is LeakyReLU
    info = registry.plugins()["relu_cython"]
    assert info.status == "ok"
    assert info.dist == "nnrt-relu-cython"
    assert sorted(info.layers) == ["leaky_relu", "relu"]


def test_is_a_compiled_layer_subclass() -> None:
    # a cdef subclass of nnrt's cdef Layer: no instance __dict__, compiled methods
    assert issubclass(ReLU, nnrt.Layer)
    assert not hasattr(ReLU(), "__dict__")
    assert not isinstance(vars(LeakyReLU)["forward"], types.FunctionType)
    assert relu_module.__file__ is not None and not relu_module.__file__.endswith(".py")


@pytest.mark.parametrize(
    "factory",
    [lambda: nnrt.layer("relu"), lambda: nnrt.layer("leaky_relu", 0.2), LeakyReLU],
    ids=["relu", "leaky_relu-0.2", "leaky_relu-default"],
)
def test_check_layer(factory: object) -> None:
    assert nnrt.testing.check_layer(factory, in_features=6)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("slope", [0.0, 0.01, 0.3])
def test_matches_reference(dtype: type, slope: float) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(33, 17)).astype(dtype)
    X[0, :3] = 0.0  # exactly zero: subgradient slope (as torch's leaky_relu)
    layer = LeakyReLU(slope)
    Y = layer.forward(X, training=True)
    ref = np.where(X > 0, X, slope * X.astype(np.float64))
    assert Y.dtype == dtype
    np.testing.assert_allclose(Y, ref, rtol=1e-6 if dtype == np.float32 else 1e-15)
    dY = rng.normal(size=X.shape)
    dX = layer.backward(dY)
    dref = np.where(X > 0, dY, slope * dY)
    assert dX.dtype == dtype
    np.testing.assert_allclose(dX, dref, rtol=1e-6 if dtype == np.float32 else 1e-15, atol=1e-7)


def test_non_contiguous_and_int_inputs() -> None:
    X = np.random.default_rng(1).normal(size=(10, 12))
    layer = ReLU()
    np.testing.assert_array_equal(layer.forward(X[:, ::2]), np.maximum(X[:, ::2], 0))
    np.testing.assert_array_equal(layer.forward(np.asfortranarray(X)), np.maximum(X, 0))
    Xi = np.arange(-6, 6).reshape(3, 4)
    np.testing.assert_array_equal(layer.forward(Xi), np.maximum(Xi, 0).astype(np.float64))


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan")])
def test_rejects_bad_slope(bad: float) -> None:
    with pytest.raises(ValueError, match="negative_slope"):
        LeakyReLU(bad)


def test_backward_before_forward_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="before forward"):
        ReLU().backward(np.ones((2, 3)))


def test_import_checks_the_abi() -> None:
    # the module calls nnrt.layer.check_abi(NNRT_ABI_VERSION, __name__) at import
    src = pathlib.Path(relu_module.__file__).with_name("_relu.pyx")
    if src.exists():
        assert "check_abi(NNRT_ABI_VERSION, __name__)" in src.read_text()
    # and the compiled module was built against the running nnrt's ABI
    assert nnrt.check_abi(nnrt.ABI_VERSION, relu_module.__name__)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 4))
    y = (X[:, 0] * X[:, 1] > 0).astype(np.int64)  # XOR-like: needs the hidden layer
    return X, y


def _net() -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense", 4, 32),
            nnrt.layer("relu"),
            nnrt.layer("dense", 32, 16),
            nnrt.layer("leaky_relu", 0.05),
            nnrt.layer("dense", 16, 2),
        ],
        seed=0,
    )


def test_trains_inside_sequential() -> None:
    X, y = _data()
    net = _net()
    opt = nnrt.optim.Adam(net, lr=0.01)
    losses = []
    for _ in range(200):
        loss, dY = nnrt.losses.softmax_cross_entropy(net.forward(X, training=True), y)
        net.backward(dY)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 0.5 * losses[0], losses[::20]
    accuracy = float(np.mean(np.argmax(net(X), axis=1) == y))
    assert accuracy > 0.9


def test_save_load_by_registry_name(tmp_path: pathlib.Path) -> None:
    if not hasattr(nnrt, "load"):
        pytest.skip("nnrt.load is not available in this nnrt")
    pytest.importorskip("nnrt.io")
    X, _ = _data()
    net = _net()
    path = tmp_path / "model.npz"
    net.save(path)
    with np.load(path, allow_pickle=False) as f:
        arch = json.dumps(json.loads(str(f["architecture"])))
    assert "leaky_relu" in arch
    # the file records which distribution provided the layer (to name it if missing)
    assert "nnrt-relu-cython" in arch or "nnrt_relu_cython" in arch
    loaded = nnrt.load(path)
    assert [type(layer) for layer in loaded] == [type(layer) for layer in net]
    assert loaded[3].config() == {"negative_slope": 0.05}
    np.testing.assert_array_equal(loaded(X), net(X))
