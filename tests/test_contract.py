"""Contract audit: every concrete statement of DESIGN.md, checked through the public API.

Each test quotes the statement it checks in its docstring. References are
independent: float64 numpy formulas written here, finite differences, and torch
(when installed) for the statements that say "as torch".
"""

from __future__ import annotations

import importlib.metadata as ilm
import importlib.resources
import inspect
import json
import math
import os
import subprocess
import sys
import types
import typing
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import pytest

import nnrt
import nnrt.hookspecs
import nnrt.losses
import nnrt.optim
import nnrt.testing

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("dense", "dense_nobias", "sigmoid", "batchnorm")


def _uid() -> str:
    return uuid.uuid4().hex[:10]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _sigmoid_ref(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _log_softmax_ref(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


# A minimal Python layer: only super().__init__(), in/out_features and the members.
class _Scale(nnrt.Layer):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.in_features = n
        self.out_features = n
        self.w = np.linspace(0.5, 1.5, n)
        self.dw = np.zeros(n)
        self._x: np.ndarray | None = None

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        X = np.asarray(X, dtype=self.w.dtype)
        if training:
            self._x = X.copy()
        return X * self.w

    def backward(self, dY: Any) -> np.ndarray:
        assert self._x is not None
        dY = np.asarray(dY, dtype=self.w.dtype)
        self.dw[...] = (dY * self._x).sum(axis=0)
        return dY * self.w

    def params(self) -> dict[str, np.ndarray]:
        return {"w": self.w}

    def grads(self) -> dict[str, np.ndarray]:
        return {"w": self.dw}

    def buffers(self) -> dict[str, np.ndarray]:
        return {}

    def config(self) -> dict[str, Any]:
        return {"n": int(self.w.shape[0])}


class _Checked(_Scale):
    """_Scale validating its input through the base class (what check_layer asks for)."""

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        return super().forward(self.prepare_input(X), training)


# ============================================================================ layout
@pytest.mark.parametrize(
    "entry",
    ["setup.py", "pyproject.toml", "README.md", "nnrt", "plugins", "tests", "docs", "benchmarks"],
)
def test_layout_top_level(entry: str) -> None:
    """ "Layout (top level): setup.py pyproject.toml README.md nnrt/ plugins/ tests/ docs/
    benchmarks/"."""
    assert (ROOT / entry).exists(), entry


def test_layout_plugins_installed_as_nnrt_plugins() -> None:
    """ "plugins/ built-in layer plugins, installed as the import package `nnrt_plugins`
    (setup.py package_dir)"."""
    import nnrt_plugins

    assert nnrt_plugins.__name__ == "nnrt_plugins"
    setup = (ROOT / "setup.py").read_text()
    assert "package_dir" in setup and '"nnrt_plugins": "plugins"' in setup


def test_layout_cython_test_modules_built() -> None:
    """ "tests/ pytest suite, including Cython test modules compiled by the build"
    (the test build, tests/_cytests.py: they are not installed with nnrt)."""
    import importlib.machinery

    from _cytests import load

    folder = Path(load().__file__ or "").parent
    assert list((ROOT / "tests" / "cython").glob("*.pyx"))
    built = [
        p
        for p in folder.iterdir()
        if any(p.name.endswith(suf) for suf in importlib.machinery.EXTENSION_SUFFIXES)
    ]
    assert built, "no compiled Cython test module"


def test_layout_docs_has_example_plugin_and_benchmark() -> None:
    """ "docs/ derivations, plugin author guide, an example third-party plugin package";
    "benchmarks/ the benchmark"."""
    examples = ROOT / "docs" / "examples"
    assert any(
        (p / "pyproject.toml").exists() or (p / "setup.py").exists() for p in examples.iterdir()
    )
    assert list((ROOT / "benchmarks").glob("*.py"))


# ============================================================================ Layer
def test_layer_is_cdef_class_declared_in_pxd() -> None:
    """ "`nnrt.Layer` is a `cdef class` declared in `nnrt/layer.pxd` (cimportable by Cython
    plugins)" — the .pxd ships with the package."""
    heaptype = 1 << 9  # Py_TPFLAGS_HEAPTYPE: set for classes defined in Python
    assert not nnrt.Layer.__flags__ & heaptype
    from nnrt.layer import Layer

    assert Layer is nnrt.Layer
    pxd = importlib.resources.files("nnrt").joinpath("layer.pxd")
    assert pxd.is_file()
    assert "cdef class Layer" in pxd.read_text()
    setup = (ROOT / "setup.py").read_text()
    assert '"*.pxd"' in setup  # package_data of nnrt ships the declarations


def test_python_subclass_needs_only_members() -> None:
    """ "A Python subclass calls `super().__init__()`, sets `in_features`/`out_features`, and
    overrides the members above; nothing else is required of it." """
    X = _rng().standard_normal((5, 3))
    layer = _Scale(3)
    assert nnrt.testing.gradcheck(layer, X) is True
    net = nnrt.Sequential([nnrt.layer("dense", 4, 3), _Scale(3)], seed=0, dtype="float64")
    Y = net.forward(_rng().standard_normal((6, 4)), training=True)
    assert Y.shape == (6, 3)
    dX = net.backward(np.ones((6, 3)))
    assert dX is not None and dX.shape == (6, 4)
    assert set(net.state_dict()) == {"0.weight", "0.bias", "1.w"}
    assert net.grads()["1.w"].shape == (3,)


def test_layer_config_rebuilds() -> None:
    """ "`config() -> dict`: JSON-able constructor arguments; `type(layer)(**config)` rebuilds
    it"."""
    for layer in (
        nnrt.layer("dense", 3, 4),
        nnrt.layer("dense_nobias", 3, 4),
        nnrt.layer("sigmoid"),
        nnrt.layer("batchnorm", 5, momentum=0.2, eps=1e-3),
    ):
        cfg = layer.config()
        assert json.loads(json.dumps(cfg)) == cfg
        again = type(layer)(**cfg)
        assert again.config() == cfg
        assert (again.in_features, again.out_features) == (layer.in_features, layer.out_features)


def test_constructor_signatures() -> None:
    """Registered names' constructors: `dense` / `dense_nobias` `(in_features, out_features)`,
    `sigmoid` `()`, `batchnorm` `(num_features, momentum=0.1, eps=1e-5)` — positional and
    keyword forms; `config()` holds exactly those constructor arguments."""
    for name in ("dense", "dense_nobias"):
        a = nnrt.layer(name, 3, 4)
        b = nnrt.layer(name, in_features=3, out_features=4)
        assert a.config() == b.config() == {"in_features": 3, "out_features": 4}
    bn = nnrt.layer("batchnorm", 4, 0.2, 1e-3)
    assert bn.config() == {"num_features": 4, "momentum": 0.2, "eps": 1e-3}
    assert nnrt.layer("batchnorm", num_features=4).config() == {
        "num_features": 4,
        "momentum": 0.1,
        "eps": 1e-5,
    }
    assert (bn.in_features, bn.out_features) == (4, 4)
    assert nnrt.layer("sigmoid").config() == {}
    with pytest.raises(TypeError):
        nnrt.layer("sigmoid", 3)


@pytest.mark.parametrize("name", BUILTIN)
def test_grads_same_keys_and_shapes_as_params(name: str) -> None:
    """ "`grads() -> dict[str, ndarray]`: same keys and shapes as `params()`"."""
    args = {"dense": (3, 4), "dense_nobias": (3, 4), "sigmoid": (), "batchnorm": (3,)}[name]
    layer = nnrt.layer(name, *args)
    p, g = layer.params(), layer.grads()
    assert set(p) == set(g)
    assert all(p[k].shape == g[k].shape for k in p)


def test_in_out_features() -> None:
    """ "`in_features`, `out_features`: ints (`None` where a layer keeps the width, e.g.
    sigmoid)"."""
    d = nnrt.layer("dense", 3, 4)
    assert (d.in_features, d.out_features) == (3, 4)
    assert type(d.in_features) is int and type(d.out_features) is int
    s = nnrt.layer("sigmoid")
    assert (s.in_features, s.out_features) == (None, None)


# ------------------------------------------------------------------------ dense
def test_dense_shapes_and_torch_init() -> None:
    """ "`dense` (core) `(in_features, out_features)`: `weight` (in,out), `bias` (out,)";
    "Weights are initialised from the network's seed (`dense`: uniform ±1/sqrt(in_features),
    as torch)"."""
    n_in, n_out = 64, 200
    layer = nnrt.layer("dense", n_in, n_out)
    assert set(layer.params()) == {"weight", "bias"}
    W, b = layer.params()["weight"], layer.params()["bias"]
    assert W.shape == (n_in, n_out) and b.shape == (n_out,)
    bound = 1.0 / math.sqrt(n_in)
    assert np.abs(W).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(W).max() > 0.95 * bound  # fills the interval
    # uniform on [-bound, bound]: std bound/sqrt(3), mean 0
    assert abs(W.std() - bound / math.sqrt(3)) < 0.05 * bound
    assert abs(W.mean()) < 0.05 * bound
    net1 = nnrt.Sequential([nnrt.layer("dense", n_in, n_out)], seed=1, dtype="float64")
    net1b = nnrt.Sequential([nnrt.layer("dense", n_in, n_out)], seed=1, dtype="float64")
    net2 = nnrt.Sequential([nnrt.layer("dense", n_in, n_out)], seed=2, dtype="float64")
    np.testing.assert_array_equal(net1.params()["0.weight"], net1b.params()["0.weight"])
    assert not np.array_equal(net1.params()["0.weight"], net2.params()["0.weight"])
    assert np.abs(net2.params()["0.weight"]).max() <= bound


def test_dense_semantics() -> None:
    """ "`Y = X @ W + b`; `dW = X.T @ dY`, **`db = dY.sum(axis=0)`** (summed over the batch),
    `dX = dY @ W.T`"."""
    rng = _rng(3)
    layer = nnrt.layer("dense", 5, 3)
    W = layer.params()["weight"].copy()
    b = layer.params()["bias"].copy()
    X = rng.standard_normal((7, 5))
    dY = rng.standard_normal((7, 3))
    Y = layer.forward(X, training=True).copy()
    np.testing.assert_allclose(Y, X @ W + b, rtol=1e-12, atol=1e-12)
    dX = layer.backward(dY).copy()
    np.testing.assert_allclose(dX, dY @ W.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads()["weight"], X.T @ dY, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads()["bias"], dY.sum(axis=0), rtol=1e-12, atol=1e-12)


def test_dense_nobias_semantics() -> None:
    """ "`dense_nobias` (plugin) `(in_features, out_features)`: `weight` (in,out); `Y = X @ W`"."""
    rng = _rng(4)
    layer = nnrt.layer("dense_nobias", 5, 3)
    assert set(layer.params()) == {"weight"}
    W = layer.params()["weight"].copy()
    assert W.shape == (5, 3)
    X = rng.standard_normal((6, 5))
    dY = rng.standard_normal((6, 3))
    np.testing.assert_allclose(layer.forward(X, training=True), X @ W, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dY), dY @ W.T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.grads()["weight"], X.T @ dY, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- sigmoid
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_stable(dtype: str) -> None:
    """ "`sigmoid` (plugin) `()`: numerically stable for any finite input"."""
    layer = nnrt.layer("sigmoid")
    assert layer.params() == {} and layer.buffers() == {}
    big = np.finfo(dtype).max
    X = np.array([[-big, -1000.0, -50.0, -1.0, 0.0, 1.0, 50.0, 1000.0, big]], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net = nnrt.Sequential([layer], dtype=dtype)
        Y = net.forward(X, training=True)
    assert np.all(np.isfinite(Y))
    np.testing.assert_allclose(Y, _sigmoid_ref(X), rtol=1e-6 if dtype == "float32" else 1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_backward_from_cached_output(dtype: str) -> None:
    """ "backward is `dY * s * (1 - s)` from the cached **output** s"."""
    layer = nnrt.layer("sigmoid")
    X = np.array([[-40.0, -3.0, -0.5, 0.0, 0.5, 3.0, 40.0]], dtype=dtype)
    dY = _rng().standard_normal(X.shape).astype(dtype)
    s = layer.forward(X, training=True).copy()
    dX = layer.backward(dY)
    # at x = 40, s rounds to 1.0 so s*(1-s) is exactly 0 (a derivative from X is not)
    np.testing.assert_allclose(
        dX, dY * s * (1 - s), rtol=1e-13 if dtype == "float64" else 1e-6, atol=0
    )


# -------------------------------------------------------------------- batchnorm
def test_batchnorm_constructor_and_initial_state() -> None:
    """ "`batchnorm` (plugin) `(num_features, momentum=0.1, eps=1e-5)`: `gamma` (ones), `beta`
    (zeros); buffers `running_mean` (zeros), `running_var` (ones)"."""
    bn = nnrt.layer("batchnorm", 4)
    cfg = bn.config()
    assert cfg["num_features"] == 4 and cfg["momentum"] == 0.1 and cfg["eps"] == 1e-5
    np.testing.assert_array_equal(bn.params()["gamma"], np.ones(4))
    np.testing.assert_array_equal(bn.params()["beta"], np.zeros(4))
    assert set(bn.params()) == {"gamma", "beta"}
    assert set(bn.buffers()) == {"running_mean", "running_var"}
    np.testing.assert_array_equal(bn.buffers()["running_mean"], np.zeros(4))
    np.testing.assert_array_equal(bn.buffers()["running_var"], np.ones(4))
    bn2 = nnrt.layer("batchnorm", num_features=3, momentum=0.3, eps=1e-3)
    assert bn2.config()["momentum"] == 0.3 and bn2.config()["eps"] == 1e-3


def test_batchnorm_numpy_reference() -> None:
    """ "as `torch.nn.BatchNorm1d`: training normalises with the batch mean and biased variance,
    then updates `running = (1-momentum)*running + momentum*batch_stat` with the **unbiased**
    variance; eval uses the running stats; backward is the full derivative"."""
    rng = _rng(5)
    mom, eps = 0.3, 1e-3
    bn = nnrt.layer("batchnorm", 3, momentum=mom, eps=eps)
    gamma = rng.uniform(0.5, 2.0, 3)
    beta = rng.standard_normal(3)
    bn.params()["gamma"][...] = gamma
    bn.params()["beta"][...] = beta
    X = rng.standard_normal((6, 3)) * 2 + 1
    dY = rng.standard_normal((6, 3))
    mu, var = X.mean(axis=0), X.var(axis=0)
    xhat = (X - mu) / np.sqrt(var + eps)
    np.testing.assert_allclose(bn.forward(X, training=True), gamma * xhat + beta, rtol=1e-10)
    np.testing.assert_allclose(bn.buffers()["running_mean"], mom * mu, rtol=1e-12)
    np.testing.assert_allclose(
        bn.buffers()["running_var"], (1 - mom) + mom * X.var(axis=0, ddof=1), rtol=1e-12
    )
    n = X.shape[0]
    dxhat = dY * gamma
    dX_ref = (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0)) / (n * np.sqrt(var + eps))
    np.testing.assert_allclose(bn.backward(dY), dX_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bn.grads()["gamma"], (dY * xhat).sum(0), rtol=1e-10)
    np.testing.assert_allclose(bn.grads()["beta"], dY.sum(0), rtol=1e-12)
    rm, rv = bn.buffers()["running_mean"].copy(), bn.buffers()["running_var"].copy()
    Xe = rng.standard_normal((4, 3))
    np.testing.assert_allclose(
        bn.forward(Xe, training=False), gamma * (Xe - rm) / np.sqrt(rv + eps) + beta, rtol=1e-10
    )
    np.testing.assert_array_equal(bn.buffers()["running_mean"], rm)  # eval leaves them


def test_batchnorm_against_torch() -> None:
    """ "as `torch.nn.BatchNorm1d`" (forward, running stats, eval, full backward)."""
    torch = pytest.importorskip("torch")
    rng = _rng(6)
    bn = nnrt.layer("batchnorm", 4, momentum=0.2, eps=1e-4)
    tbn = torch.nn.BatchNorm1d(4, momentum=0.2, eps=1e-4).double()
    g, b = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    bn.params()["gamma"][...] = g
    bn.params()["beta"][...] = b
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(g))
        tbn.bias.copy_(torch.from_numpy(b))
    for step in range(3):
        X = rng.standard_normal((5, 4)) * (step + 1)
        dY = rng.standard_normal((5, 4))
        tx = torch.from_numpy(X).requires_grad_(True)
        tbn.train()
        ty = tbn(tx)
        ty.backward(torch.from_numpy(dY))
        np.testing.assert_allclose(bn.forward(X, training=True), ty.detach().numpy(), rtol=1e-10)
        np.testing.assert_allclose(bn.backward(dY), tx.grad.numpy(), rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(bn.grads()["gamma"], tbn.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(bn.grads()["beta"], tbn.bias.grad.numpy(), rtol=1e-10)
        tbn.zero_grad()
    np.testing.assert_allclose(bn.buffers()["running_mean"], tbn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(bn.buffers()["running_var"], tbn.running_var.numpy(), rtol=1e-12)
    Xe = rng.standard_normal((3, 4))
    tbn.eval()
    with torch.no_grad():
        ref = tbn(torch.from_numpy(Xe)).numpy()
    np.testing.assert_allclose(bn.forward(Xe, training=False), ref, rtol=1e-10)


def test_batchnorm_batch_of_one() -> None:
    """ "batch of 1 in training raises `ValueError`" (eval with one sample is fine)."""
    bn = nnrt.layer("batchnorm", 3)
    with pytest.raises(ValueError):
        bn.forward(np.ones((1, 3)), training=True)
    assert bn.forward(np.ones((1, 3)), training=False).shape == (1, 3)
    net = nnrt.Sequential([nnrt.layer("dense_nobias", 2, 3), nnrt.layer("batchnorm", 3)])
    with pytest.raises(ValueError):
        net.forward(np.ones((1, 2)), training=True)


LAYER_ARGS: dict[str, tuple[int, ...]] = {
    "dense": (4, 3),
    "dense_nobias": (4, 3),
    "batchnorm": (4,),
    "sigmoid": (),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", BUILTIN)
def test_forward_backward_arrays_and_last_training_cache(name: str, dtype: str) -> None:
    """ "`forward(X, training: bool) -> Y`: 2-D C-contiguous float arrays, shape (batch,
    features)"; "`backward(dY) -> dX`: uses what the last `forward(training=True)` cached;
    writes parameter gradients" (eval forwards in between do not change it)."""
    rng = _rng(13)
    X1, X2, X3 = (rng.standard_normal((n, 4)) for n in (6, 6, 2))

    def make() -> nnrt.Layer:
        layer = nnrt.layer(name, *LAYER_ARGS[name])
        layer.to_dtype(dtype)
        return layer

    a = make()
    Y = a.forward(X1, training=True)
    assert Y.ndim == 2 and Y.flags.c_contiguous and Y.dtype == np.dtype(dtype)
    assert Y.shape == (6, 3 if name.startswith("dense") else 4)
    dY = rng.standard_normal(Y.shape)
    ref = a.backward(dY).copy()
    assert ref.flags.c_contiguous and ref.dtype == np.dtype(dtype) and ref.shape == X1.shape
    grads = {k: v.copy() for k, v in a.grads().items()}
    b = make()
    b.forward(X1, training=True)
    b.forward(X2, training=False)
    b.forward(X3, training=False)
    np.testing.assert_array_equal(b.backward(dY), ref)
    for k, g in grads.items():
        np.testing.assert_array_equal(b.grads()[k], g)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_network_backward_uses_last_training_forward(dtype: str) -> None:
    """ "`backward(dY) -> dX`: uses what the last `forward(training=True)` cached" — for a
    network too, although forward outputs "may be buffers that the next call ... reuses"."""
    rng = _rng(14)
    X1, X2, X3 = (rng.standard_normal((n, 6)) for n in (8, 8, 3))
    dY = rng.standard_normal((8, 3))
    a = _design_net(dtype)
    a.forward(X1, training=True)
    dX = a.backward(dY)
    assert dX is not None
    ref = dX.copy()
    grads = {k: v.copy() for k, v in a.grads().items()}
    b = _design_net(dtype)
    b.forward(X1, training=True)
    b.forward(X2, training=False)
    b(X3)
    np.testing.assert_array_equal(b.backward(dY), ref)
    for k, g in grads.items():
        np.testing.assert_array_equal(b.grads()[k], g)


@pytest.mark.parametrize("name", BUILTIN)
def test_backward_errors_name_layer(name: str) -> None:
    """ "Bad input gets a clear Python exception naming the layer and the shapes/dtypes
    involved — never a segfault": backward before any training forward, or a dY of the wrong
    shape."""
    layer = nnrt.layer(name, *LAYER_ARGS[name])
    cls = type(layer).__name__
    with pytest.raises(Exception) as info:
        layer.backward(np.ones((6, 4)))
    assert cls in str(info.value)
    layer.forward(np.ones((6, 4)) + np.arange(4), training=True)
    with pytest.raises(ValueError) as info2:
        layer.backward(np.ones((5, 2)))
    assert cls in str(info2.value) and "(5, 2)" in str(info2.value)


def test_minimal_parameter_free_python_layer(tmp_path: Path) -> None:
    """ "A Python subclass calls `super().__init__()`, sets `in_features`/`out_features`, and
    overrides the members above; nothing else is required of it" — here only forward and
    backward (no parameters), used in a network that trains, saves and loads."""

    class Double(nnrt.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.in_features = None
            self.out_features = None

        def forward(self, X: Any, training: bool = False) -> np.ndarray:
            return np.asarray(X) * 2

        def backward(self, dY: Any) -> np.ndarray:
            return np.asarray(dY) * 2

    lname = f"double_{_uid()}"
    nnrt.register_plugin(_plugin_module(f"contract_mod_{_uid()}", {lname: Double}))
    net = nnrt.Sequential([nnrt.layer("dense", 3, 4), nnrt.layer(lname), nnrt.layer("dense", 4, 2)])
    X = _rng().standard_normal((10, 3))
    hist = net.fit(X, np.arange(10) % 2, epochs=2, batch_size=4)
    assert len(hist.history["loss"]) == 2
    assert nnrt.testing.gradcheck(Double(), X) is True
    net.save(tmp_path / "m")
    np.testing.assert_array_equal(nnrt.load(tmp_path / "m")(X), net(X))
    W0, b0 = net.params()["0.weight"], net.params()["0.bias"]
    W2, b2 = net.params()["2.weight"], net.params()["2.bias"]
    X32 = X.astype(np.float32)
    np.testing.assert_allclose(net(X), ((X32 @ W0 + b0) * 2) @ W2 + b2, rtol=1e-5, atol=1e-6)


# ======================================================================== networks
def _design_net(dtype: str = "float32") -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 6, 5),
            nnrt.layer("batchnorm", 5),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 5, 3),
        ],
        seed=0,
        dtype=dtype,
    )


def test_design_example_verbatim() -> None:
    """The `Networks` code example of DESIGN.md runs as written."""
    X = _rng().standard_normal((16, 784)).astype(np.float32)
    dY = _rng(1).standard_normal((16, 10)).astype(np.float32)
    net = nnrt.Sequential([
        nnrt.layer("dense_nobias", 784, 128),
        nnrt.layer("batchnorm", 128),
        nnrt.layer("sigmoid"),
        nnrt.layer("dense", 128, 10),
    ], seed=0, dtype="float32")  # fmt: skip
    Y = net.forward(X, training=True)
    dX = net.backward(dY)
    assert Y.shape == (16, 10) and Y.dtype == np.float32
    assert dX is not None and dX.shape == (16, 784) and dX.dtype == np.float32
    a = net(X).copy()
    np.testing.assert_array_equal(a, net.forward(X, training=False))
    net64 = nnrt.Sequential([nnrt.layer("dense", 784, 10)], dtype="float64")
    assert net64.forward(X).dtype == np.float64


def test_network_structure_and_keys() -> None:
    """ "`net.layers` is the list of layers (`len(net)`, `net[i]` too); `net.params()` /
    `net.grads()` / `net.buffers()` use the same `"<index>.<name>"` keys as `state_dict`";
    e.g. `"0.weight"`, `"1.gamma"`, `"1.running_var"`, `"3.bias"`."""
    layers = [
        nnrt.layer("dense_nobias", 6, 5),
        nnrt.layer("batchnorm", 5),
        nnrt.layer("sigmoid"),
        nnrt.layer("dense", 5, 3),
    ]
    net = nnrt.Sequential(layers, seed=0)
    assert isinstance(net.layers, list) and len(net) == 4
    assert all(net[i] is layers[i] and net.layers[i] is layers[i] for i in range(4))
    assert set(net.params()) == {"0.weight", "1.gamma", "1.beta", "3.weight", "3.bias"}
    assert set(net.grads()) == set(net.params())
    assert set(net.buffers()) == {"1.running_mean", "1.running_var"}
    assert set(net.state_dict()) == set(net.params()) | set(net.buffers())
    for k in ("0.weight", "1.gamma", "1.running_var", "3.bias"):
        assert k in net.state_dict()


def test_unknown_layer_name_keyerror_lists_names() -> None:
    """ "`nnrt.layer(name, *args, **kwargs)` builds a registered layer; an unknown name raises
    `KeyError` listing the names that exist"."""
    assert isinstance(nnrt.layer("batchnorm", num_features=3), nnrt.Layer)
    with pytest.raises(KeyError) as info:
        nnrt.layer("no_such_layer_xyz", 3)
    msg = str(info.value)
    assert "no_such_layer_xyz" in msg
    for name in BUILTIN:
        assert name in msg


def test_available_layers_maps_name_to_plugin() -> None:
    """ "`nnrt.available_layers()` maps name → plugin"; the built-in plugins come through the
    entry-point group `nnrt`."""
    avail = nnrt.available_layers()
    assert set(BUILTIN) <= set(avail)
    assert all(isinstance(v, str) for v in avail.values())
    eps = {ep.name: ep.value for ep in ilm.entry_points(group="nnrt")}
    for name in ("dense_nobias", "sigmoid", "batchnorm"):
        assert avail[name] in eps
        assert eps[avail[name]].startswith("nnrt_plugins")


def test_state_dict_copies_params_live() -> None:
    """ "`params()`/`grads()`/`buffers()` return the live arrays; `state_dict()` returns
    copies"."""
    net = _design_net("float64")
    X = _rng().standard_normal((8, 6))
    sd = net.state_dict()
    sd["3.bias"][...] += 100.0
    sd["1.running_var"][...] = 7.0
    assert not np.array_equal(net.params()["3.bias"], sd["3.bias"])
    assert not np.array_equal(net.buffers()["1.running_var"], sd["1.running_var"])
    before = net(X).copy()
    net.params()["3.bias"][...] += 1.0
    np.testing.assert_allclose(net(X), before + 1.0, rtol=1e-12)
    g = net.grads()["3.weight"]
    net.forward(X, training=True)
    net.backward(np.ones((8, 3)))
    assert np.any(g != 0) and g is net.layers[3].grads()["weight"]


def test_load_state_dict_copies_and_checks() -> None:
    """ "`net.load_state_dict(d)` copies in, checking keys and shapes"."""
    src, dst = _design_net("float64"), _design_net("float64")
    for v in src.params().values():
        v[...] = _rng(9).standard_normal(v.shape)
    state = src.state_dict()
    dst.load_state_dict(state)
    X = _rng().standard_normal((4, 6))
    np.testing.assert_array_equal(dst(X), src(X))
    state["0.weight"][...] = 0.0  # copied in, not aliased
    assert np.any(dst.params()["0.weight"] != 0)
    missing = dict(state)
    del missing["1.running_var"]
    with pytest.raises((KeyError, ValueError)):
        dst.load_state_dict(missing)
    extra = dict(state, **{"9.weight": np.zeros(3)})
    with pytest.raises((KeyError, ValueError)):
        dst.load_state_dict(extra)
    bad = dict(state, **{"3.bias": np.zeros(4)})
    with pytest.raises(ValueError):
        dst.load_state_dict(bad)


def test_save_load_file_format(tmp_path: Path) -> None:
    """ "`net.save(path)` / `nnrt.load(path)`: one `.npz` with a JSON architecture entry and the
    arrays, read with `allow_pickle=False`"; "`save(path)` writes exactly `path` (no suffix
    added). The architecture is a JSON string stored in the `.npz` as a 0-d unicode array named
    `architecture`"."""
    net = _design_net("float64")
    X = _rng().standard_normal((10, 6))
    net.fit(X, np.arange(10) % 3, epochs=1, batch_size=4)
    path = tmp_path / "model.bin"
    net.save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]  # exactly path, no temporary left
    with np.load(path, allow_pickle=False) as npz:
        arch = npz["architecture"]
        assert arch.ndim == 0 and arch.dtype.kind == "U"
        assert isinstance(json.loads(str(arch)), (dict, list))
        for key, value in net.state_dict().items():
            np.testing.assert_array_equal(npz[key], value)
    loaded = nnrt.load(path)
    np.testing.assert_array_equal(loaded(X), net(X))
    assert [type(a) for a in loaded.layers] == [type(a) for a in net.layers]
    entries = dict(np.load(path, allow_pickle=False))
    entries["3.bias"] = np.array([object(), 1, 2], dtype=object)
    with open(tmp_path / "pickled.npz", "wb") as fh:
        np.savez(fh, **entries)
    with pytest.raises(ValueError):  # never unpickled
        nnrt.load(tmp_path / "pickled.npz")
    net.save(str(tmp_path / "other"))
    assert (tmp_path / "other").is_file() and not (tmp_path / "other.npz").exists()


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ "`net.save(path)` ... written atomically": a save that fails half-way leaves the old
    file as it was and no stray file."""
    path = tmp_path / "m.npz"
    old = _design_net()
    old.save(path)
    before = path.read_bytes()

    def broken_savez(file: Any, *args: Any, **kwargs: Any) -> None:
        if hasattr(file, "write"):
            file.write(b"PK partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(np, "savez", broken_savez)
    try:
        _design_net("float64").save(path)
    except OSError:
        assert path.read_bytes() == before
        assert os.listdir(tmp_path) == ["m.npz"]
    monkeypatch.undo()
    loaded = nnrt.load(path)  # a complete file either way
    assert len(loaded) == 4


# ========================================================================== losses
def test_losses_numpy_reference() -> None:
    """ "Reduced as torch's `reduction="mean"`: `softmax_cross_entropy(logits, int_labels)` is
    the mean over the batch; `mse(pred, target)` and `bce_with_logits(logits, target01)` the
    mean over all elements. `dY` already carries that `1/N`."""
    rng = _rng(7)
    Z = rng.standard_normal((6, 4)) * 3
    labels = rng.integers(0, 4, 6)
    loss, dY = nnrt.losses.softmax_cross_entropy(Z, labels)
    logp = _log_softmax_ref(Z)
    assert loss == pytest.approx(-logp[np.arange(6), labels].mean(), rel=1e-12)
    onehot = np.eye(4)[labels]
    np.testing.assert_allclose(dY, (np.exp(logp) - onehot) / 6, rtol=1e-10, atol=1e-15)
    T = rng.standard_normal((6, 4))
    loss, dY = nnrt.losses.mse(Z, T)
    assert loss == pytest.approx(((Z - T) ** 2).mean(), rel=1e-12)
    np.testing.assert_allclose(dY, 2 * (Z - T) / Z.size, rtol=1e-12)
    T01 = rng.uniform(0, 1, (6, 4))
    loss, dY = nnrt.losses.bce_with_logits(Z, T01)
    ref = np.maximum(Z, 0) - Z * T01 + np.log1p(np.exp(-np.abs(Z)))
    assert loss == pytest.approx(ref.mean(), rel=1e-12)
    np.testing.assert_allclose(dY, (_sigmoid_ref(Z) - T01) / Z.size, rtol=1e-10, atol=1e-15)


def test_losses_extreme_logits_finite() -> None:
    """Losses for extreme (finite) logits: finite, equal to the stable float64 formulas
    ("never ... a silent wrong answer")."""
    Z = np.array([[1e4, -1e4, 0.0], [-800.0, 800.0, 3.0]])
    labels = np.array([1, 0])
    loss, dY = nnrt.losses.softmax_cross_entropy(Z, labels)
    logp = _log_softmax_ref(Z)
    assert loss == pytest.approx(-logp[np.arange(2), labels].mean(), rel=1e-12)
    np.testing.assert_allclose(dY, (np.exp(logp) - np.eye(3)[labels]) / 2, atol=1e-15)
    T = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss, dY = nnrt.losses.bce_with_logits(Z, T)
    ref = np.maximum(Z, 0) - Z * T + np.log1p(np.exp(-np.abs(Z)))
    assert loss == pytest.approx(ref.mean(), rel=1e-12)
    np.testing.assert_allclose(dY, (_sigmoid_ref(Z) - T) / Z.size, atol=1e-15)


def test_losses_against_torch() -> None:
    """Losses "reduced as torch's `reduction="mean"`"; "`dY` already carries that `1/N`"."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = _rng(8)
    Z = rng.standard_normal((5, 3)) * 4
    labels = rng.integers(0, 3, 5)
    T = rng.standard_normal((5, 3))
    T01 = (rng.uniform(0, 1, (5, 3)) > 0.5).astype(np.float64)
    cases = [
        (nnrt.losses.softmax_cross_entropy, labels, lambda z: F.cross_entropy(z, torch.from_numpy(labels))),
        (nnrt.losses.mse, T, lambda z: F.mse_loss(z, torch.from_numpy(T))),
        (nnrt.losses.bce_with_logits, T01, lambda z: F.binary_cross_entropy_with_logits(z, torch.from_numpy(T01))),
    ]  # fmt: skip
    for fn, target, tfn in cases:
        tz = torch.from_numpy(Z.copy()).requires_grad_(True)
        tl = tfn(tz)
        tl.backward()
        loss, dY = fn(Z, target)
        assert float(loss) == pytest.approx(tl.item(), rel=1e-12)
        np.testing.assert_allclose(dY, tz.grad.numpy(), rtol=1e-10, atol=1e-15)


# ====================================================================== optimizers
def test_optimizer_signatures() -> None:
    """ "`nnrt.optim.SGD(net, lr, momentum=0.0, weight_decay=0.0, nesterov=False)` and
    `nnrt.optim.Adam(net, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)`";
    "SGD's `lr` has no default"."""
    sgd = inspect.signature(nnrt.optim.SGD).parameters
    assert list(sgd)[:5] == ["net", "lr", "momentum", "weight_decay", "nesterov"]
    assert sgd["lr"].default is inspect.Parameter.empty
    assert (sgd["momentum"].default, sgd["weight_decay"].default) == (0.0, 0.0)
    assert sgd["nesterov"].default is False
    adam = inspect.signature(nnrt.optim.Adam).parameters
    assert list(adam)[:5] == ["net", "lr", "betas", "eps", "weight_decay"]
    assert adam["lr"].default == 1e-3 and tuple(adam["betas"].default) == (0.9, 0.999)
    assert adam["eps"].default == 1e-8 and adam["weight_decay"].default == 0.0
    net = _design_net()
    with pytest.raises(TypeError):
        nnrt.optim.SGD(net)  # type: ignore[call-arg]
    for cls in (nnrt.optim.SGD, nnrt.optim.Adam, nnrt.optim.AdamW):
        opt = cls(net, lr=0.1)
        assert callable(opt.step) and callable(opt.zero_grad)


def _optim_case(torch: Any, make: Any, tmake: Any, steps: int = 4) -> None:
    rng = _rng(11)
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0, dtype="float64")
    params = net.params()
    tparams = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
    opt = make(net)
    topt = tmake(list(tparams.values()))
    for _ in range(steps):
        for k, g in net.grads().items():
            g[...] = rng.standard_normal(g.shape)
            tparams[k].grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    for k, v in params.items():
        np.testing.assert_allclose(v, tparams[k].detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    ["sgd", "sgd_momentum_wd", "sgd_nesterov", "adam", "adam_l2", "adamw"],
)
def test_optimizers_against_torch(case: str) -> None:
    """ "update rules as torch's": SGD (momentum, weight_decay, nesterov), Adam "(L2 added to
    the gradient, as torch's Adam)" and AdamW "(decoupled)"."""
    torch = pytest.importorskip("torch")
    ours, theirs = nnrt.optim, torch.optim
    kw: dict[str, dict[str, Any]] = {
        "sgd": {"lr": 0.1},
        "sgd_momentum_wd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        "sgd_nesterov": {"lr": 0.05, "momentum": 0.8, "nesterov": True},
        "adam": {"lr": 0.01},
        "adam_l2": {"lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.9), "eps": 1e-6},
        "adamw": {"lr": 0.01, "weight_decay": 0.1},
    }
    k = kw[case]
    if case.startswith("sgd"):
        _optim_case(torch, lambda n: ours.SGD(n, **k), lambda p: theirs.SGD(p, **k))
    elif case.startswith("adamw"):
        _optim_case(torch, lambda n: ours.AdamW(n, **k), lambda p: theirs.AdamW(p, **k))
    else:
        _optim_case(torch, lambda n: ours.Adam(n, **k), lambda p: theirs.Adam(p, **k))


def test_adam_l2_vs_adamw_numpy() -> None:
    """Adam: "L2 added to the gradient"; AdamW: "decoupled" (one step, numpy reference)."""
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    for cls in (nnrt.optim.Adam, nnrt.optim.AdamW):
        net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0, dtype="float64")
        w0 = net.params()["0.weight"].copy()
        g = _rng(2).standard_normal(w0.shape)
        net.grads()["0.weight"][...] = g
        net.grads()["0.bias"][...] = 0.0
        cls(net, lr=lr, weight_decay=wd).step()
        if cls is nnrt.optim.Adam:
            gg = g + wd * w0
            base = w0
        else:
            gg = g
            base = w0 * (1 - lr * wd)
        m_hat = (1 - b1) * gg / (1 - b1)
        v_hat = (1 - b2) * gg**2 / (1 - b2)
        ref = base - lr * m_hat / (np.sqrt(v_hat) + eps)
        np.testing.assert_allclose(net.params()["0.weight"], ref, rtol=1e-10, atol=1e-13)


# ============================================================= precise semantics
def test_backward_overwrites_and_zero_grad() -> None:
    """ "`backward` **overwrites** each parameter gradient (no accumulation); `zero_grad()`
    fills them with zeros. Optimizers read `grads()` and never need `zero_grad` first"."""
    net = _design_net("float64")
    X = _rng().standard_normal((8, 6))
    dY = _rng(1).standard_normal((8, 3))
    net.forward(X, training=True)
    net.backward(dY)
    first = {k: v.copy() for k, v in net.grads().items()}
    net.forward(X, training=True)
    net.backward(dY)
    for k, v in net.grads().items():
        np.testing.assert_allclose(v, first[k], rtol=1e-12, atol=1e-15)
    net.zero_grad()
    assert all(np.all(v == 0) for v in net.grads().values())
    net.forward(X, training=True)
    net.backward(dY)
    opt = nnrt.optim.SGD(net, lr=0.1)
    opt.zero_grad()
    assert all(np.all(v == 0) for v in net.grads().values())
    # two SGD steps without zero_grad: each uses only its own backward's gradient
    net.forward(X, training=True)
    net.backward(dY)
    w = net.params()["3.weight"].copy()
    g = net.grads()["3.weight"].copy()
    live = net.params()["3.weight"]
    opt.step()
    assert live is net.params()["3.weight"]  # "updated in place by optimizers"
    np.testing.assert_allclose(live, w - 0.1 * g, rtol=1e-12)


def test_standalone_layer_float64_default_seeded() -> None:
    """ "A layer built on its own holds float64 parameters (default-seeded)"."""
    a, b = nnrt.layer("dense", 4, 3), nnrt.layer("dense", 4, 3)
    assert a.params()["weight"].dtype == np.float64 and a.params()["bias"].dtype == np.float64
    np.testing.assert_array_equal(a.params()["weight"], b.params()["weight"])
    bn = nnrt.layer("batchnorm", 3)
    assert all(v.dtype == np.float64 for v in {**bn.params(), **bn.buffers()}.values())


class _Resettable(_Scale):
    seen: list[Any]

    def reset_parameters(self, rng: np.random.Generator) -> None:
        type(self).seen.append(rng)
        self.w[...] = rng.uniform(-1, 1, self.w.shape)


def test_sequential_keeps_layers_reinits_and_casts() -> None:
    """ "`Sequential(seed=, dtype=)` keeps the same layer objects (`net[i] is layers[i]`),
    re-initialises every layer that has `reset_parameters(rng)` from its seed, and casts params
    and buffers to its dtype"."""
    _Resettable.seen = []
    layers = [nnrt.layer("dense", 3, 3), _Resettable(3), nnrt.layer("batchnorm", 3)]
    before = layers[0].params()["weight"].copy()
    net = nnrt.Sequential(layers, seed=5, dtype="float32")
    assert all(net[i] is layers[i] for i in range(3))
    assert len(_Resettable.seen) == 1 and isinstance(_Resettable.seen[0], np.random.Generator)
    assert not np.allclose(net.params()["0.weight"], before)
    for v in {**net.params(), **net.buffers(), **net.grads()}.values():
        assert v.dtype == np.float32
    _Resettable.seen = []
    net2 = nnrt.Sequential(
        [nnrt.layer("dense", 3, 3), _Resettable(3), nnrt.layer("batchnorm", 3)], seed=5
    )
    for k, v in net.params().items():
        np.testing.assert_array_equal(v, net2.params()[k])
    default = nnrt.Sequential([nnrt.layer("dense", 3, 3)])  # "float32 default"
    assert (
        default.params()["0.weight"].dtype == np.float32
        and default(np.ones((2, 3))).dtype == np.float32
    )
    net64 = nnrt.Sequential([nnrt.layer("batchnorm", 3)], dtype="float64")
    assert all(v.dtype == np.float64 for v in {**net64.params(), **net64.buffers()}.values())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inputs_real_cast(dtype: str) -> None:
    """ "Inputs: any real float or int/bool array is cast to the network's dtype"."""
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0, dtype=dtype)
    Xi = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64)
    ref = net(Xi.astype(dtype)).copy()
    for X in (Xi, Xi.astype(np.int32), Xi.astype(np.uint8), Xi.astype(np.float16),
              Xi.astype(np.float64 if dtype == "float32" else np.float32)):  # fmt: skip
        Y = net(X)
        assert Y.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(Y, ref)
    Xb = np.array([[True, False, True]])
    np.testing.assert_array_equal(net(Xb), net(np.array([[1.0, 0.0, 1.0]], dtype=dtype)))


