"""A network computes in its own dtype, or refuses: layers cast after it was built.

``Sequential(layers, dtype=)`` casts its layers once. A layer cast afterwards (by
``layer.to_dtype``, or by building another network of the other dtype that shares
the layer) used to make the network answer in the layer's dtype (a float32
network's ``predict`` returned float64) and ``save`` write ``dtype: float32`` over
float64 arrays, so the reloaded network gave other numbers (found by
tests/test_fuzz_stateful.py, whose exact save/load check missed it because numpy
compares a float64 dtype equal to None). Now every ``forward``/``backward``
(``predict``, ``fit``, ``evaluate``) and ``save`` of such a network raises
TypeError naming the layer and both dtypes; casting the layer back, or building
the network again, makes it usable.

References are float64 numpy computed here from the layers' own parameters.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt

PAIRS = [("float32", "float64"), ("float64", "float32")]


def _X(rows: int = 5, cols: int = 3) -> np.ndarray:
    # multiples of 1/8: exact in float32 and float64
    return np.round(np.random.default_rng(7).uniform(-2, 2, (rows, cols)) * 8) / 8


def _reference(net: Any, X: np.ndarray) -> np.ndarray:
    """float64 reference of a network of dense and sigmoid layers, each layer's input
    and output rounded to the network's dtype."""
    dt = np.dtype(net.dtype)
    h = X.astype(dt).astype(np.float64)
    for layer in net.layers:
        p = {k: np.asarray(v, dtype=np.float64) for k, v in layer.params().items()}
        if "weight" in p:
            h = h @ p["weight"] + p.get("bias", 0.0)
        else:  # sigmoid
            h = 1.0 / (1.0 + np.exp(-h))
        h = h.astype(dt).astype(np.float64)
    return h


def _tol(dtype: str) -> dict[str, float]:
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-13}


def _refuses(call: Any, index: int, layer_dt: str, net_dt: str) -> None:
    with pytest.raises(TypeError) as info:
        call()
    msg = str(info.value)
    assert f"layer {index}" in msg, msg
    assert f"has dtype {layer_dt}" in msg and f"network has dtype {net_dt}" in msg, msg
    assert f"to_dtype('{net_dt}')" in msg, msg  # says how to repair it


@pytest.mark.parametrize(("net_dt", "other"), PAIRS)
def test_layer_cast_inside_network_is_refused_then_repaired(
    net_dt: str, other: str, tmp_path: Path
) -> None:
    net = nnrt.Sequential(
        [nnrt.layer("dense", 3, 4), nnrt.layer("sigmoid"), nnrt.layer("dense", 4, 2)],
        seed=3,
        dtype=net_dt,
    )
    X = _X()
    before = net.predict(X).copy()
    np.testing.assert_allclose(before, _reference(net, X), **_tol(net_dt))
    net[2].to_dtype(other)
    path = tmp_path / "m.npz"
    y = np.array([0, 1, 0, 1, 1])
    for call in (
        lambda: net.predict(X),
        lambda: net.forward(X, training=True),
        lambda: net(X),
        lambda: net.backward(np.ones((5, 2))),
        lambda: net.fit(X, y, epochs=1, batch_size=5, progress=False),
        lambda: net.evaluate(X, y),
        lambda: net.save(path),
    ):
        _refuses(call, 2, other, net_dt)
    assert not path.exists() and not os.listdir(tmp_path)  # no file, no temporary left
    # the parameters are still readable (to inspect or repair the network)
    assert net.state_dict()["2.weight"].dtype == np.dtype(other)
    net[2].to_dtype(net_dt)
    got = net.predict(X)
    assert got.dtype == np.dtype(net_dt)
    np.testing.assert_allclose(got, _reference(net, X), **_tol(net_dt))
    net.save(path)
    back = nnrt.load(path)
    np.testing.assert_array_equal(back.predict(X), got)


