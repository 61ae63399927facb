"""nnrt.Sequential: structure, state keys, seeding, dtype, and full passes vs numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import expit

import nnrt


def design_net(seed: int = 0, dtype: str = "float32", n_in: int = 20, hidden: int = 8):
    """The DESIGN.md architecture, narrower so the tests stay fast."""
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", n_in, hidden),
            nnrt.layer("batchnorm", hidden),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", hidden, 3),
        ],
        seed=seed,
        dtype=dtype,
    )


def mlp(seed: int = 0, dtype: str = "float64"):
    return nnrt.Sequential(
        [nnrt.layer("dense", 6, 5), nnrt.layer("sigmoid"), nnrt.layer("dense", 5, 2)],
        seed=seed,
        dtype=dtype,
    )


def f64(a: np.ndarray) -> np.ndarray:
    return np.array(a, dtype=np.float64, copy=True)


# ------------------------------------------------------------------ structure
def test_layers_are_kept_and_indexable():
    layers = [nnrt.layer("dense", 4, 3), nnrt.layer("sigmoid"), nnrt.layer("dense", 3, 2)]
    net = nnrt.Sequential(layers, seed=0)
    assert len(net) == 3
    assert list(net.layers) == layers
    for i, layer in enumerate(layers):
        assert net[i] is layer
        assert net.layers[i] is layer
    assert net[-1] is layers[-1]
    assert list(net) == layers
    assert net.in_features == 4 and net.out_features == 2


def test_state_keys_follow_the_design():
    net = design_net()
    params = {"0.weight", "1.gamma", "1.beta", "3.weight", "3.bias"}
    buffers = {"1.running_mean", "1.running_var"}
    assert set(net.params()) == params
    assert set(net.grads()) == params
    assert set(net.buffers()) == buffers
    assert set(net.state_dict()) == params | buffers
    for k, p in net.params().items():
        assert net.grads()[k].shape == p.shape, k
    assert net.params()["0.weight"].shape == (20, 8)
    assert net.params()["3.weight"].shape == (8, 3)
    assert net.params()["3.bias"].shape == (3,)
    assert net.buffers()["1.running_var"].shape == (8,)


def test_params_grads_buffers_are_live_arrays(rng):
    net = design_net(dtype="float64")
    assert net.params()["0.weight"] is net[0].params()["weight"]
    assert net.params()["3.bias"] is net[3].params()["bias"]
    assert net.buffers()["1.running_mean"] is net[1].buffers()["running_mean"]
    X = rng.standard_normal((4, 20))
    Y0 = net(X).copy()
    net.params()["3.bias"][...] += 1.0  # in place, as optimizers do
    assert_allclose(net(X), Y0 + 1.0, rtol=1e-12, atol=1e-12)
    net.forward(X, training=True)
    net.backward(np.ones((4, 3)))
    assert_array_equal(net.grads()["3.bias"], np.full(3, 4.0))
    assert net.grads()["3.bias"] is net[3].grads()["bias"]


def test_state_dict_returns_copies():
    net = design_net()
    sd = net.state_dict()
    for k, v in sd.items():
        live = net.params().get(k, net.buffers().get(k))
        assert not np.shares_memory(v, live), k
        assert_array_equal(v, live)
    before = net.params()["0.weight"].copy()
    sd["0.weight"][...] = 0
    sd["1.running_var"][...] = 7
    assert_array_equal(net.params()["0.weight"], before)
    assert_array_equal(net.buffers()["1.running_var"], np.ones(8))


def _train_a_bit(net, rng, steps: int = 2) -> None:
    for _ in range(steps):
        net.forward(rng.standard_normal((6, net.in_features)) + 0.5, training=True)
        net.backward(rng.standard_normal((6, net.out_features)))


def test_load_state_dict_round_trip(rng):
    a, b = design_net(seed=0), design_net(seed=1)
    _train_a_bit(a, rng)
    X = rng.standard_normal((5, 20))
    assert not np.allclose(a(X), b(X))
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert_array_equal(b.state_dict()[k], v, err_msg=k)
    assert_array_equal(b(X), a(X))
    # load_state_dict copies in: the live arrays stay the same objects
    live = b.params()["0.weight"]
    b.load_state_dict(design_net(seed=5).state_dict())
    assert b.params()["0.weight"] is live


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape", "shape_buffer"])
def test_load_state_dict_rejects_bad_dicts_and_leaves_net_untouched(problem, rng):
    net = design_net(seed=0)
    _train_a_bit(net, rng)
    before = net.state_dict()
    bad = design_net(seed=3).state_dict()  # different values for every key
    bad["1.running_mean"] += 1.0
    if problem == "missing":
        del bad["3.bias"]
        exc, needle = (KeyError, ValueError), "3.bias"
    elif problem == "unexpected":
        bad["4.weight"] = np.zeros((3, 3), dtype=np.float32)
        exc, needle = (KeyError, ValueError), "4.weight"
    elif problem == "shape":
        bad["3.bias"] = np.zeros(4, dtype=np.float32)
        exc, needle = ValueError, "3.bias"
    else:
        bad["1.running_var"] = np.ones((8, 1), dtype=np.float32)
        exc, needle = ValueError, "1.running_var"
    with pytest.raises(exc) as info:
        net.load_state_dict(bad)
    assert needle in str(info.value)
    after = net.state_dict()
    assert set(after) == set(before)
    for k in before:
        assert_array_equal(after[k], before[k], err_msg=k)


# ---------------------------------------------------------------- seed, dtype
def test_same_seed_same_weights_different_seed_different():
    a, b, c = mlp(seed=42), mlp(seed=42), mlp(seed=43)
    for k in a.params():
        assert_array_equal(a.params()[k], b.params()[k], err_msg=k)
    assert not np.array_equal(a.params()["0.weight"], c.params()["0.weight"])
    assert not np.array_equal(a.params()["2.weight"], c.params()["2.weight"])


def test_weights_depend_only_on_the_seed():
    layers = [nnrt.layer("dense", 6, 5), nnrt.layer("sigmoid"), nnrt.layer("dense", 5, 2)]
    for layer in (layers[0], layers[2]):
        for p in layer.params().values():
            p[...] = 0.0
    net = nnrt.Sequential(layers, seed=42, dtype="float64")
    ref = mlp(seed=42)
    for k in ref.params():
        assert_array_equal(net.params()[k], ref.params()[k], err_msg=k)
    # still uniform within the torch bound of each layer
    assert np.all(np.abs(net.params()["0.weight"]) <= 1 / np.sqrt(6))
    assert np.all(np.abs(net.params()["2.bias"]) <= 1 / np.sqrt(5))


def test_float32_and_float64_nets_share_initial_weights():
    n32, n64 = design_net(seed=7, dtype="float32"), design_net(seed=7, dtype="float64")
    for k, p64 in n64.state_dict().items():
        p32 = n32.state_dict()[k]
        assert p32.dtype == np.float32 and p64.dtype == np.float64
        assert_allclose(p32, p64, rtol=6e-8, atol=0, err_msg=k)


@pytest.mark.parametrize("dt", ["float32", "float64", np.float32, np.dtype("float64")])
def test_dtype_casts_params_grads_buffers_and_outputs(dt, rng):
    net = design_net(dtype=dt)
    want = np.dtype(dt)
    assert np.dtype(net.dtype) == want
    for group in (net.params(), net.grads(), net.buffers(), net.state_dict()):
        for k, v in group.items():
            assert v.dtype == want, k
    for X in (rng.standard_normal((4, 20)), rng.standard_normal((4, 20)).astype(np.float32)):
        Y = net.forward(X, training=True)
        assert Y.dtype == want
        assert net.backward(np.ones((4, 3))).dtype == want
        assert net(X).dtype == want
    for k, v in net.grads().items():
        assert v.dtype == want, k


def test_default_dtype_is_float32():
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)])
    assert net.params()["0.weight"].dtype == np.float32


@pytest.mark.parametrize("bad", ["int32", "float16", "complex128"])
def test_unsupported_network_dtype_is_rejected(bad):
    with pytest.raises((TypeError, ValueError)):
        nnrt.Sequential([nnrt.layer("dense", 3, 2)], dtype=bad)


# ------------------------------------------------------------------- compute
def test_call_is_eval_forward(rng):
    net = design_net(dtype="float64")
    _train_a_bit(net, rng, steps=3)
    X = rng.standard_normal((7, 20))
    buffers = {k: v.copy() for k, v in net.buffers().items()}
    a = net(X).copy()
    b = net.forward(X, training=False).copy()
    c = net.forward(X).copy()  # training defaults to False
    assert_array_equal(a, b)
    assert_array_equal(a, c)
    for k, v in net.buffers().items():
        assert_array_equal(v, buffers[k], err_msg=f"eval changed {k}")
    # and differs from a training pass (batch statistics instead of running ones)
    assert not np.allclose(net.forward(X, training=True), a)


def mlp_reference(X, dY, p):
    """dense -> sigmoid -> dense in float64, by hand."""
    h = X @ p["0.weight"] + p["0.bias"]
    s = expit(h)
    Y = s @ p["2.weight"] + p["2.bias"]
    grads = {"2.weight": s.T @ dY, "2.bias": dY.sum(0)}
    ds = dY @ p["2.weight"].T
    dh = ds * s * (1 - s)
    grads["0.weight"] = X.T @ dh
    grads["0.bias"] = dh.sum(0)
    return Y, dh @ p["0.weight"].T, grads


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_mlp_forward_backward_matches_numpy(batch, dtype, rng, tol):
    net = mlp(seed=11, dtype=dtype.name)
    p = {k: f64(v) for k, v in net.params().items()}
    X = rng.standard_normal((batch, 6)).astype(dtype)
    dY = rng.standard_normal((batch, 2)).astype(dtype)
    Y_ref, dX_ref, g_ref = mlp_reference(f64(X), f64(dY), p)
    assert_allclose(net.forward(X, training=True), Y_ref, **tol(dtype))
    assert_allclose(net.backward(dY), dX_ref, **tol(dtype))
    for k, g in net.grads().items():
        assert_allclose(g, g_ref[k], **tol(dtype), err_msg=k)
    assert_allclose(net(X), Y_ref, **tol(dtype))


def test_mixed_net_with_batchnorm_matches_numpy(dtype, rng):
    net = design_net(seed=3, dtype=dtype.name, n_in=10, hidden=6)
    rtol = atol = 1e-10 if dtype == np.float64 else 2e-4
    rm, rv = np.zeros(6), np.ones(6)
    for _step in range(3):
        p = {k: f64(v) for k, v in net.params().items()}
        X = (rng.standard_normal((9, 10)) + 0.5).astype(dtype)
        dY = rng.standard_normal((9, 3)).astype(dtype)
        X64, dY64 = f64(X), f64(dY)
        h = X64 @ p["0.weight"]
        mu, var = h.mean(0), h.var(0)
        inv = 1 / np.sqrt(var + 1e-5)
        xhat = (h - mu) * inv
        z = p["1.gamma"] * xhat + p["1.beta"]
        s = expit(z)
        Y_ref = s @ p["3.weight"] + p["3.bias"]
        rm = 0.9 * rm + 0.1 * mu
        rv = 0.9 * rv + 0.1 * var * 9 / 8
        # backward
        g = {"3.weight": s.T @ dY64, "3.bias": dY64.sum(0)}
        dz = (dY64 @ p["3.weight"].T) * s * (1 - s)
        g["1.beta"] = dz.sum(0)
        g["1.gamma"] = (dz * xhat).sum(0)
        dxhat = dz * p["1.gamma"]
        dh = inv * (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0))
        g["0.weight"] = X64.T @ dh
        dX_ref = dh @ p["0.weight"].T

        assert_allclose(net.forward(X, training=True), Y_ref, rtol=rtol, atol=atol)
        assert_allclose(net.buffers()["1.running_mean"], rm, rtol=rtol, atol=atol)
        assert_allclose(net.buffers()["1.running_var"], rv, rtol=rtol, atol=atol)
        assert_allclose(net.backward(dY), dX_ref, rtol=rtol, atol=atol)
        for k, gv in net.grads().items():
            assert_allclose(gv, g[k], rtol=rtol, atol=atol, err_msg=k)
        # eval with the running statistics
        Xe = rng.standard_normal((4, 10)).astype(dtype)
        ze = p["1.gamma"] * (f64(Xe) @ p["0.weight"] - rm) / np.sqrt(rv + 1e-5) + p["1.beta"]
        Ye_ref = expit(ze) @ p["3.weight"] + p["3.bias"]
        assert_allclose(net(Xe), Ye_ref, rtol=rtol, atol=atol)
        # a plain SGD step so the next iteration sees other parameters
        for k, pv in net.params().items():
            pv -= (0.1 * net.grads()[k]).astype(pv.dtype)


def test_mlp_matches_torch(torch, rng):
    net = mlp(seed=5, dtype="float64")
    p = net.params()
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5, dtype=torch.float64),
        torch.nn.Sigmoid(),
        torch.nn.Linear(5, 2, dtype=torch.float64),
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(p["0.weight"].T.copy()))
        model[0].bias.copy_(torch.from_numpy(p["0.bias"].copy()))
        model[2].weight.copy_(torch.from_numpy(p["2.weight"].T.copy()))
        model[2].bias.copy_(torch.from_numpy(p["2.bias"].copy()))
    X, dY = rng.standard_normal((4, 6)), rng.standard_normal((4, 2))
    Xt = torch.from_numpy(X.copy()).requires_grad_(True)
    model(Xt).backward(torch.from_numpy(dY))
    assert_allclose(net.forward(X, training=True), model(Xt).detach().numpy(), rtol=1e-12)
    assert_allclose(net.backward(dY), Xt.grad.numpy(), rtol=1e-10, atol=1e-14)
    assert_allclose(net.grads()["0.weight"], model[0].weight.grad.numpy().T, rtol=1e-10)
    assert_allclose(net.grads()["2.bias"], model[2].bias.grad.numpy(), rtol=1e-12)


def test_backward_overwrites_and_zero_grad(rng):
    net = design_net(dtype="float64")
    X = rng.standard_normal((5, 20))
    dY = rng.standard_normal((5, 3))
    net.forward(X, training=True)
    net.backward(dY)
    first = {k: v.copy() for k, v in net.grads().items()}
    net.backward(dY)
    for k, v in net.grads().items():
        assert_allclose(v, first[k], rtol=1e-12, atol=1e-14, err_msg=k)
    net.zero_grad()
    for k, v in net.grads().items():
        assert not np.any(v), k
    net.backward(dY)
    for k, v in net.grads().items():
        assert_allclose(v, first[k], rtol=1e-12, atol=1e-14, err_msg=k)


def test_eval_forward_between_training_forward_and_backward(rng):
    net = design_net(dtype="float64")
    X = rng.standard_normal((5, 20))
    dY = rng.standard_normal((5, 3))
    net.forward(X, training=True)
    dX_ref = net.backward(dY).copy()
    g_ref = {k: v.copy() for k, v in net.grads().items()}
    net.forward(X, training=True)  # note: updates running stats, not the batch ones
    net(rng.standard_normal((11, 20)))  # eval pass, other batch size
    assert_allclose(net.backward(dY), dX_ref, rtol=1e-12, atol=1e-14)
    for k, v in net.grads().items():
        assert_allclose(v, g_ref[k], rtol=1e-12, atol=1e-14, err_msg=k)


# --------------------------------------------- Python layer inside Sequential
class Scale(nnrt.Layer):
    """y = x * scale (per feature), written in plain Python."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.in_features = features
        self.out_features = features
        self.scale = np.linspace(0.5, 1.5, features)
        self.dscale = np.zeros(features)
        self._X = None

    def reset_parameters(self, rng: np.random.Generator) -> None:
        self.scale[...] = rng.uniform(0.5, 1.5, self.scale.shape)

    def forward(self, X, training=False):
        X = self.prepare_input(X)
        if training:
            self._X = X.copy()
        return X * self.scale

    def backward(self, dY):
        self.dscale[...] = (dY * self._X).sum(0)
        return dY * self.scale

    def params(self):
        return {"scale": self.scale}

    def grads(self):
        return {"scale": self.dscale}

    def config(self):
        return {"features": self.in_features}