@pytest.mark.parametrize(
    "X",
    [
        np.ones((2, 3), dtype=np.complex128),
        np.ones((2, 3), dtype=object),
        np.full((2, 3), "a"),
    ],
    ids=["complex", "object", "string"],
)
def test_inputs_bad_dtype_typeerror(X: np.ndarray) -> None:
    """ "complex, object and string arrays raise `TypeError` — messages quote the layer, the
    shape and the dtype"."""
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0)
    for fn in (net.forward, net.layers[0].forward):
        with pytest.raises(TypeError) as info:
            fn(X)
        msg = str(info.value)
        assert "Dense" in msg and "(2, 3)" in msg and str(X.dtype) in msg, msg


@pytest.mark.parametrize(
    "X",
    [np.ones(3), np.ones((2, 3, 1)), np.ones((2, 4)), np.ones((0, 3))],
    ids=["rank1", "rank3", "width", "empty"],
)
def test_inputs_bad_shape_valueerror(X: np.ndarray) -> None:
    """ "rank ≠ 2, a wrong feature count or an empty batch raise `ValueError` — messages quote
    the layer, the shape and the dtype"."""
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0)
    for fn in (net.forward, net.layers[0].forward):
        with pytest.raises(ValueError) as info:
            fn(X)
        msg = str(info.value)
        assert "Dense" in msg and str(X.shape) in msg and "float64" in msg, msg


