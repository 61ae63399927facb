"""Tests of the example pure-Python plugin package ``nnrt-tanh-dropout``.

Run after ``pip install docs/examples/nnrt-tanh-dropout``: the layers must be
found through the installed entry point, not imported by hand.
"""

from __future__ import annotations

from typing import Any

import nnrt
import nnrt.losses
import nnrt.optim
import nnrt.testing
import numpy as np
import pytest
from nnrt.registry import registry

from nnrt_tanh_dropout import Dropout, Tanh


def test_found_by_entry_point() -> None:
    layers = nnrt.available_layers()
    assert layers["tanh"] == "tanh_dropout"
    assert layers["dropout"] == "tanh_dropout"
    assert type(nnrt.layer("tanh")) is Tanh
    assert type(nnrt.layer("dropout", 0.2)) is Dropout
    info = registry.plugins()["tanh_dropout"]
    assert info.status == "ok"
    assert info.dist == "nnrt-tanh-dropout"
    assert sorted(info.layers) == ["dropout", "tanh"]


@pytest.mark.parametrize(
    "factory",
    [lambda: nnrt.layer("tanh"), lambda: nnrt.layer("dropout", 0.3, seed=5), Dropout],
    ids=["tanh", "dropout", "dropout-default"],
)
def test_check_layer(factory: object) -> None:
    assert nnrt.testing.check_layer(factory, in_features=6)  # type: ignore[arg-type]


def test_check_layer_catches_a_wrong_derivative() -> None:
    class BadTanh(Tanh):
        def backward(self, dY: Any) -> np.ndarray:  # forgot the square
            assert self._Y is not None
            return self.prepare_grad(dY, self._Y) * (1.0 - self._Y)

    with pytest.raises(AssertionError, match="gradcheck"):
        nnrt.testing.check_layer(BadTanh, in_features=4)


def test_tanh_matches_reference() -> None:
    X = np.random.default_rng(0).normal(scale=3.0, size=(7, 5))
    layer = Tanh()
    Y = layer.forward(X, training=True)
    np.testing.assert_allclose(Y, np.tanh(X), rtol=1e-15)
    dY = np.random.default_rng(1).normal(size=X.shape)
    # d tanh(x)/dx = 1 / cosh(x)^2, written independently of the layer's 1 - y^2
    # (which loses relative accuracy where y is close to +-1: hence atol)
    np.testing.assert_allclose(layer.backward(dY), dY / np.cosh(X) ** 2, rtol=1e-10, atol=1e-14)


def test_dropout_train_and_eval() -> None:
    p = 0.25
    X = np.random.default_rng(0).uniform(1.0, 2.0, size=(400, 50))  # no zeros in X
    layer = Dropout(p, seed=3)
    np.testing.assert_array_equal(layer.forward(X, training=False), X)  # eval: identity
    Y = layer.forward(X, training=True)
    dropped = Y == 0
    assert abs(dropped.mean() - p) < 0.01  # 20000 draws: sd of the rate is 0.003
    np.testing.assert_allclose(Y[~dropped], X[~dropped] / (1 - p), rtol=1e-15)
    dY = np.random.default_rng(2).normal(size=X.shape)
    dX = layer.backward(dY)
    np.testing.assert_array_equal(dX[dropped], 0.0)
    np.testing.assert_allclose(dX[~dropped], dY[~dropped] / (1 - p), rtol=1e-15)
    # a second training forward draws a new mask
    Y2 = layer.forward(X, training=True)
    assert not np.array_equal(Y2 == 0, dropped)
    assert layer.buffers()["step"][0] == 2


def test_dropout_is_seeded() -> None:
    X = np.ones((16, 8))
    a, b, c = Dropout(0.5, seed=7), Dropout(0.5, seed=7), Dropout(0.5, seed=8)
    masks_a = [a.forward(X, training=True).copy() for _ in range(3)]
    masks_b = [b.forward(X, training=True).copy() for _ in range(3)]
    for ma, mb in zip(masks_a, masks_b, strict=True):
        np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(c.forward(X, training=True), masks_a[0])
    # the network's seed decides the seed of a dropout built with seed=None
    nets = [
        nnrt.Sequential([nnrt.layer("dropout"), nnrt.layer("dropout")], seed=s, dtype="float64")
        for s in (0, 0, 1)
    ]
    seeds = [(n[0].config()["seed"], n[1].config()["seed"]) for n in nets]
    assert seeds[0] == seeds[1] != seeds[2]
    assert seeds[0][0] != seeds[0][1]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_p(bad: float) -> None:
    with pytest.raises(ValueError, match="p must be in"):
        Dropout(bad)


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 4))
    y = (X[:, 0] * X[:, 1] > 0).astype(np.int64)  # XOR-like: needs the hidden layer
    return X, y


def _net() -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense", 4, 32),
            nnrt.layer("tanh"),
            nnrt.layer("dropout", 0.1),
            nnrt.layer("dense", 32, 2),
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


def test_save_load_by_registry_name(tmp_path: object) -> None:
    if not hasattr(nnrt, "load"):
        pytest.skip("nnrt.load is not available in this nnrt")
    pytest.importorskip("nnrt.io")
    import json
    import pathlib

    X, _ = _data()
    net = _net()
    for _ in range(3):  # move the dropout step counter away from 0
        net.forward(X, training=True)
    path = pathlib.Path(str(tmp_path)) / "model.npz"
    net.save(path)
    with np.load(path, allow_pickle=False) as f:
        arch = json.loads(str(f["architecture"]))
    assert "tanh" in json.dumps(arch) and "dropout" in json.dumps(arch)
    loaded = nnrt.load(path)
    assert [type(layer) for layer in loaded] == [type(layer) for layer in net]
    assert loaded[2].config() == net[2].config()
    np.testing.assert_array_equal(loaded(X), net(X))
    # the step counter was saved: the next training forward draws the same mask
    np.testing.assert_array_equal(loaded.forward(X, training=True), net.forward(X, training=True))
