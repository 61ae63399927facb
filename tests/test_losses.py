"""Losses against float64 references written here, finite differences and torch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nnrt
from nnrt.losses import bce_with_logits, mse, softmax_cross_entropy
from nnrt.registry import registry

DTYPES = [np.float32, np.float64]
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


# ----------------------------------------------------------- references (float64)
def ref_softmax_ce(x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    x = x.astype(np.float64)
    n = x.shape[0]
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    loss = float(np.mean(lse - x[np.arange(n), y]))
    p = np.exp(x - lse[:, None])
    onehot = np.zeros_like(p)
    onehot[np.arange(n), y] = 1.0
    return loss, (p - onehot) / n


def ref_mse(p: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    d = p.astype(np.float64) - t.astype(np.float64)
    return float(np.mean(d * d)), 2.0 * d / d.size


def ref_bce(x: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    x = x.astype(np.float64)
    t = t.astype(np.float64)
    # -t log(sigmoid(x)) - (1-t) log(1 - sigmoid(x)), with log sigmoid via logaddexp
    loss = float(np.mean(t * np.logaddexp(0.0, -x) + (1.0 - t) * np.logaddexp(0.0, x)))
    sig = np.exp(-np.logaddexp(0.0, -x))
    return loss, (sig - t) / x.size


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    x = x.astype(np.float64).copy()
    g = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        orig = x[idx]
        x[idx] = orig + eps
        fp = f(x)
        x[idx] = orig - eps
        fm = f(x)
        x[idx] = orig
        g[idx] = (fp - fm) / (2 * eps)
    return g


def make(shape, dtype, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def labels(n, c, seed=1):
    return np.random.default_rng(seed).integers(0, c, size=n)


def targets01(shape, seed=2):
    return np.random.default_rng(seed).random(shape)


CASES = {
    "softmax_cross_entropy": (softmax_cross_entropy, ref_softmax_ce, lambda s: labels(*s)),
    "mse": (mse, ref_mse, lambda s: make(s, np.float64, seed=5)),
    "bce_with_logits": (bce_with_logits, ref_bce, targets01),
}


# ------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (7, 5), (32, 10)])
def test_matches_reference(name, dtype, shape):
    fn, ref, target_of = CASES[name]
    x = make(shape, dtype)
    t = target_of(shape)
    if name != "softmax_cross_entropy":
        t = t.astype(dtype)
    x0, t0 = x.copy(), t.copy()
    loss, dY = fn(x, t)
    want_loss, want_dY = ref(x, t)
    assert isinstance(loss, float)
    assert dY.dtype == dtype and dY.shape == x.shape
    np.testing.assert_allclose(loss, want_loss, **TOL[dtype])
    np.testing.assert_allclose(dY, want_dY, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"])
    # inputs untouched
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(t, t0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_dY_is_gradient_of_loss(name):
    fn, _, target_of = CASES[name]
    shape = (4, 3)
    x = make(shape, np.float64, seed=3, scale=1.5)
    t = target_of(shape)
    _, dY = fn(x, t)
    num = numeric_grad(lambda z: fn(z, t)[0], x)
    np.testing.assert_allclose(dY, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_ce_stable_for_huge_logits(dtype):
    x = np.array([[1e4, 0.0, -1e4], [-5e3, -5e3, -5e3 + 1.0]], dtype=dtype)
    y = np.array([0, 1])
    loss, dY = softmax_cross_entropy(x, y)
    want_loss, want_dY = ref_softmax_ce(x, y)
    assert np.isfinite(loss) and np.all(np.isfinite(dY))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(dY, want_dY, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_stable_for_huge_logits(dtype):
    x = np.array([[800.0, -800.0, 40.0, -40.0]], dtype=dtype)
    t = np.array([[0.0, 1.0, 1.0, 0.0]])
    loss, dY = bce_with_logits(x, t)
    # l = (800 + 800 + log1p(e^-40) + log1p(e^-40)) / 4
    assert loss == pytest.approx((1600.0 + 2 * np.log1p(np.exp(-40.0))) / 4, rel=1e-7)
    # sigmoid(40) - 1 = -4e-18 cancels to 0 in floating point (as in torch), but
    # sigmoid(-40) - 0 keeps its tiny value: no 1 - (1 - s) round trip
    np.testing.assert_allclose(dY[0, :3], [0.25, -0.25, 0.0], atol=1e-16)
    assert dY[0, 3] == pytest.approx(np.exp(-40.0) / 4, rel=1e-5)


def test_softmax_ce_perfect_and_uniform_predictions():
    # uniform logits: loss = log(C), dY = (1/C - onehot)/N
    loss, dY = softmax_cross_entropy(np.zeros((2, 4)), np.array([3, 0]))
    assert loss == pytest.approx(np.log(4.0), rel=1e-15)
    np.testing.assert_allclose(dY[0], [0.125, 0.125, 0.125, -0.375])
    np.testing.assert_allclose(dY.sum(axis=1), 0.0, atol=1e-16)


def test_int_inputs_are_computed_in_float64():
    loss, dY = mse(np.array([[1, 2], [3, 4]]), np.array([[0, 0], [0, 0]]))
    assert dY.dtype == np.float64
    assert loss == pytest.approx(30.0 / 4)
    np.testing.assert_allclose(dY, [[0.5, 1.0], [1.5, 2.0]])
    _, dY = softmax_cross_entropy(np.array([[1, 2]]), np.array([1], dtype=np.uint8))
    assert dY.dtype == np.float64


def test_target_cast_to_prediction_dtype():
    x = make((3, 2), np.float32)
    _, dY = bce_with_logits(x, targets01((3, 2)))  # float64 target
    assert dY.dtype == np.float32
    _, dY = mse(x, np.ones((3, 2), dtype=np.float64))
    assert dY.dtype == np.float32


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 300.0]),
)
def test_softmax_ce_property(n, c, seed, scale):
    x = make((n, c), np.float64, seed=seed, scale=scale)
    y = np.random.default_rng(seed).integers(0, c, size=n)
    loss, dY = softmax_cross_entropy(x, y)
    want_loss, want_dY = ref_softmax_ce(x, y)
    assert loss >= -1e-12
    np.testing.assert_allclose(loss, want_loss, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dY, want_dY, atol=1e-14)
    np.testing.assert_allclose(dY.sum(axis=1), 0.0, atol=1e-14)


# -------------------------------------------------------------------- torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch(name, dtype):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    torch_fn = {
        "softmax_cross_entropy": lambda a, b: F.cross_entropy(a, b),
        "mse": lambda a, b: F.mse_loss(a, b),
        "bce_with_logits": lambda a, b: F.binary_cross_entropy_with_logits(a, b),
    }[name]
    fn, _, target_of = CASES[name]
    shape = (16, 7)
    x = make(shape, dtype, seed=11)
    t = target_of(shape)
    if name == "softmax_cross_entropy":
        tt = torch.from_numpy(t.astype(np.int64))
    else:
        t = t.astype(dtype)
        tt = torch.from_numpy(t)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out = torch_fn(xt, tt)
    out.backward()
    loss, dY = fn(x, t)
    np.testing.assert_allclose(loss, out.item(), **TOL[dtype])
    np.testing.assert_allclose(dY, xt.grad.numpy(), **TOL[dtype])


# --------------------------------------------------------------- validation
def test_softmax_ce_label_validation():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"\[0, 4\).*\(3, 4\)"):
        softmax_cross_entropy(x, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match="-1"):
        softmax_cross_entropy(x, np.array([0, -1, 1]))
    with pytest.raises(TypeError, match="integer.*float64"):
        softmax_cross_entropy(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="integer"):
        softmax_cross_entropy(x, np.array([True, False, True]))
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(2,\)"):
        softmax_cross_entropy(x, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(3,\).*\(3, 1\)"):
        softmax_cross_entropy(x, np.array([[0], [1], [2]]))


def test_softmax_ce_logits_validation():
    with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
        softmax_cross_entropy(np.zeros(4), np.array([0]))
    with pytest.raises(ValueError, match=r"2-D.*\(1, 2, 2\)"):
        softmax_cross_entropy(np.zeros((1, 2, 2)), np.array([0]))
    with pytest.raises(ValueError, match="empty.*\\(0, 3\\)"):
        softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        softmax_cross_entropy(np.zeros((2, 0)), np.zeros(2, dtype=np.int64))
    with pytest.raises(TypeError, match="complex128"):
        softmax_cross_entropy(np.zeros((2, 2), dtype=complex), np.zeros(2, dtype=np.int64))


@pytest.mark.parametrize("fn", [mse, bce_with_logits])
def test_elementwise_validation(fn):
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        fn(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="broadcast"):
        fn(np.zeros((2, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="empty"):
        fn(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match="dimension"):
        fn(np.float64(1.0), np.float64(1.0))
    with pytest.raises(TypeError, match="complex"):
        fn(np.zeros((2, 3), dtype=complex), np.zeros((2, 3)))
    with pytest.raises(TypeError, match="target.*<U1"):
        fn(np.zeros((2, 3)), np.full((2, 3), "a"))


# ----------------------------------------------------------------- registry
def test_builtin_losses_are_registered_by_name():
    registered = nnrt.available_losses()  # other tests may have added plugin losses
    for name in ("bce_with_logits", "mse", "softmax_cross_entropy"):
        assert registered[name] == "nnrt"
    assert nnrt.loss("mse") is mse
    assert nnrt.loss("softmax_cross_entropy") is softmax_cross_entropy
    assert nnrt.loss("bce_with_logits") is bce_with_logits
    assert registry.resolve_loss("mse") is mse

    def custom(y, t):
        return 0.0, np.zeros_like(y)

    assert registry.resolve_loss(custom) is custom
    with pytest.raises(KeyError, match="unknown loss 'cross_entropy'.*bce_with_logits"):
        nnrt.loss("cross_entropy")
    with pytest.raises(TypeError, match="callable"):
        registry.resolve_loss(3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_ce_exp_over_the_whole_range(dtype):
    # the kernel's vectorised float64 exp against numpy's: every gap x - max from 0 down
    # past the normal range (-708), rows wider than the kernel's stack scratch, and
    # float32 logits computed in float64 (the loss to float64 accuracy)
    rng = np.random.default_rng(11)
    gaps = np.concatenate([-np.geomspace(1e-12, 800.0, 61), [0.0, -707.9, -708.1, -np.inf]])
    x = np.zeros((4, gaps.size))
    for i in range(4):
        x[i] = rng.permutation(gaps) + 5.0 * i
    wide = rng.normal(size=(3, 1500)) * 30.0  # c > 1024: a heap scratch
    for logits in (x, wide):
        logits = logits.astype(dtype)
        y = rng.integers(0, logits.shape[1], size=logits.shape[0])
        y[0] = int(np.argmax(logits[0]))  # a finite loss for every row
        y = np.where(np.isfinite(logits[np.arange(len(y)), y]), y, y[0] * 0)
        loss, dY = softmax_cross_entropy(logits, y)
        want_loss, want_dY = ref_softmax_ce(logits, y)
        assert loss == pytest.approx(want_loss, rel=1e-13)
        # the label's entry (p - 1) / n cancels: the absolute error of p stays, that of
        # a float64 sum of c terms (in row order here, pairwise in numpy)
        atol = 2e-16 * logits.shape[1] / len(y)
        if dtype == np.float64:
            np.testing.assert_allclose(dY, want_dY, rtol=1e-13, atol=atol)
        else:  # one rounding to float32 of the float64 value
            np.testing.assert_allclose(dY, want_dY, rtol=1.2e-7, atol=max(atol, 1e-44))
