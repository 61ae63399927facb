"""The fused batchnorm -> sigmoid path inside ``Sequential`` (nnrt/_kernels.pyx), and
fusion offered by plugins through the hook ``nnrt_fuse_pair``.

Inside a network, a BatchNorm directly followed by a Sigmoid runs as one pass
forward and two passes backward (the batchnorm plugin's ``nnrt_fuse_pair``). Checked here against an independent float64
numpy reference written in this file, central finite differences, the same
layers called one by one (identical results: the kernels do the same
element-wise operations in the same order), and the layers' own caches (each
layer's backward still works after a fused forward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import nnrt

EPS = 1e-5
MOM = 0.1


def _layers(n_in: int = 6, width: int = 5, n_out: int = 3) -> list[nnrt.Layer]:
    return [
        nnrt.layer("dense_nobias", n_in, width),
        nnrt.layer("batchnorm", width),
        nnrt.layer("sigmoid"),
        nnrt.layer("dense", width, n_out),
    ]


def _net(dtype: Any, seed: int = 3) -> nnrt.Sequential:
    net = nnrt.Sequential(_layers(), seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    # non-trivial gamma/beta/running statistics so every term of the formulas counts
    bn = net[1].params()
    bn["gamma"][...] = rng.uniform(0.5, 1.5, size=bn["gamma"].shape)
    bn["beta"][...] = rng.normal(size=bn["beta"].shape)
    buf = net[1].buffers()
    buf["running_mean"][...] = rng.normal(size=buf["running_mean"].shape)
    buf["running_var"][...] = rng.uniform(0.5, 2.0, size=buf["running_var"].shape)
    return net


# ------------------------------------------------------------- float64 reference
def _ref_forward(p: dict[str, np.ndarray], X: np.ndarray, training: bool) -> dict[str, Any]:
    """Textbook float64 forward of dense_nobias -> batchnorm -> sigmoid -> dense."""
    X = X.astype(np.float64)
    h = X @ p["0.weight"]
    if training:
        mu = h.mean(axis=0)
        var = h.var(axis=0)
    else:
        mu = p["1.running_mean"]
        var = p["1.running_var"]
    xhat = (h - mu) / np.sqrt(var + EPS)
    z = p["1.gamma"] * xhat + p["1.beta"]
    s = 1.0 / (1.0 + np.exp(-z))
    out = s @ p["3.weight"] + p["3.bias"]
    return {"X": X, "h": h, "mu": mu, "var": var, "xhat": xhat, "s": s, "out": out}


def _ref_backward(p: dict[str, np.ndarray], c: dict[str, Any], dout: np.ndarray) -> dict:
    n = dout.shape[0]
    g: dict[str, np.ndarray] = {}
    g["3.weight"] = c["s"].T @ dout
    g["3.bias"] = dout.sum(axis=0)
    ds = dout @ p["3.weight"].T
    dz = ds * c["s"] * (1 - c["s"])
    g["1.beta"] = dz.sum(axis=0)
    g["1.gamma"] = (dz * c["xhat"]).sum(axis=0)
    dxhat = dz * p["1.gamma"]
    inv = 1.0 / np.sqrt(c["var"] + EPS)
    dh = inv / n * (n * dxhat - dxhat.sum(axis=0) - c["xhat"] * (dxhat * c["xhat"]).sum(axis=0))
    g["0.weight"] = c["X"].T @ dh
    g["X"] = dh @ p["0.weight"].T
    return g


def _state64(net: nnrt.Sequential) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in net.state_dict().items()}


def _tols(dtype: Any) -> dict[str, float]:
    return (
        {"rtol": 1e-4, "atol": 1e-5}
        if np.dtype(dtype) == np.float32
        else {
            "rtol": 1e-10,
            "atol": 1e-12,
        }
    )


def test_pair_is_fused_and_only_the_exact_pair() -> None:
    net = _net("float32")
    assert net._fuse_plan() == bytes([0, 1, 0, 0])

    class MyBN(type(net[1])):  # type: ignore[misc]
        pass

    # a subclass may override forward: never fused (the plugin's hook checks exact classes)
    assert nnrt.Sequential([MyBN(5), nnrt.layer("sigmoid")])._fuse_plan() is None
    assert nnrt.Sequential([net[1], nnrt.layer("dense", 5, 5)])._fuse_plan() is None
    other = nnrt.Sequential(
        [nnrt.layer("batchnorm", 4), nnrt.layer("dense", 4, 4), nnrt.layer("sigmoid")]
    )
    assert other._fuse_plan() is None


def test_fusion_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNRT_FUSE", "0")
    assert _net("float32")._fuse_plan() is None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_step_matches_float64_reference(dtype: str) -> None:
    net = _net(dtype)
    rng = np.random.default_rng(7)
    X = rng.normal(2.0, 3.0, size=(9, 6)).astype(dtype)
    dout = rng.normal(size=(9, 3)).astype(dtype)
    p = _state64(net)
    tol = _tols(dtype)
    for training in (False, True):  # eval first: training updates the running statistics
        c = _ref_forward(p, X, training)
        np.testing.assert_allclose(net.forward(X, training=training), c["out"], **tol)
    c = _ref_forward(p, X, True)
    net.forward(X, training=True)
    dX = net.backward(dout)
    g = _ref_backward(p, c, dout.astype(np.float64))
    np.testing.assert_allclose(dX, g["X"], **tol)
    for k, v in net.grads().items():
        np.testing.assert_allclose(v, g[k], err_msg=k, **tol)
    assert net.backward(dout, input_grad=False) is None
    for k, v in net.grads().items():
        np.testing.assert_allclose(v, g[k], err_msg=k, **tol)
    # running statistics updated exactly once per training forward (two so far)
    rm, rv = p["1.running_mean"], p["1.running_var"]
    n = X.shape[0]
    for _ in range(2):
        rm = (1 - MOM) * rm + MOM * c["mu"]
        rv = (1 - MOM) * rv + MOM * c["var"] * n / (n - 1)
    np.testing.assert_allclose(net[1].buffers()["running_mean"], rm, **tol)
    np.testing.assert_allclose(net[1].buffers()["running_var"], rv, **tol)


def test_fused_gradients_finite_differences(
    fd_grad: Callable[[Callable[[], float], np.ndarray, float], np.ndarray],
) -> None:
    net = _net("float64")
    rng = np.random.default_rng(11)
    X = rng.normal(size=(7, 6))
    w = rng.normal(size=(7, 3))

    def loss() -> float:
        out = net.forward(X, training=True)
        return float((out * w).sum())

    loss()
    dX = net.backward(w).copy()
    grads = {k: v.copy() for k, v in net.grads().items()}
    np.testing.assert_allclose(dX, fd_grad(loss, X, 1e-6), rtol=1e-6, atol=1e-8)
    params = net.params()
    for k in ("1.gamma", "1.beta", "0.weight"):
        np.testing.assert_allclose(grads[k], fd_grad(loss, params[k], 1e-6), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_equals_layer_by_layer(dtype: str) -> None:
    fused, plain = _net(dtype), _net(dtype)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(16, 6)).astype(dtype)
    dout = rng.normal(size=(16, 3)).astype(dtype)
    for training in (False, True, True):
        out = fused.forward(X, training=training)
        h = X
        for layer in plain:
            h = layer.forward(h, training)
        np.testing.assert_array_equal(out, h)
    dX = fused.backward(dout)
    g = dout
    for layer in reversed(list(plain)):
        g = layer.backward(g)
    np.testing.assert_array_equal(dX, g)
    for k, v in fused.grads().items():
        np.testing.assert_array_equal(v, plain.grads()[k], err_msg=k)
    for k, v in fused.buffers().items():
        np.testing.assert_array_equal(v, plain.buffers()[k], err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_each_layer_backward_works_after_fused_forward(dtype: str) -> None:
    net = _net(dtype)
    rng = np.random.default_rng(8)
    X = rng.normal(size=(10, 6)).astype(dtype)
    ds = rng.normal(size=(10, 5)).astype(dtype)
    net.forward(X, training=True)
    bn, sig = net[1], net[2]
    fused = bn._nnrt_backward_pair(ds, sig).copy()
    fused_grads = {k: v.copy() for k, v in bn.grads().items()}
    dz = sig.backward(ds).copy()
    dh = bn.backward(dz)
    np.testing.assert_array_equal(fused, dh)
    for k, v in bn.grads().items():
        np.testing.assert_array_equal(v, fused_grads[k], err_msg=k)
    # and against the reference: sigmoid's cached output is sigmoid(bn(h))
    p = _state64(net)
    c = _ref_forward(p, X, True)
    np.testing.assert_allclose(dz, ds * c["s"] * (1 - c["s"]), **_tols(dtype))


def test_fused_output_never_overwrites_its_input() -> None:
    # feeding the pair's own output buffer back in: the cached input must survive
    bn_net = nnrt.Sequential([nnrt.layer("batchnorm", 4), nnrt.layer("sigmoid")], dtype="float64")
    assert bn_net._fuse_plan() == bytes([1, 0])
    rng = np.random.default_rng(2)
    X = rng.normal(size=(6, 4))
    out = bn_net.forward(X, training=True)
    want_in = out.copy()
    out2 = bn_net.forward(out, training=True)
    assert not np.shares_memory(out, out2)
    z = (want_in - want_in.mean(0)) / np.sqrt(want_in.var(0) + EPS)
    np.testing.assert_allclose(out2, 1 / (1 + np.exp(-z)), rtol=1e-12, atol=1e-14)
    # backward uses that cached input
    d = rng.normal(size=(6, 4))
    dX = bn_net.backward(d)
    s = 1 / (1 + np.exp(-z))
    dz = d * s * (1 - s)
    n = 6
    inv = 1 / np.sqrt(want_in.var(0) + EPS)
    want = inv / n * (n * dz - dz.sum(0) - z * (dz * z).sum(0))
    np.testing.assert_allclose(dX, want, rtol=1e-10, atol=1e-12)


def test_fused_errors_name_the_layer() -> None:
    net = _net("float32")
    X = np.ones((1, 6), dtype=np.float32)
    with pytest.raises(ValueError, match=r"layer 1: BatchNorm.*more than 1 sample"):
        net.forward(X, training=True)
    net.forward(np.ones((4, 6), dtype=np.float32), training=True)
    with pytest.raises(ValueError, match=r"layer 3: Dense.*gradient of shape"):
        net.backward(np.ones((5, 3), dtype=np.float32))


# ------------------------------------------------------------- fused Adam / AdamW
def _adam_ref(p, g, m, v, t, lr, b1, b2, eps, wd, decoupled):
    """torch.optim.Adam/AdamW's documented update, float64."""
    if wd and decoupled:
        p = p * (1 - lr * wd)
    elif wd:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat = m / (1 - b1**t)
    vhat = v / (1 - b2**t)
    return p - lr * mhat / (np.sqrt(vhat) + eps), m, v


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        ("Adam", {}),
        ("Adam", {"weight_decay": 0.1, "betas": (0.3, 0.99)}),
        ("AdamW", {"weight_decay": 0.05}),
        ("AdamW", {"weight_decay": 0.0, "betas": (0.6, 0.9), "eps": 1e-3}),
    ],
)
def test_adam_kernel_matches_float64_reference(
    dtype: str, cls: str, kwargs: dict[str, Any]
) -> None:
    import nnrt.optim as optim

    net = _net(dtype)
    opt = getattr(optim, cls)(net, lr=0.01, **kwargs)
    hp = opt.hyperparams()
    rng = np.random.default_rng(9)
    ref = {k: (v.astype(np.float64), 0.0, 0.0) for k, v in net.params().items()}
    for t in range(1, 4):
        grads = {k: rng.normal(size=v.shape) for k, v in net.grads().items()}
        for k, g in net.grads().items():
            g[...] = grads[k]
        opt.step()
        for k, (p, m, v) in ref.items():
            g64 = grads[k].astype(dtype).astype(np.float64)
            ref[k] = _adam_ref(
                p, g64, m, v, t, 0.01, *hp["betas"], hp["eps"], hp["weight_decay"], cls == "AdamW"
            )
        for k, p in net.params().items():
            np.testing.assert_allclose(p, ref[k][0], err_msg=k, **_tols(dtype))
            np.testing.assert_allclose(
                opt.state[k]["exp_avg"], ref[k][1], err_msg=k, **_tols(dtype)
            )
            np.testing.assert_allclose(
                opt.state[k]["exp_avg_sq"], ref[k][2], err_msg=k, rtol=1e-4, atol=1e-12
            )
    assert opt.step_count == 3


