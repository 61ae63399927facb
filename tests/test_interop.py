"""Weights both ways between nnrt and torch (``nnrt.from_torch``, ``net.to_torch()``).

torch is the oracle here: the same weights must give the same outputs, the
same BatchNorm running-statistics updates and the same gradients.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

import nnrt

torch = pytest.importorskip("torch")
nn = torch.nn

TOL = {"float32": {"rtol": 2e-5, "atol": 2e-6}, "float64": {"rtol": 1e-12, "atol": 1e-12}}
TDTYPE = {"float32": torch.float32, "float64": torch.float64}


def _torch_model(dtype: str, seed: int = 0) -> Any:
    """Linear(no bias) → BatchNorm1d(momentum, eps, trained stats) → Sigmoid → Linear."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(5, 12, bias=False),
        nn.BatchNorm1d(12, momentum=0.25, eps=1e-3),
        nn.Sigmoid(),
        nn.Linear(12, 3),
    ).to(TDTYPE[dtype])
    with torch.no_grad():
        m[1].weight.uniform_(0.5, 2.0)
        m[1].bias.normal_()
        m.train()
        for _ in range(3):  # running statistics away from (0, 1)
            m(torch.randn(20, 5, dtype=TDTYPE[dtype]) * 3 + 1)
    return m