def test_python_layer_in_sequential(dtype, rng, tol):
    net = nnrt.Sequential(
        [nnrt.layer("dense", 3, 4), Scale(4), nnrt.layer("dense", 4, 2)], seed=1, dtype=dtype
    )
    assert set(net.params()) == {"0.weight", "0.bias", "1.scale", "2.weight", "2.bias"}
    assert net.params()["1.scale"].dtype == dtype
    p = {k: f64(v) for k, v in net.params().items()}
    X = rng.standard_normal((5, 3)).astype(dtype)
    dY = rng.standard_normal((5, 2)).astype(dtype)
    h = f64(X) @ p["0.weight"] + p["0.bias"]
    u = h * p["1.scale"]
    Y_ref = u @ p["2.weight"] + p["2.bias"]
    du = f64(dY) @ p["2.weight"].T
    dh = du * p["1.scale"]
    assert_allclose(net.forward(X, training=True), Y_ref, **tol(dtype))
    assert_allclose(net.backward(dY), dh @ p["0.weight"].T, **tol(dtype))
    assert_allclose(net.grads()["1.scale"], (du * h).sum(0), **tol(dtype))
    assert_allclose(net.grads()["0.bias"], dh.sum(0), **tol(dtype))


# ------------------------------------------------------ construction errors
def test_width_mismatch_names_both_layers():
    with pytest.raises(ValueError) as info:
        nnrt.Sequential([nnrt.layer("dense", 4, 5), nnrt.layer("dense", 6, 3)])
    msg = str(info.value)
    assert "layer 0" in msg and "layer 1" in msg
    assert "5" in msg and "6" in msg
    with pytest.raises(ValueError) as info:
        nnrt.Sequential(
            [nnrt.layer("dense_nobias", 4, 5), nnrt.layer("sigmoid"), nnrt.layer("batchnorm", 7)]
        )
    msg = str(info.value)
    assert "layer 2" in msg and "BatchNorm" in msg and "5" in msg and "7" in msg


def test_width_passes_through_width_keeping_layers():
    net = nnrt.Sequential(
        [nnrt.layer("dense", 4, 5), nnrt.layer("sigmoid"), nnrt.layer("batchnorm", 5)]
    )
    assert net.out_features == 5


@pytest.mark.parametrize(
    "intruder",
    [object(), "dense", np.eye(3), lambda X: X, nnrt.Dense],
    ids=["object", "str", "ndarray", "function", "layer-class"],
)
def test_non_layer_in_list_raises_type_error(intruder):
    with pytest.raises(TypeError, match="layer 1"):
        nnrt.Sequential([nnrt.layer("dense", 3, 3), intruder, nnrt.layer("dense", 3, 2)])