@pytest.mark.parametrize(("first", "second"), PAIRS)
def test_layer_shared_by_networks_of_two_dtypes(first: str, second: str, tmp_path: Path) -> None:
    shared = nnrt.layer("dense", 3, 2)
    a = nnrt.Sequential([shared], seed=0, dtype=first)
    b = nnrt.Sequential([nnrt.layer("sigmoid"), shared], seed=0, dtype=second)  # casts it
    assert shared.dtype == np.dtype(second)
    X = _X()
    # b computes in its dtype, and its file reloads to exactly what it computes
    got = b.predict(X)
    assert got.dtype == np.dtype(second)
    np.testing.assert_allclose(got, _reference(b, X), **_tol(second))
    b.save(tmp_path / "b.npz")
    np.testing.assert_array_equal(nnrt.load(tmp_path / "b.npz").predict(X), got)
    # a no longer computes in its own dtype: refused (it used to answer in the other
    # dtype, and its file to reload to other numbers)
    _refuses(lambda: a.predict(X), 0, second, first)
    _refuses(lambda: a.save(tmp_path / "a.npz"), 0, second, first)
    # a pickle keeps the state: the copy refuses the same way
    _refuses(lambda: pickle.loads(pickle.dumps(a)).predict(X), 0, second, first)
    # load_state_dict does not change dtypes: still refused
    a.load_state_dict(a.state_dict())
    _refuses(lambda: a.predict(X), 0, second, first)
    # building it again takes the layer back (and b refuses in turn)
    a2 = nnrt.Sequential([shared], seed=0, dtype=first)
    assert a2.predict(X).dtype == np.dtype(first)
    np.testing.assert_allclose(a2.predict(X), _reference(a2, X), **_tol(first))
    _refuses(lambda: b.predict(X), 1, first, second)


def test_float64_layer_in_float32_network_is_not_mistaken_for_none() -> None:
    """np.dtype("float64") == None is True in numpy: the check must not use ``in``."""
    assert np.dtype("float64") == None  # noqa: E711 (the numpy behaviour guarded against)
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0, dtype="float32")
    net[0].to_dtype("float64")
    _refuses(lambda: net.predict(_X()), 0, "float64", "float32")


def test_width_keeping_layers_without_dtype_follow_the_network() -> None:
    # a sigmoid built alone has dtype None (it computes in the dtype of its input):
    # appended to a network, it follows the network's dtype and is never refused
    for dt in ("float32", "float64"):
        net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], dtype=dt)
        net.layers.append(nnrt.layer("sigmoid"))
        assert net[1].dtype is None
        X = _X()
        got = net.predict(X)
        assert got.dtype == np.dtype(dt)
        np.testing.assert_allclose(got, _reference(net, X), **_tol(dt))