def _np(t: Any) -> np.ndarray:
    return t.detach().numpy()  # type: ignore[no-any-return]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_from_torch_eval_and_training_match(dtype: str) -> None:
    m = _torch_model(dtype)
    net = nnrt.from_torch(m)
    assert net.dtype == np.dtype(dtype)
    names = [nnrt.registry.name_of(type(layer)) for layer in net]
    assert names == ["dense_nobias", "batchnorm", "sigmoid", "dense"]
    assert net[1].config() == {"num_features": 12, "momentum": 0.25, "eps": 1e-3}
    # nnrt keeps (in, out); torch (out, in)
    np.testing.assert_array_equal(net.params()["0.weight"], _np(m[0].weight).T)

    X = np.random.default_rng(1).normal(1.0, 2.0, size=(16, 5)).astype(dtype)
    Xt = torch.from_numpy(X.copy())
    m.eval()
    np.testing.assert_allclose(net(X), _np(m(Xt)), **TOL[dtype])

    # training mode: batch statistics, running-stat update, gradients
    m.train()
    Xt.requires_grad_(True)
    Yt = m(Xt)
    Y = net.forward(X, training=True)
    np.testing.assert_allclose(Y, _np(Yt), **TOL[dtype])
    np.testing.assert_allclose(
        net.buffers()["1.running_mean"], _np(m[1].running_mean), **TOL[dtype]
    )
    np.testing.assert_allclose(net.buffers()["1.running_var"], _np(m[1].running_var), **TOL[dtype])
    dY = np.random.default_rng(2).normal(size=Y.shape).astype(dtype)
    Yt.backward(torch.from_numpy(dY))
    dX = net.backward(dY)
    np.testing.assert_allclose(dX, _np(Xt.grad), **TOL[dtype])
    g = net.grads()
    np.testing.assert_allclose(g["0.weight"], _np(m[0].weight.grad).T, **TOL[dtype])
    np.testing.assert_allclose(g["1.gamma"], _np(m[1].weight.grad), **TOL[dtype])
    np.testing.assert_allclose(g["1.beta"], _np(m[1].bias.grad), **TOL[dtype])
    np.testing.assert_allclose(g["3.weight"], _np(m[3].weight.grad).T, **TOL[dtype])
    np.testing.assert_allclose(g["3.bias"], _np(m[3].bias.grad), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_to_torch_eval_and_training_match(dtype: str) -> None:
    net = nnrt.Sequential(
        [
            nnrt.layer("dense", 4, 10),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense_nobias", 10, 6),
            nnrt.layer("batchnorm", 6, momentum=0.05, eps=1e-4),
            nnrt.layer("dense", 6, 2),
        ],
        seed=7,
        dtype=dtype,
    )
    rng = np.random.default_rng(3)
    for _ in range(3):
        net.forward(rng.normal(size=(8, 4)), training=True)
    m = net.to_torch()
    assert isinstance(m, nn.Sequential)
    assert [type(c) for c in m] == [nn.Linear, nn.Sigmoid, nn.Linear, nn.BatchNorm1d, nn.Linear]
    assert m[2].bias is None and m[0].bias is not None
    assert m[3].momentum == 0.05 and m[3].eps == 1e-4
    assert all(p.dtype == TDTYPE[dtype] for p in m.parameters())
    assert m.training  # as torch builds modules

    X = rng.normal(size=(11, 4)).astype(dtype)
    m.eval()
    np.testing.assert_allclose(_np(m(torch.from_numpy(X))), net(X), **TOL[dtype])
    m.train()
    np.testing.assert_allclose(
        _np(m(torch.from_numpy(X))), net.forward(X, training=True), **TOL[dtype]
    )
    np.testing.assert_allclose(_np(m[3].running_var), net.buffers()["3.running_var"], **TOL[dtype])


def test_copies_not_shared_memory() -> None:
    m = _torch_model("float64")
    net = nnrt.from_torch(m)
    before = _np(m[0].weight).copy()
    net.params()["0.weight"][...] = 0.0
    np.testing.assert_array_equal(_np(m[0].weight), before)
    back = net.to_torch()
    with torch.no_grad():
        back[0].weight.fill_(5.0)
    assert np.all(net.params()["0.weight"] == 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_exact(dtype: str) -> None:
    m = _torch_model(dtype)
    net = nnrt.from_torch(m)
    again = nnrt.from_torch(net.to_torch())
    a, b = net.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m2 = net.to_torch()
    for (k1, t1), (k2, t2) in zip(m.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k1 == k2
        if k1.endswith("num_batches_tracked"):
            continue  # no nnrt counterpart
        np.testing.assert_array_equal(_np(t1), _np(t2), err_msg=k1)


def test_dtype_override_and_single_module() -> None:
    lin = nn.Linear(3, 2).double()
    net = nnrt.from_torch(lin, dtype="float32")
    assert net.dtype == np.float32 and len(net) == 1
    X = np.random.default_rng(5).normal(size=(4, 3))
    ref = X @ _np(lin.weight).T + _np(lin.bias)
    np.testing.assert_allclose(net(X), ref, rtol=1e-5, atol=1e-6)
    seq = nnrt.from_torch(nn.Sequential(nn.Identity(), nn.Linear(3, 2), nn.Identity()))
    assert len(seq) == 1


def test_unsupported_modules_are_named() -> None:
    with pytest.raises(TypeError, match=r"module 1 ReLU\(\).*no nnrt counterpart"):
        nnrt.from_torch(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(TypeError, match="momentum=None"):
        nnrt.from_torch(nn.Sequential(nn.BatchNorm1d(3, momentum=None)))
    with pytest.raises(TypeError, match="affine=True"):
        nnrt.from_torch(nn.Sequential(nn.BatchNorm1d(3, affine=False)))
    with pytest.raises(TypeError, match="float16"):
        nnrt.from_torch(nn.Sequential(nn.Linear(2, 2).half()))
    with pytest.raises(ValueError, match="no layer"):
        nnrt.from_torch(nn.Sequential(nn.Identity()))
    with pytest.raises(TypeError, match="torch.nn.Sequential"):
        nnrt.from_torch([nn.Linear(2, 2)])  # type: ignore[arg-type]


class _Double(nnrt.Layer):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        return np.ascontiguousarray(X, dtype=self.dtype) * 2

    def backward(self, dY: Any) -> np.ndarray:
        return np.ascontiguousarray(dY) * 2

    def config(self) -> dict[str, Any]:
        return {}


class _DoublePlugin:
    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register("interop_test_double", _Double)


def test_layer_without_torch_counterpart_is_named() -> None:
    if "interop_test_double_plugin" not in nnrt.registry.plugins():
        nnrt.register_plugin(_DoublePlugin(), name="interop_test_double_plugin")
    net = nnrt.Sequential([nnrt.layer("dense", 2, 2), nnrt.layer("interop_test_double")])
    with pytest.raises(
        TypeError, match="layer 1.*'interop_test_double'.*interop_test_double_plugin"
    ):
        net.to_torch()


# ------------------------------------------------------------- the torch hooks
class _Scale(nnrt.Layer):
    """Y = X * factor; torch counterpart: the test module _TorchScale."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        return np.ascontiguousarray(X, dtype=self.dtype) * self.factor

    def backward(self, dY: Any) -> np.ndarray:
        return np.ascontiguousarray(dY) * self.factor

    def config(self) -> dict[str, Any]:
        return {"factor": self.factor}


class _TorchScale(nn.Module):  # type: ignore[misc]
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Any) -> Any:
        return x * self.factor


_scale_plugin_names = itertools.count()


class _ScalePlugin:
    """A third party's layer with both torch hooks (``bad``: hooks that break the spec)."""

    def __init__(self, bad: bool = False) -> None:
        self.bad = bad
        self.uid = next(_scale_plugin_names)

    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register(f"interop_scale_{self.uid}", _Scale)

    @nnrt.hookimpl
    def nnrt_to_torch(self, layer: Any) -> Any:
        if type(layer) is not _Scale:
            return None
        return "not a module" if self.bad else _TorchScale(layer.factor)

    @nnrt.hookimpl
    def nnrt_from_torch(self, module: Any) -> Any:
        if type(module) is not _TorchScale:
            return None
        return nn.Identity() if self.bad else _Scale(module.factor)


@pytest.fixture
def scale_plugin() -> Any:
    made: list[Any] = []

    def make(bad: bool = False) -> Any:
        plugin = _ScalePlugin(bad)
        # a counter, not id(plugin): a freed plugin's id can come back, and the
        # registry keeps the names it has seen
        nnrt.register_plugin(plugin, name=f"interop-scale-{plugin.uid}")
        made.append(plugin)
        return plugin

    yield make
    for plugin in made:
        nnrt.registry.pm.unregister(plugin)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_third_party_layer_goes_both_ways_through_the_hooks(
    scale_plugin: Any, dtype: str
) -> None:
    scale_plugin()
    net = nnrt.Sequential(
        [nnrt.layer("dense", 3, 4), _Scale(2.5), nnrt.layer("sigmoid")], seed=1, dtype=dtype
    )
    m = net.to_torch().eval()
    assert isinstance(m[1], _TorchScale) and m[1].factor == 2.5
    X = np.random.default_rng(0).normal(size=(6, 3))
    W, b = net.state_dict()["0.weight"], net.state_dict()["0.bias"]
    want = 1.0 / (1.0 + np.exp(-(X @ W.astype(np.float64) + b) * 2.5))  # float64 reference
    got = _np(m(torch.from_numpy(X.astype(dtype))))
    np.testing.assert_allclose(got, want, **TOL[dtype])
    back = nnrt.from_torch(m)
    assert isinstance(back[1], _Scale) and back[1].factor == 2.5
    np.testing.assert_allclose(back.predict(X), want, **TOL[dtype])


def test_a_hook_result_of_the_wrong_type_is_a_plugin_error(scale_plugin: Any) -> None:
    plugin = scale_plugin(bad=True)
    name = nnrt.registry.pm.get_name(plugin)
    net = nnrt.Sequential([nnrt.layer("dense", 3, 4), _Scale(2.0)], seed=0)
    with pytest.raises(nnrt.PluginError, match=f"{name}.*nnrt_to_torch.*not a torch.nn.Module"):
        net.to_torch()
    with pytest.raises(nnrt.PluginError, match=f"{name}.*nnrt_from_torch.*not an nnrt.Layer"):
        nnrt.from_torch(nn.Sequential(nn.Linear(3, 4), _TorchScale(2.0)))


def test_sync_batchnorm_maps_to_torch_sync_batchnorm() -> None:
    """In one process both are BatchNorm1d's maths; eval uses the running statistics."""
    rng = np.random.default_rng(7)
    net = nnrt.Sequential(
        [nnrt.layer("dense_nobias", 4, 5), nnrt.layer("sync_batchnorm", 5, momentum=0.3, eps=1e-3)],
        seed=0,
        dtype="float64",
    )
    state = net.state_dict()
    state["1.gamma"] = rng.uniform(0.5, 2, 5)
    state["1.beta"] = rng.normal(size=5)
    state["1.running_mean"] = rng.normal(size=5)
    state["1.running_var"] = rng.uniform(0.5, 2, 5)
    net.load_state_dict(state)
    m = net.to_torch()
    assert type(m[1]) is nn.SyncBatchNorm and m[1].momentum == 0.3 and m[1].eps == 1e-3
    X = rng.normal(size=(7, 4))
    z = X @ state["0.weight"]
    want = (z - state["1.running_mean"]) / np.sqrt(state["1.running_var"] + 1e-3)
    want = want * state["1.gamma"] + state["1.beta"]
    np.testing.assert_allclose(_np(m.eval()(torch.from_numpy(X))), want, rtol=1e-12, atol=1e-12)
    back = nnrt.from_torch(m)
    assert nnrt.registry.name_of(type(back[1])) == "sync_batchnorm"
    assert all(np.array_equal(back.state_dict()[k], v) for k, v in state.items())