def test_forward_no_nan_scan_fit_scans() -> None:
    """ "`forward` does not scan for NaN (cost); `fit` does"."""
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0)
    X = np.ones((4, 3))
    X[1, 1] = np.nan
    Y = net.forward(X)
    assert np.isnan(Y[1]).all() and np.isfinite(Y[0]).all()
    with pytest.raises(ValueError):
        net.fit(X, np.zeros(4, dtype=int), epochs=1)


# ----------------------------------------------------------------------------- fit
def _fit_data(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(12)
    X = rng.standard_normal((n, 6))
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0)
    return X, y


def _weights(net: nnrt.Sequential) -> dict[str, np.ndarray]:
    return net.state_dict()


def _same(a: nnrt.Sequential, b: nnrt.Sequential) -> bool:
    wa, wb = _weights(a), _weights(b)
    return all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_fit_defaults() -> None:
    """ "`fit(X, y, loss="softmax_cross_entropy"|callable, optimizer=instance (default Adam),
    epochs=, batch_size=32, shuffle=True, ...)` shuffles with a generator seeded from the
    network's seed"."""
    X, y = _fit_data(70)
    base = _design_net()
    base.fit(X, y, epochs=2)
    explicit = _design_net()
    explicit.fit(
        X, y, loss="softmax_cross_entropy", optimizer=nnrt.optim.Adam(explicit), epochs=2,
        batch_size=32, shuffle=True,
    )  # fmt: skip
    assert _same(base, explicit)
    again = _design_net()
    again.fit(X, y, epochs=2)
    assert _same(base, again)  # same network seed: same shuffling
    for kwargs in ({"shuffle": False}, {"batch_size": 16}, {"loss": "mse"}):
        other = _design_net()
        if kwargs.get("loss") == "mse":
            other.fit(X, np.eye(3)[y], epochs=2, **kwargs)
        else:
            other.fit(X, y, epochs=2, **kwargs)
        assert not _same(base, other), kwargs
    with_callable = _design_net()
    with_callable.fit(X, y, loss=nnrt.losses.softmax_cross_entropy, epochs=2)
    assert _same(base, with_callable)
    reseeded = nnrt.Sequential(_design_net().layers, seed=1)
    reseeded.load_state_dict(_design_net().state_dict())
    reseeded.fit(X, y, epochs=2)
    assert not _same(base, reseeded)  # another seed shuffles differently