class _Scale(nnrt.Layer):
    """A Python layer (its forward is checked by the network): Y = 2 X."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.in_features = n
        self.out_features = n

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        return self.prepare_input(X) * 2

    def backward(self, dY: Any) -> np.ndarray:
        return np.asarray(dY) * 2


def test_python_layer_cast_after_construction_is_refused_by_name() -> None:
    net = nnrt.Sequential([_Scale(3), nnrt.layer("dense", 3, 2)], seed=1, dtype="float32")
    X = _X()
    got = net.predict(X)
    want = (2 * X) @ net[1].params()["weight"].astype(np.float64) + net[1].params()["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    net[0].to_dtype("float64")
    # the dtype check names the layer before its forward runs (it used to be reported
    # as a broken plugin returning the wrong dtype)
    _refuses(lambda: net.predict(X), 0, "float64", "float32")


# ------------------------------------------------ optimizers over replaced arrays
# An optimizer resolves its parameter arrays once. ``to_dtype`` (even a round trip
# float32 -> float64 -> float32) and a network built again over the same layers replace
# them: the optimizer used to update the old arrays, so ``fit`` ran, reported losses and
# left the network untouched. ``step`` now refuses (RuntimeError) and names the layer.


def _sgd_reference(net: Any, X: np.ndarray, dY: np.ndarray, lr: float) -> np.ndarray:
    """The weight of a one-dense network after one SGD step, in float64 numpy."""
    return net[0].params()["weight"].astype(np.float64) - lr * (X.T @ dY)


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize(
    "change",
    ["to_dtype round trip", "to_dtype", "rebuilt over the layers", "layer replaced"],
)
def test_optimizer_refuses_arrays_replaced_after_it_was_built(opt_name: str, change: str) -> None:
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0, dtype="float64")
    opt = getattr(nnrt.optim, opt_name)(net, lr=0.1)
    X, dY = _X(), np.random.default_rng(1).normal(size=(5, 2))
    if change == "to_dtype round trip":
        net[0].to_dtype("float32")
        net[0].to_dtype("float64")
    elif change == "to_dtype":
        net[0].to_dtype("float32")
        net.dtype = np.dtype("float32")  # the network follows: only the optimizer is stale
    elif change == "rebuilt over the layers":
        net = nnrt.Sequential(net.layers, seed=0, dtype="float32")
    else:
        net.layers[0] = nnrt.layer("dense", 3, 2)
    net.forward(X, training=True)
    net.backward(dY)
    w = net[0].params()["weight"].copy()
    with pytest.raises(RuntimeError, match=r"replaced|net\.layers") as info:
        opt.step()
    assert "create a new optimizer" in str(info.value)
    np.testing.assert_array_equal(net[0].params()["weight"], w)  # nothing half-done
    y = np.array([0, 1, 0, 1, 1])
    with pytest.raises(RuntimeError, match="create a new optimizer"):
        net.fit(X, y, optimizer=opt, epochs=1, batch_size=5, progress=False)
    # a new optimizer trains the live arrays
    if opt_name == "SGD":
        net.forward(X, training=True)
        net.backward(dY)
        want = _sgd_reference(net, X.astype(net.dtype).astype(np.float64), dY, 0.1)
        nnrt.optim.SGD(net, lr=0.1).step()
        tol = 1e-5 if net.dtype == np.float32 else 1e-12
        np.testing.assert_allclose(net[0].params()["weight"], want, rtol=tol, atol=tol)
    else:
        before = net[0].params()["weight"].copy()
        net.fit(
            X,
            y,
            optimizer=getattr(nnrt.optim, opt_name)(net, lr=0.1),
            epochs=1,
            batch_size=5,
            progress=False,
        )
        assert not np.array_equal(net[0].params()["weight"], before)


def test_optimizer_over_unchanged_arrays_still_steps() -> None:
    """Same-dtype to_dtype keeps the arrays; a layer given alone is checked too."""
    layer = nnrt.layer("dense", 3, 2)
    opt = nnrt.optim.SGD(layer, lr=0.5)
    layer.to_dtype("float64")  # already float64: the same arrays
    X, dY = _X(), np.random.default_rng(2).normal(size=(5, 2))
    layer.forward(X, training=True)
    layer.backward(dY)
    want = layer.params()["weight"] - 0.5 * (X.T @ dY)
    opt.step()
    np.testing.assert_allclose(layer.params()["weight"], want, rtol=1e-12, atol=1e-12)
    layer.to_dtype("float32")
    with pytest.raises(RuntimeError, match="replaced"):
        opt.step()
    # a pickled optimizer holds its own arrays (no network): it steps them
    back = pickle.loads(pickle.dumps(nnrt.optim.SGD(layer, lr=0.5)))
    back.step()


def test_fit_refuses_an_optimizer_of_another_network_before_any_batch() -> None:
    """It used to run every epoch, report a flat loss and leave the network untrained."""
    X = _X(8, 3)
    y = np.array([0, 1] * 4)

    def build(seed: int) -> Any:
        return nnrt.Sequential(
            [
                nnrt.layer("dense_nobias", 3, 4),
                nnrt.layer("batchnorm", 4),
                nnrt.layer("dense", 4, 2),
            ],
            seed=seed,
        )

    net, other = build(0), build(1)
    before = net.state_dict()
    for opt in (nnrt.optim.SGD(other, lr=0.1), nnrt.optim.Adam(other[2])):
        with pytest.raises(RuntimeError, match="none of this network's parameters"):
            net.fit(X, y, optimizer=opt, epochs=2, batch_size=4, progress=False)
    stale = nnrt.optim.SGD(net, lr=0.1)
    net[0].to_dtype("float64")
    net[0].to_dtype("float32")
    with pytest.raises(RuntimeError, match="replaced"):
        net.fit(X, y, optimizer=stale, epochs=2, batch_size=4, progress=False)
    # refused before the first batch: no training forward ran (running stats unchanged)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # an optimizer over a part of the network trains that part only
    w0, w2 = net[0].params()["weight"].copy(), net[2].params()["weight"].copy()
    net.fit(X, y, optimizer=nnrt.optim.SGD(net[2], lr=0.1), epochs=2, batch_size=4, progress=False)
    np.testing.assert_array_equal(net[0].params()["weight"], w0)
    assert not np.array_equal(net[2].params()["weight"], w2)


class _ViewParams(nnrt.Layer):
    """A Python layer whose params()/grads() hand out new views of its arrays each call
    (Y = X * w): an optimizer updating the views updates the layer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.in_features = self.out_features = n
        self._w = np.ones((1, n))
        self._dw = np.zeros((1, n))
        self.dtype = "float64"

    def params(self) -> dict[str, np.ndarray]:
        return {"w": self._w[0]}

    def grads(self) -> dict[str, np.ndarray]:
        return {"w": self._dw[0]}

    def to_dtype(self, dtype: Any) -> Any:
        super().to_dtype(dtype)
        self._w = self._w.astype(dtype)
        self._dw = self._dw.astype(dtype)
        return self

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        self._X = self.prepare_input(X)
        return self._X * self._w

    def backward(self, dY: Any) -> np.ndarray:
        dY = np.asarray(dY)
        self._dw[0] = (dY * self._X).sum(axis=0)
        return dY * self._w