# ------------------------------------------- fusion offered by a third-party plugin
class _PairDense(nnrt.dense.Dense):  # type: ignore[misc]
    """A compiled dense (forward/backward inherited) that runs itself and the layer
    after it through the FusablePair methods, counting the fused calls."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.fused_calls: list[str] = []

    def _nnrt_forward_pair(
        self, X: Any, training: bool, second: nnrt.Layer, trusted: bool = False
    ) -> Any:
        self.fused_calls.append("forward")
        return second.forward(self.forward(X, training), training)

    def _nnrt_backward_pair(self, dY: Any, second: nnrt.Layer) -> Any:
        self.fused_calls.append("backward")
        return self.backward(second.backward(dY))


class _NoPairDense(nnrt.dense.Dense):  # type: ignore[misc]
    pass


_fusion_plugin_names = iter(range(10**9))


class _FusionPlugin:
    """Offers fusion of its dense classes followed by a sigmoid; ``answer`` is what
    its hook returns for such a pair."""

    def __init__(self, answer: Any = True) -> None:
        self.answer = answer
        self.name = f"test-fusion-{next(_fusion_plugin_names)}"

    @nnrt.hookimpl
    def nnrt_fuse_pair(self, first: nnrt.Layer, second: nnrt.Layer) -> Any:
        if type(first) in (_PairDense, _NoPairDense) and type(second).__name__ == "Sigmoid":
            return self.answer
        return None


@pytest.fixture
def fusion_plugin() -> Any:
    from nnrt.registry import registry

    plugins = []

    def make(answer: Any = True) -> _FusionPlugin:
        plugin = _FusionPlugin(answer)
        nnrt.register_plugin(plugin, name=plugin.name)
        plugins.append(plugin)
        return plugin

    yield make
    for plugin in plugins:
        registry.pm.unregister(plugin)


def test_a_third_party_plugin_fuses_its_own_pair(fusion_plugin: Any) -> None:
    fusion_plugin(True)
    first = _PairDense(4, 3)
    layers = [nnrt.layer("dense", 5, 4), first, nnrt.layer("sigmoid"), nnrt.layer("dense", 3, 2)]
    net = nnrt.Sequential(layers, seed=1, dtype="float64")
    assert net._fuse_plan() == bytes([0, 1, 0, 0])
    rng = np.random.default_rng(4)
    X = rng.normal(size=(7, 5))
    d = rng.normal(size=(7, 2))
    p = _state64(net)
    out = net.forward(X, training=True).copy()
    dX = net.backward(d).copy()
    assert first.fused_calls == ["forward", "backward"]
    # float64 reference of dense -> dense -> sigmoid -> dense
    h = X @ p["0.weight"] + p["0.bias"]
    s = 1 / (1 + np.exp(-(h @ p["1.weight"] + p["1.bias"])))
    np.testing.assert_allclose(out, s @ p["3.weight"] + p["3.bias"], rtol=1e-12)
    dz = (d @ p["3.weight"].T) * s * (1 - s)
    np.testing.assert_allclose(net.grads()["1.weight"], h.T @ dz, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dX, dz @ p["1.weight"].T @ p["0.weight"].T, rtol=1e-12, atol=1e-14)


def test_a_plugin_may_forbid_a_fusion(fusion_plugin: Any) -> None:
    fusion_plugin(False)
    assert nnrt.Sequential([_PairDense(4, 3), nnrt.layer("sigmoid")])._fuse_plan() is None


@pytest.mark.parametrize(
    ("answer", "first", "message"),
    [
        ("yes", _PairDense, r"returned str 'yes'.*expected True, False or None"),
        (1, _PairDense, r"returned int 1"),
        (np.True_, _PairDense, r"returned numpy\.bool"),
        (True, _NoPairDense, r"_NoPairDense has no _nnrt_forward_pair or _nnrt_backward_pair"),
    ],
)
def test_a_fusion_hook_returning_garbage_is_refused(
    fusion_plugin: Any, answer: Any, first: type, message: str
) -> None:
    plugin = fusion_plugin(answer)
    net = nnrt.Sequential([first(4, 3), nnrt.layer("sigmoid")])
    with pytest.raises(nnrt.PluginError, match=message) as info:
        net.forward(np.ones((2, 4)))
    assert plugin.name in str(info.value) and "nnrt_fuse_pair" in str(info.value)
