"""Built-in layers (dense, dense_nobias, sigmoid, batchnorm) against independent references.

References: float64 numpy formulas written here, finite differences, and
torch (skipped when not installed). Nothing is compared against nnrt itself.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import expit

import nnrt

DENSE_SHAPES = [  # (batch, in_features, out_features)
    (1, 1, 1),
    (1, 5, 3),
    (7, 1, 4),
    (6, 4, 1),
    (32, 17, 9),
    (3, 64, 130),
]


def _f64(a: np.ndarray) -> np.ndarray:
    return np.array(a, dtype=np.float64, copy=True)


def _dense(dtype: np.dtype, n_in: int, n_out: int, bias: bool = True) -> nnrt.Layer:
    layer = nnrt.layer("dense" if bias else "dense_nobias", n_in, n_out)
    layer.to_dtype(dtype)
    return layer


# ====================================================================== dense
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_forward_backward_matches_numpy(shape, dtype, rng, tol):
    batch, n_in, n_out = shape
    layer = _dense(dtype, n_in, n_out)
    W = _f64(layer.params()["weight"])
    b = _f64(layer.params()["bias"])
    assert W.shape == (n_in, n_out) and b.shape == (n_out,)
    X = rng.standard_normal((batch, n_in)).astype(dtype)
    dY = rng.standard_normal((batch, n_out)).astype(dtype)

    Y = layer.forward(X, training=True)
    assert Y.dtype == dtype and Y.shape == (batch, n_out)
    assert_allclose(Y, _f64(X) @ W + b, **tol(dtype))

    dX = layer.backward(dY)
    assert dX.dtype == dtype and dX.shape == (batch, n_in)
    g = layer.grads()
    assert g["weight"].dtype == dtype and g["bias"].dtype == dtype
    assert_allclose(g["weight"], _f64(X).T @ _f64(dY), **tol(dtype))
    assert_allclose(g["bias"], _f64(dY).sum(axis=0), **tol(dtype))
    assert_allclose(dX, _f64(dY) @ W.T, **tol(dtype))


def test_dense_bias_gradient_is_summed_over_the_batch_not_averaged(dtype):
    layer = _dense(dtype, 3, 2)
    X = np.ones((8, 3), dtype=dtype)
    layer.forward(X, training=True)
    layer.backward(np.ones((8, 2), dtype=dtype))
    assert_array_equal(layer.grads()["bias"], np.full(2, 8.0))
    assert_array_equal(layer.grads()["weight"], np.full((3, 2), 8.0))


def test_dense_default_init_is_uniform_with_torch_bound():
    n_in, n_out = 50, 80
    layer = nnrt.layer("dense", n_in, n_out)
    bound = 1.0 / np.sqrt(n_in)
    W, b = layer.params()["weight"], layer.params()["bias"]
    assert W.dtype == np.float64 and b.dtype == np.float64  # a standalone layer is float64
    assert np.all(np.abs(W) <= bound) and np.all(np.abs(b) <= bound)
    # uniform on [-bound, bound]: fills the interval, mean 0, std bound/sqrt(3)
    assert W.max() > 0.97 * bound and W.min() < -0.97 * bound
    assert abs(W.mean()) < 0.05 * bound
    assert W.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
    assert len(np.unique(W)) == W.size
    assert np.any(b != 0)


def test_dense_init_is_seeded_and_deterministic():
    a, b = nnrt.layer("dense", 6, 4), nnrt.layer("dense", 6, 4)
    for k in ("weight", "bias"):
        assert_array_equal(a.params()[k], b.params()[k])
    a.reset_parameters(np.random.default_rng(7))
    b.reset_parameters(np.random.default_rng(7))
    for k in ("weight", "bias"):
        assert_array_equal(a.params()[k], b.params()[k])
    before = a.params()["weight"].copy()
    a.reset_parameters(np.random.default_rng(8))
    assert not np.array_equal(a.params()["weight"], before)
    bound = 1 / np.sqrt(6)
    assert np.all(np.abs(a.params()["weight"]) <= bound)


@pytest.mark.parametrize("kind", ["dense", "dense_nobias"])
def test_dense_backward_overwrites_gradients(kind, dtype, rng, tol):
    layer = _dense(dtype, 5, 3, bias=kind == "dense")
    X1 = rng.standard_normal((4, 5)).astype(dtype)
    X2 = rng.standard_normal((4, 5)).astype(dtype)
    dY1 = rng.standard_normal((4, 3)).astype(dtype)
    dY2 = rng.standard_normal((4, 3)).astype(dtype)
    layer.forward(X1, training=True)
    layer.backward(dY1)
    layer.backward(dY2)  # same cached input, new dY: gradient of dY2 alone
    assert_allclose(layer.grads()["weight"], _f64(X1).T @ _f64(dY2), **tol(dtype))
    layer.forward(X2, training=True)
    layer.backward(dY1)
    assert_allclose(layer.grads()["weight"], _f64(X2).T @ _f64(dY1), **tol(dtype))
    if kind == "dense":
        assert_allclose(layer.grads()["bias"], _f64(dY1).sum(0), **tol(dtype))


@pytest.mark.parametrize(
    "name,args,out",
    [("dense", (3, 2), 2), ("dense_nobias", (3, 2), 2), ("sigmoid", (), 3), ("batchnorm", (3,), 3)],
)
def test_backward_before_training_forward_raises(name, args, out):
    layer = nnrt.layer(name, *args)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones((2, out)))
    # an eval forward caches nothing for backward
    layer.forward(np.ones((2, 3)), training=False)
    with pytest.raises(RuntimeError, match="forward"):
        layer.backward(np.ones((2, out)))


def test_dense_eval_forward_between_training_forward_and_backward(dtype, rng, tol):
    layer = _dense(dtype, 4, 3)
    W = _f64(layer.params()["weight"])
    X = rng.standard_normal((5, 4)).astype(dtype)
    X_other = rng.standard_normal((9, 4)).astype(dtype)
    dY = rng.standard_normal((5, 3)).astype(dtype)
    layer.forward(X, training=True)
    layer.forward(X_other, training=False)  # another batch size, eval mode
    dX = layer.backward(dY)
    assert dX.shape == (5, 4)
    assert_allclose(layer.grads()["weight"], _f64(X).T @ _f64(dY), **tol(dtype))
    assert_allclose(layer.grads()["bias"], _f64(dY).sum(0), **tol(dtype))
    assert_allclose(dX, _f64(dY) @ W.T, **tol(dtype))


def test_dense_matches_torch_linear(torch, rng):
    layer = nnrt.layer("dense", 7, 5)
    W, b = layer.params()["weight"], layer.params()["bias"]
    lin = torch.nn.Linear(7, 5, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W.T.copy()))
        lin.bias.copy_(torch.from_numpy(b.copy()))
    X = rng.standard_normal((6, 7))
    dY = rng.standard_normal((6, 5))
    Xt = torch.from_numpy(X.copy()).requires_grad_(True)
    Yt = lin(Xt)
    Yt.backward(torch.from_numpy(dY))
    assert_allclose(layer.forward(X, training=True), Yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    dX = layer.backward(dY)
    assert_allclose(dX, Xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    assert_allclose(layer.grads()["weight"], lin.weight.grad.numpy().T, rtol=1e-12, atol=1e-12)
    assert_allclose(layer.grads()["bias"], lin.bias.grad.numpy(), rtol=1e-12, atol=1e-12)


# =============================================================== dense_nobias
@pytest.mark.parametrize("shape", DENSE_SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
def test_dense_nobias_forward_backward(shape, dtype, rng, tol):
    batch, n_in, n_out = shape
    layer = _dense(dtype, n_in, n_out, bias=False)
    assert set(layer.params()) == {"weight"} and set(layer.grads()) == {"weight"}
    assert layer.buffers() == {}
    assert layer.config() == {"in_features": n_in, "out_features": n_out}
    W = _f64(layer.params()["weight"])
    assert W.shape == (n_in, n_out)
    assert np.all(np.abs(W) <= 1 / np.sqrt(n_in))
    X = rng.standard_normal((batch, n_in)).astype(dtype)
    dY = rng.standard_normal((batch, n_out)).astype(dtype)
    Y = layer.forward(X, training=True)
    assert Y.dtype == dtype
    assert_allclose(Y, _f64(X) @ W, **tol(dtype))
    dX = layer.backward(dY)
    assert_allclose(layer.grads()["weight"], _f64(X).T @ _f64(dY), **tol(dtype))
    assert_allclose(dX, _f64(dY) @ W.T, **tol(dtype))


# ==================================================================== sigmoid
EXTREME_F64 = [
    0.0,
    1e-300,
    -1e-300,
    0.5,
    -0.5,
    20.0,
    -20.0,
    40.0,
    -40.0,
    709.0,
    -709.0,
    710.0,
    -710.0,
    745.0,
    -745.0,
    1e4,
    -1e4,
    1e308,
    -1e308,
    np.finfo(np.float64).max,
    -np.finfo(np.float64).max,
]
EXTREME_F32 = [
    0.0,
    1.0,
    -1.0,
    15.0,
    -15.0,
    88.0,
    -88.0,
    89.0,
    -89.0,
    100.0,
    -100.0,
    104.0,
    -104.0,
    1e30,
    -1e30,
    np.finfo(np.float32).max,
    -np.finfo(np.float32).max,
]


@pytest.mark.parametrize(
    "dt,values", [(np.float64, EXTREME_F64), (np.float32, EXTREME_F32)], ids=["f64", "f32"]
)
def test_sigmoid_is_stable_for_any_finite_input(dt, values):
    X = np.array([values, values[::-1]], dtype=dt)
    layer = nnrt.layer("sigmoid")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            S = layer.forward(X, training=True)
            dX = layer.backward(np.ones_like(X))
    assert S.dtype == dt and dX.dtype == dt
    assert np.all(np.isfinite(S)) and np.all(np.isfinite(dX))
    assert np.all((S >= 0) & (S <= 1))
    ref = expit(X.astype(np.float64))  # no overflow in scipy's expit
    tiny = float(np.finfo(dt).tiny)
    rtol = 1e-14 if dt == np.float64 else 1e-6
    assert_allclose(S, ref, rtol=rtol, atol=tiny)
    # large positive inputs saturate to exactly 1, large negative to exactly 0
    big = np.abs(X) >= (50 if dt == np.float64 else 20)
    assert_array_equal(S[big & (X > 0)], 1.0)
    assert np.all(S[big & (X < 0)] < 1e-20)


@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (33, 5)])
def test_sigmoid_forward_backward(shape, dtype, rng, tol):
    layer = nnrt.layer("sigmoid")
    assert layer.in_features is None and layer.out_features is None
    assert layer.params() == {} and layer.grads() == {} and layer.buffers() == {}
    X = (4 * rng.standard_normal(shape)).astype(dtype)
    dY = rng.standard_normal(shape).astype(dtype)
    S = layer.forward(X, training=True)
    assert S.dtype == dtype and S.shape == shape
    s = expit(_f64(X))
    assert_allclose(S, s, **tol(dtype))
    dX = layer.backward(dY)
    assert dX.dtype == dtype and dX.shape == shape
    assert_allclose(dX, _f64(dY) * s * (1 - s), **tol(dtype))


def test_sigmoid_backward_uses_cached_output():
    # For x = 40, s rounds to exactly 1.0 in float64, so dY*s*(1-s) from the
    # output is exactly 0 whereas exp(-x)/(1+exp(-x))^2 from the input is 4e-18.
    X = np.array([[40.0, -3.0, 2.0, 0.0]])
    layer = nnrt.layer("sigmoid")
    layer.forward(X, training=True)
    X_saved = X.copy()
    X[...] = 123.0  # the caller reuses its input array before backward
    layer.forward(np.full((3, 4), -7.0), training=False)  # an eval pass in between
    dY = np.array([[1.0, 2.0, -1.0, 3.0]])
    dX = layer.backward(dY)
    s = expit(X_saved)
    assert_allclose(dX, dY * s * (1 - s), rtol=1e-15, atol=0)
    assert dX[0, 0] == 0.0


def test_sigmoid_dtype_follows_input(rng):
    layer = nnrt.layer("sigmoid")
    for dt in (np.float32, np.float64, np.float32):
        X = rng.standard_normal((3, 2)).astype(dt)
        assert layer.forward(X, training=True).dtype == dt
        assert layer.backward(np.ones((3, 2), dtype=dt)).dtype == dt


def test_sigmoid_matches_torch(torch, rng):
    X = 10 * rng.standard_normal((5, 6))
    dY = rng.standard_normal((5, 6))
    Xt = torch.from_numpy(X.copy()).requires_grad_(True)
    Yt = torch.sigmoid(Xt)
    Yt.backward(torch.from_numpy(dY))
    layer = nnrt.layer("sigmoid")
    assert_allclose(layer.forward(X, training=True), Yt.detach().numpy(), rtol=1e-14, atol=0)
    assert_allclose(layer.backward(dY), Xt.grad.numpy(), rtol=1e-12, atol=1e-300)


# ================================================================== batchnorm
def bn_forward_ref(X, gamma, beta, rm, rv, momentum, eps, training):
    """float64 reference of torch.nn.BatchNorm1d: returns (Y, new_rm, new_rv, cache)."""
    X = _f64(X)
    gamma, beta, rm, rv = (_f64(a) for a in (gamma, beta, rm, rv))
    if training:
        n = X.shape[0]
        mu = X.mean(axis=0)
        var = ((X - mu) ** 2).mean(axis=0)  # biased
        xhat = (X - mu) / np.sqrt(var + eps)
        rm = (1 - momentum) * rm + momentum * mu
        rv = (1 - momentum) * rv + momentum * var * n / (n - 1)  # unbiased
        return gamma * xhat + beta, rm, rv, (X, mu, var)
    xhat = (X - rm) / np.sqrt(rv + eps)
    return gamma * xhat + beta, rm, rv, None


def bn_backward_ref(dY, gamma, eps, cache):
    """Staged chain rule through mean and variance (not the folded formula)."""
    X, mu, var = cache
    dY = _f64(dY)
    n = X.shape[0]
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (X - mu) * inv
    dbeta = dY.sum(0)
    dgamma = (dY * xhat).sum(0)
    dxhat = dY * _f64(gamma)
    dvar = (dxhat * (X - mu)).sum(0) * -0.5 * inv**3
    dmu = -(dxhat * inv).sum(0) + dvar * (-2.0 * (X - mu)).mean(0)
    dX = dxhat * inv + dvar * 2.0 * (X - mu) / n + dmu / n
    return dX, dgamma, dbeta


def _bn_state(layer):
    p, b = layer.params(), layer.buffers()
    return p["gamma"], p["beta"], b["running_mean"], b["running_var"]


def test_batchnorm_initial_state_and_config():
    layer = nnrt.layer("batchnorm", 5)
    assert layer.in_features == 5 and layer.out_features == 5
    assert set(layer.params()) == {"gamma", "beta"}
    assert set(layer.grads()) == {"gamma", "beta"}
    assert set(layer.buffers()) == {"running_mean", "running_var"}
    assert_array_equal(layer.params()["gamma"], np.ones(5))
    assert_array_equal(layer.params()["beta"], np.zeros(5))
    assert_array_equal(layer.buffers()["running_mean"], np.zeros(5))
    assert_array_equal(layer.buffers()["running_var"], np.ones(5))
    cfg = layer.config()
    assert cfg["num_features"] == 5
    assert cfg["momentum"] == pytest.approx(0.1) and cfg["eps"] == pytest.approx(1e-5)
    layer2 = nnrt.layer("batchnorm", 3, momentum=0.25, eps=1e-3)
    assert layer2.config()["momentum"] == 0.25 and layer2.config()["eps"] == 1e-3
    rebuilt = type(layer2)(**layer2.config())
    assert rebuilt.config() == layer2.config()


@pytest.mark.parametrize("momentum,eps", [(0.1, 1e-5), (0.3, 1e-2), (0.0, 1e-5), (1.0, 0.5)])
@pytest.mark.parametrize("batch", [2, 3, 16])
def test_batchnorm_matches_float64_reference(momentum, eps, batch, rng):
    f = 4
    layer = nnrt.layer("batchnorm", f, momentum=momentum, eps=eps)
    gamma, beta, _, _ = _bn_state(layer)
    gamma[...] = rng.uniform(0.5, 2.0, f)
    beta[...] = rng.standard_normal(f)
    rm, rv = np.zeros(f), np.ones(f)
    for step in range(3):
        X = rng.standard_normal((batch, f)) * rng.uniform(0.1, 5, f) + rng.uniform(-3, 3, f)
        dY = rng.standard_normal((batch, f))
        Y_ref, rm, rv, cache = bn_forward_ref(X, gamma, beta, rm, rv, momentum, eps, True)
        Y = layer.forward(X, training=True)
        assert_allclose(Y, Y_ref, rtol=0, atol=1e-10, err_msg=f"train Y, step {step}")
        assert_allclose(layer.buffers()["running_mean"], rm, rtol=0, atol=1e-10)
        assert_allclose(layer.buffers()["running_var"], rv, rtol=0, atol=1e-10)
        dX_ref, dg_ref, db_ref = bn_backward_ref(dY, gamma, eps, cache)
        dX = layer.backward(dY)
        assert_allclose(dX, dX_ref, rtol=0, atol=1e-10, err_msg=f"dX, step {step}")
        assert_allclose(layer.grads()["gamma"], dg_ref, rtol=0, atol=1e-10)
        assert_allclose(layer.grads()["beta"], db_ref, rtol=0, atol=1e-10)
        # eval uses the running statistics and leaves them alone
        Xe = rng.standard_normal((5, f)) + 1.0
        Ye_ref, _, _, _ = bn_forward_ref(Xe, gamma, beta, rm, rv, momentum, eps, False)
        assert_allclose(layer.forward(Xe, training=False), Ye_ref, rtol=0, atol=1e-10)
        assert_allclose(layer.buffers()["running_mean"], rm, rtol=0, atol=1e-10)
        assert_allclose(layer.buffers()["running_var"], rv, rtol=0, atol=1e-10)
    if momentum == 0.0:
        assert_array_equal(layer.buffers()["running_mean"], np.zeros(f))
        assert_array_equal(layer.buffers()["running_var"], np.ones(f))


def test_batchnorm_matches_torch_batchnorm1d(torch, rng):
    f, momentum, eps = 6, 0.2, 1e-4
    layer = nnrt.layer("batchnorm", f, momentum=momentum, eps=eps)
    tbn = torch.nn.BatchNorm1d(f, momentum=momentum, eps=eps, dtype=torch.float64)
    gamma, beta, _, _ = _bn_state(layer)
    gamma[...] = rng.uniform(0.5, 2.0, f)
    beta[...] = rng.standard_normal(f)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(gamma.copy()))
        tbn.bias.copy_(torch.from_numpy(beta.copy()))
    for step, batch in enumerate([2, 9, 32, 5]):
        X = rng.standard_normal((batch, f)) * 3 + 2
        dY = rng.standard_normal((batch, f))
        tbn.train()
        tbn.zero_grad()
        Xt = torch.from_numpy(X.copy()).requires_grad_(True)
        Yt = tbn(Xt)
        Yt.backward(torch.from_numpy(dY))
        msg = f"step {step}"
        assert_allclose(
            layer.forward(X, training=True), Yt.detach().numpy(), atol=1e-10, err_msg=msg
        )
        assert_allclose(layer.buffers()["running_mean"], tbn.running_mean.numpy(), atol=1e-12)
        assert_allclose(layer.buffers()["running_var"], tbn.running_var.numpy(), atol=1e-12)
        assert_allclose(layer.backward(dY), Xt.grad.numpy(), atol=1e-10, err_msg=msg)
        assert_allclose(layer.grads()["gamma"], tbn.weight.grad.numpy(), atol=1e-10)
        assert_allclose(layer.grads()["beta"], tbn.bias.grad.numpy(), atol=1e-10)
        tbn.eval()
        Xe = rng.standard_normal((3, f))
        with torch.no_grad():
            Ye = tbn(torch.from_numpy(Xe)).numpy()
        assert_allclose(layer.forward(Xe, training=False), Ye, atol=1e-10, err_msg=msg)


def test_batchnorm_backward_matches_finite_differences(rng, fd_grad):
    n, f = 5, 3
    layer = nnrt.layer("batchnorm", f, momentum=0.1, eps=1e-3)
    gamma, beta, _, _ = _bn_state(layer)
    gamma[...] = rng.uniform(0.5, 2.0, f)
    beta[...] = rng.standard_normal(f)
    X = rng.standard_normal((n, f)) * 2 + 1
    R = rng.standard_normal((n, f))

    def loss() -> float:
        return float(np.sum(layer.forward(X, training=True) * R))

    num_dX = fd_grad(loss, X, 1e-6)
    num_dg = fd_grad(loss, gamma, 1e-6)
    num_db = fd_grad(loss, beta, 1e-6)
    layer.forward(X, training=True)
    dX = layer.backward(R)
    assert_allclose(dX, num_dX, rtol=1e-6, atol=1e-8)
    assert_allclose(layer.grads()["gamma"], num_dg, rtol=1e-6, atol=1e-8)
    assert_allclose(layer.grads()["beta"], num_db, rtol=1e-6, atol=1e-8)
    # the full derivative: the batch statistics' dependence on X matters
    naive = R * gamma / np.sqrt(X.var(0) + 1e-3)
    assert np.max(np.abs(dX - naive)) > 1e-2


def test_batchnorm_batch_of_one(rng):
    layer = nnrt.layer("batchnorm", 4)
    X1 = rng.standard_normal((1, 4))
    with pytest.raises(ValueError, match="BatchNorm") as exc:
        layer.forward(X1, training=True)
    assert "(1, 4)" in str(exc.value)
    # nothing changed by the failed call
    assert_array_equal(layer.buffers()["running_mean"], np.zeros(4))
    assert_array_equal(layer.buffers()["running_var"], np.ones(4))
    layer.forward(rng.standard_normal((8, 4)) + 3, training=True)
    g, b, rm, rv = (a.copy() for a in _bn_state(layer))
    Y = layer.forward(X1, training=False)
    ref, _, _, _ = bn_forward_ref(X1, g, b, rm, rv, 0.1, 1e-5, False)
    assert Y.shape == (1, 4)
    assert_allclose(Y, ref, rtol=0, atol=1e-10)


def test_batchnorm_float32_statistics_are_accurate(rng):
    n, f = 256, 8
    X = (1000.0 + 0.1 * rng.standard_normal((n, f))).astype(np.float32)
    layer = nnrt.layer("batchnorm", f)
    layer.to_dtype(np.float32)
    Y = layer.forward(X, training=True)
    assert Y.dtype == np.float32
    ref, rm, rv, _ = bn_forward_ref(
        X, np.ones(f), np.zeros(f), np.zeros(f), np.ones(f), 0.1, 1e-5, True
    )
    err = np.max(np.abs(Y.astype(np.float64) - ref))
    assert err < 1e-3, err
    assert_allclose(layer.buffers()["running_mean"], rm, rtol=1e-6)
    assert_allclose(layer.buffers()["running_var"], rv, rtol=1e-4)
    # the check discriminates: the one-pass float32 formula E[x^2] - E[x]^2 is far off
    X32 = X.astype(np.float32)
    mu32 = X32.mean(0, dtype=np.float32)
    var32 = (X32 * X32).mean(0, dtype=np.float32) - mu32 * mu32
    naive = (X32 - mu32) / np.sqrt(np.maximum(var32, 0) + np.float32(1e-5))
    assert np.max(np.abs(naive.astype(np.float64) - ref)) > 1e-2
    # backward in float32 against the float64 reference too
    dY = rng.standard_normal((n, f)).astype(np.float32)
    dX = layer.backward(dY)
    _, _, _, cache = bn_forward_ref(
        X, np.ones(f), np.zeros(f), np.zeros(f), np.ones(f), 0.1, 1e-5, True
    )
    dX_ref, dg_ref, db_ref = bn_backward_ref(dY, np.ones(f), 1e-5, cache)
    scale = np.max(np.abs(dX_ref))
    assert np.max(np.abs(dX - dX_ref)) < 1e-3 * scale
    assert_allclose(layer.grads()["beta"], db_ref, rtol=1e-4, atol=1e-3)
    assert_allclose(layer.grads()["gamma"], dg_ref, rtol=1e-4, atol=1e-3)


# ======================================================= finite differences
@pytest.mark.parametrize("name,args", [("dense", (4, 3)), ("dense_nobias", (4, 3))])
def test_dense_gradients_match_finite_differences(name, args, rng, fd_grad):
    layer = nnrt.layer(name, *args)
    X = rng.standard_normal((5, 4))
    R = rng.standard_normal((5, 3))

    def loss() -> float:
        return float(np.sum(layer.forward(X, training=True) * R))

    num = {k: fd_grad(loss, p) for k, p in layer.params().items()}
    num_dX = fd_grad(loss, X)
    layer.forward(X, training=True)
    assert_allclose(layer.backward(R), num_dX, rtol=1e-6, atol=1e-8)
    for k, g in layer.grads().items():
        assert_allclose(g, num[k], rtol=1e-6, atol=1e-8, err_msg=k)


def test_sigmoid_gradient_matches_finite_differences(rng, fd_grad):
    layer = nnrt.layer("sigmoid")
    X = 3 * rng.standard_normal((4, 5))
    R = rng.standard_normal((4, 5))

    def loss() -> float:
        return float(np.sum(layer.forward(X, training=True) * R))

    num = fd_grad(loss, X)
    layer.forward(X, training=True)
    assert_allclose(layer.backward(R), num, rtol=1e-6, atol=1e-9)


# ===================================================== nnrt.testing kit
BUILTIN_FACTORIES = {
    "dense": lambda: nnrt.layer("dense", 5, 3),
    "dense_nobias": lambda: nnrt.layer("dense_nobias", 5, 3),
    "sigmoid": lambda: nnrt.layer("sigmoid"),
    "batchnorm": lambda: nnrt.layer("batchnorm", 5),
    "batchnorm_custom": lambda: nnrt.layer("batchnorm", 5, momentum=0.3, eps=1e-3),
}


@pytest.mark.parametrize("name", list(BUILTIN_FACTORIES))
def test_gradcheck_passes_for_builtin_layers(name, rng):
    from nnrt.testing import gradcheck

    layer = BUILTIN_FACTORIES[name]()
    X = rng.standard_normal((6, 5)) * 1.5 + 0.3
    assert gradcheck(layer, X) is True


@pytest.mark.parametrize("name", list(BUILTIN_FACTORIES))
def test_check_layer_passes_for_builtin_layers(name):
    from nnrt.testing import check_layer

    assert check_layer(BUILTIN_FACTORIES[name], 5) is True


class _WrongGradScale(nnrt.Layer):
    """y = 2x with a backward that forgets the factor 2: gradcheck must catch it."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features = None
        self.out_features = None

    def forward(self, X, training=False):
        return 2.0 * np.asarray(X, dtype=np.float64)

    def backward(self, dY):
        return np.array(dY, dtype=np.float64)


def test_gradcheck_rejects_a_wrong_gradient(rng):
    from nnrt.testing import gradcheck

    with pytest.raises(AssertionError):
        gradcheck(_WrongGradScale(), rng.standard_normal((3, 4)))