def test_optimizer_accepts_params_handed_out_as_new_views() -> None:
    net = nnrt.Sequential([_ViewParams(3)], dtype="float64")
    opt = nnrt.optim.SGD(net, lr=0.5)
    X, dY = _X(), np.random.default_rng(3).normal(size=(5, 3))
    net.forward(X, training=True)
    net.backward(dY)
    want = 1.0 - 0.5 * (dY * X).sum(axis=0)
    opt.step()
    np.testing.assert_allclose(net[0].params()["w"], want, rtol=1e-12, atol=1e-12)
    # fit accepts it too (it trains this network's parameters, through the views)
    w = net[0].params()["w"].copy()
    net.fit(X, np.zeros(5, dtype=np.int64), optimizer=opt, epochs=1, batch_size=5, progress=False)
    assert not np.array_equal(net[0].params()["w"], w)
    net[0].to_dtype("float32")
    net.dtype = np.dtype("float32")
    with pytest.raises(RuntimeError, match="replaced"):
        opt.step()


def test_freeze_refuses_a_network_whose_layer_was_cast() -> None:
    # the frozen session snapshots what the network computes: a float32 network
    # whose dense layer was cast to float64 afterwards is refused, as forward is
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0, dtype="float32")
    net[0].to_dtype("float64")
    with pytest.raises(TypeError, match="float64"):
        nnrt.freeze(net)
    net[0].to_dtype("float32")  # the repair the message names
    X = np.linspace(-1, 1, 6).reshape(2, 3)
    W = net[0].params()["weight"].astype(np.float64)
    b = net[0].params()["bias"].astype(np.float64)
    np.testing.assert_allclose(nnrt.freeze(net)(X), X @ W + b, rtol=1e-6, atol=1e-6)