def test_fit_history() -> None:
    """ "returns a `History` whose `.history` maps "loss"/"val_loss"/metric names to per-epoch
    lists"."""
    X, y = _fit_data()
    net = _design_net()
    hist = net.fit(X, y, epochs=3, batch_size=8, validation=(X[:10], y[:10]))
    assert isinstance(hist, nnrt.History)
    h = hist.history
    assert len(h["loss"]) == 3 and len(h["val_loss"]) == 3
    assert len(h["accuracy"]) == 3
    assert all(isinstance(v, float) for v in h["loss"])
    hist2 = _design_net().fit(X, y, epochs=2)
    assert "val_loss" not in hist2.history and len(hist2.history["loss"]) == 2


def test_fit_final_batch_of_one_with_batchnorm() -> None:
    """ "skips (with one warning) a final mini-batch of one sample when the net has BatchNorm"."""
    X, y = _fit_data(33)
    net = _design_net()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        net.fit(X, y, epochs=3, batch_size=32)
    assert len(rec) == 1, [str(w.message) for w in rec]
    plain = nnrt.Sequential([nnrt.layer("dense", 6, 3)], seed=0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        plain.fit(X, y, epochs=2, batch_size=32)
    assert rec == []


def test_predict_predict_classes_evaluate() -> None:
    """ "`predict` returns scores (batch, out); `predict_classes` returns labels; `evaluate`
    returns a dict ("loss", and "accuracy" for class labels)"."""
    X, y = _fit_data()
    net = _design_net("float64")
    net.fit(X, y, epochs=2, batch_size=8)
    scores = net.predict(X)
    assert scores.shape == (40, 3)
    np.testing.assert_allclose(scores, net(X), rtol=1e-12)
    labels = net.predict_classes(X)
    np.testing.assert_array_equal(labels, scores.argmax(axis=1))
    res = net.evaluate(X, y)
    logp = _log_softmax_ref(scores)
    assert res["loss"] == pytest.approx(-logp[np.arange(40), y].mean(), rel=1e-9)
    assert res["accuracy"] == pytest.approx((scores.argmax(1) == y).mean())
    T = np.eye(3)[y]
    res = net.evaluate(X, T, loss="mse")
    assert set(res) == {"loss"}
    assert res["loss"] == pytest.approx(((scores - T) ** 2).mean(), rel=1e-9)


# ---------------------------------------------------------------------- testing kit
def test_gradcheck_signature_and_result() -> None:
    """ "`nnrt.testing.gradcheck(layer, X, eps=1e-6, rtol=1e-5, atol=1e-8)` checks dX and every
    parameter gradient in float64, returns `True`, and raises `AssertionError` naming the worst
    entry otherwise"."""
    sig = inspect.signature(nnrt.testing.gradcheck).parameters
    assert list(sig) == ["layer", "X", "eps", "rtol", "atol"]
    assert (sig["eps"].default, sig["rtol"].default, sig["atol"].default) == (1e-6, 1e-5, 1e-8)
    X = _rng().standard_normal((5, 3))
    for layer in (nnrt.layer("dense", 3, 2), nnrt.layer("batchnorm", 3), nnrt.layer("sigmoid")):
        assert nnrt.testing.gradcheck(layer, X) is True
    for name in ("dense", "batchnorm"):  # "in float64": a float32 layer is checked in float64
        layer32 = nnrt.layer(name, *((3, 2) if name == "dense" else (3,)))
        layer32.to_dtype("float32")
        assert nnrt.testing.gradcheck(layer32, X) is True

    class BadDX(_Scale):
        def backward(self, dY: Any) -> np.ndarray:
            out = super().backward(dY)
            out[0, 1] *= 3.0
            return out

    class BadW(_Scale):
        def backward(self, dY: Any) -> np.ndarray:
            out = super().backward(dY)
            self.dw[2] += 1.0
            return out

    with pytest.raises(AssertionError, match=r"dX\[0, 1\]"):
        nnrt.testing.gradcheck(BadDX(3), X)
    with pytest.raises(AssertionError, match=r"'w'.*\[2\]"):
        nnrt.testing.gradcheck(BadW(3), X)

    class BadBoth(BadDX):
        def backward(self, dY: Any) -> np.ndarray:
            out = super().backward(dY)
            self.dw[1] += 1e3  # far worse than dX's factor 3
            return out

    with pytest.raises(AssertionError, match=r"'w'.*\[1\]"):
        nnrt.testing.gradcheck(BadBoth(3), X)


def test_check_layer_signature_and_result() -> None:
    """ "`check_layer(factory, in_features, batch=8)` (factory: a zero-argument callable
    returning a fresh layer) raises `AssertionError` likewise"."""
    sig = inspect.signature(nnrt.testing.check_layer).parameters
    assert list(sig) == ["factory", "in_features", "batch"] and sig["batch"].default == 8
    nnrt.testing.check_layer(lambda: nnrt.layer("dense", 4, 3), 4)
    nnrt.testing.check_layer(lambda: nnrt.layer("batchnorm", 4), 4)
    nnrt.testing.check_layer(lambda: nnrt.layer("sigmoid"), 4, batch=3)
    assert nnrt.testing.check_layer(lambda: _Checked(4), 4) is True

    class Bad(_Checked):
        def backward(self, dY: Any) -> np.ndarray:
            return super().backward(dY) * 2.0

    with pytest.raises(AssertionError, match="Bad"):
        nnrt.testing.check_layer(lambda: Bad(4), 4)


# ========================================================================= registry
def _plugin_module(name: str, layers: dict[str, Any]) -> types.ModuleType:
    mod = types.ModuleType(name)

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> None:
        for key, cls in layers.items():
            register(key, cls)

    mod.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    return mod


def test_register_plugin_runtime_module_name() -> None:
    """ "At run time: `nnrt.register_plugin(module_or_object)`; `nnrt.hookimpl` is the marker";
    "a plugin registered at run time is named by its pluggy name (default: the object's
    `__name__`...)"."""
    mod_name, layer_name = f"contract_mod_{_uid()}", f"scale_{_uid()}"
    nnrt.register_plugin(_plugin_module(mod_name, {layer_name: _Scale}))
    assert nnrt.available_layers()[layer_name] == mod_name
    layer = nnrt.layer(layer_name, 3)
    assert isinstance(layer, _Scale)


def test_register_plugin_runtime_object_name() -> None:
    """ "`nnrt.register_plugin(obj, name=None)` names a plugin by `name`, else by a module's
    `__name__`, else pluggy's default for objects (so two instances of one plugin class can
    both be registered)"."""
    names = [f"scale_{_uid()}", f"scale_{_uid()}"]
    cls_name = f"ContractPlugin{_uid()}"

    def nnrt_register_layers(self: Any, register: Any) -> None:
        register(self.layer_name, _Scale)

    plugin_cls = type(cls_name, (), {"nnrt_register_layers": nnrt.hookimpl(nnrt_register_layers)})
    plugins = [plugin_cls(), plugin_cls()]
    for plugin, layer_name in zip(plugins, names, strict=True):
        plugin.layer_name = layer_name
        assert nnrt.register_plugin(plugin) == str(id(plugin))
        assert nnrt.available_layers()[layer_name] == str(id(plugin))
    named = plugin_cls()
    named.layer_name = f"scale_{_uid()}"
    assert nnrt.register_plugin(named, name=cls_name) == cls_name
    assert nnrt.available_layers()[named.layer_name] == cls_name


def test_registered_python_layer_saves_and_loads(tmp_path: Path) -> None:
    """A layer registered at run time works like a built-in one (`save`/`nnrt.load`)."""
    layer_name = f"scale_{_uid()}"
    nnrt.register_plugin(_plugin_module(f"contract_mod_{_uid()}", {layer_name: _Scale}))
    net = nnrt.Sequential([nnrt.layer("dense", 2, 3), nnrt.layer(layer_name, 3)], seed=0)
    net.params()["1.w"][...] = [2.0, 3.0, 4.0]
    net.save(tmp_path / "m.npz")
    X = _rng().standard_normal((4, 2))
    np.testing.assert_array_equal(nnrt.load(tmp_path / "m.npz")(X), net(X))


def test_registration_validates() -> None:
    """ "Registry: validation happens at registration"; "Registration validates: a `Layer`
    subclass, a unique name (a clash names both plugins), required members present"."""

    class NotALayer:
        pass

    class NoForward(nnrt.Layer):
        def __init__(self) -> None:
            super().__init__()

    for cls in (NotALayer, NoForward):
        pname, lname = f"contract_bad_{_uid()}", f"bad_{_uid()}"
        with pytest.raises((TypeError, ValueError, nnrt.PluginError)) as info:
            nnrt.register_plugin(_plugin_module(pname, {lname: cls}))
        assert pname in str(info.value)
        assert lname not in nnrt.available_layers()


def test_name_clash_names_both_plugins() -> None:
    """ "a name clash raises `ValueError` naming both plugins"."""
    pname = f"contract_clash_{_uid()}"
    owner = nnrt.available_layers()["sigmoid"]
    with pytest.raises(ValueError) as info:
        nnrt.register_plugin(_plugin_module(pname, {"sigmoid": _Scale}))
    assert pname in str(info.value) and owner in str(info.value)
    assert nnrt.available_layers()["sigmoid"] == owner
    first, second = f"contract_a_{_uid()}", f"contract_b_{_uid()}"
    lname = f"clash_{_uid()}"
    nnrt.register_plugin(_plugin_module(first, {lname: _Scale}))
    with pytest.raises(ValueError) as info:
        nnrt.register_plugin(_plugin_module(second, {lname: _Scale}))
    assert first in str(info.value) and second in str(info.value)


def test_plugin_failing_to_load_warns(tmp_path: Path) -> None:
    """ "a plugin that fails to load is reported with a warning (`nnrt.PluginWarning`) naming
    it"; "A plugin that fails to import is reported by name and does not break the others";
    installed plugins are "loaded on first use"."""
    assert issubclass(nnrt.PluginWarning, Warning)
    dist = tmp_path / "contract_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: contract-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[nnrt]\ncontract_broken = contract_no_such_module\ncontract_good = contract_good_plugin\n"
        "contract_clash = contract_clash_plugin\n"
    )
    (tmp_path / "contract_clash_plugin.py").write_text(
        "import nnrt\n"
        "from nnrt_plugins._sigmoid import Sigmoid\n"
        "@nnrt.hookimpl\n"
        "def nnrt_register_layers(register):\n"
        "    register('dense', Sigmoid)\n"
    )
    (tmp_path / "contract_good_plugin.py").write_text(
        "import nnrt\n"
        "from nnrt_plugins._sigmoid import Sigmoid\n"
        "class ContractSig(Sigmoid):\n"
        "    pass\n"
        "@nnrt.hookimpl\n"
        "def nnrt_register_layers(register):\n"
        "    register('contract_sig', ContractSig)\n"
    )
    code = (
        "import sys, warnings\n"
        "import nnrt\n"
        "assert 'contract_no_such_module' not in sys.modules\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    avail = nnrt.available_layers()\n"
        "hits = [w for w in rec if issubclass(w.category, nnrt.PluginWarning)\n"
        "        and 'contract_broken' in str(w.message)]\n"
        "assert len(hits) == 1, [str(w.message) for w in rec]\n"
        "assert {'dense', 'sigmoid', 'batchnorm', 'dense_nobias'} <= set(avail)\n"
        "assert avail['contract_sig'] == 'contract_good', avail\n"
        "clash = [w for w in rec if issubclass(w.category, nnrt.PluginWarning)\n"
        "         and 'contract_clash' in str(w.message)]\n"
        "assert avail['dense'] != 'contract_clash', avail\n"
        "assert len(clash) == 1 and repr(avail['dense']) in str(clash[0].message), clash\n"
        "assert type(nnrt.layer('dense', 2, 3)).__name__ == 'Dense'\n"
        "print('OK')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


# ========================================================================== plugins
def test_hookspec_register_layers() -> None:
    """ "# nnrt.hookspecs (pluggy project name "nnrt") @hookspec def
    nnrt_register_layers(register): # register(name: str, cls: type[nnrt.Layer])"."""
    spec = nnrt.hookspecs.nnrt_register_layers
    assert hasattr(spec, "nnrt_spec")
    assert list(inspect.signature(spec).parameters) == ["register"]
    assert isinstance(nnrt.hookimpl, pluggy.HookimplMarker)
    assert nnrt.hookimpl.project_name == "nnrt"
    assert isinstance(nnrt.hookspec, pluggy.HookspecMarker)
    assert nnrt.hookspec.project_name == "nnrt"


def test_every_hookspec_documented_and_typed() -> None:
    """ "every hookspec has a docstring and a typed signature"."""
    specs = [
        obj
        for name, obj in vars(nnrt.hookspecs).items()
        if callable(obj) and hasattr(obj, "nnrt_spec")
    ]
    assert specs
    for fn in specs:
        assert inspect.getdoc(fn), fn.__name__
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, fn.__name__
        for p in sig.parameters.values():
            assert p.annotation is not inspect.Parameter.empty, (fn.__name__, p.name)
        # the annotations resolve to real objects
        typing.get_type_hints(fn, localns={"Layer": nnrt.Layer, "Sequential": nnrt.Sequential})


def test_entry_point_group_used_by_builtins() -> None:
    """ "Installed plugins: setuptools entry-point group **`nnrt`**"; the built-in plugins are
    "each one registered through the same entry-point group a third party uses"."""
    eps = {ep.name: ep for ep in ilm.entry_points(group="nnrt")}
    avail = nnrt.available_layers()
    for layer_name in ("dense_nobias", "sigmoid", "batchnorm"):
        ep = eps[avail[layer_name]]
        assert ep.value.startswith("nnrt_plugins.")
        module = ep.load()
        assert hasattr(module, "nnrt_register_layers")
