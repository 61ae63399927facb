"""nnrt.testing: gradcheck and check_layer pass on correct layers and catch broken ones."""

from __future__ import annotations

import numpy as np
import pytest

from nnrt.dense import Dense
from nnrt.layer import Layer
from nnrt.testing import check_layer, gradcheck


# ------------------------------------------------------------- test layers
class Scale(Layer):
    """Y = X * s (per feature); ds = sum_i dY_i * X_i, dX = dY * s."""

    def __init__(self, n):
        super().__init__()
        self.in_features = n
        self.out_features = n
        self.n = n
        self.s = np.linspace(0.5, 1.5, n)
        self.ds = np.zeros(n)
        self.dtype = "float64"
        self._X = None
        self._Y = None

    def forward(self, X, training=False):
        X = self.prepare_input(X)
        Y = X * self.s
        if training:
            self._X, self._Y = X, Y
        return Y

    def backward(self, dY):
        dY = self.prepare_grad(dY, self._Y)
        self.ds[...] = (dY * self._X).sum(axis=0)
        return dY * self.s

    def params(self):
        return {"s": self.s}

    def grads(self):
        return {"s": self.ds}

    def config(self):
        return {"n": self.n}


class Center(Layer):
    """Training: Y = X - mean(X) and running_mean updated; eval: Y = X - running_mean."""

    def __init__(self, num_features):
        super().__init__()
        self.in_features = num_features
        self.out_features = None
        self.running_mean = np.zeros(num_features)
        self._Y = None

    def forward(self, X, training=False):
        X = self.prepare_input(X)
        if training:
            mu = X.mean(axis=0)
            self.running_mean *= 0.9
            self.running_mean += 0.1 * mu
            self._Y = X - mu
            return self._Y
        return X - self.running_mean

    def backward(self, dY):
        dY = self.prepare_grad(dY, self._Y)
        # NOTE: the batch mean depends on every sample: dX = dY - mean(dY)
        return dY - dY.mean(axis=0)

    def buffers(self):
        return {"running_mean": self.running_mean}

    def config(self):
        return {"num_features": self.in_features}


class ForgetsFactorInDX(Scale):
    def backward(self, dY):
        super().backward(dY)
        return self.prepare_grad(dY, self._Y).copy()  # forgot "* s"


class WrongParamGrad(Scale):
    def backward(self, dY):
        dX = super().backward(dY)
        self.ds *= 2.0
        return dX


class AccumulatesGrads(Scale):
    def backward(self, dY):
        dY = self.prepare_grad(dY, self._Y)
        self.ds += (dY * self._X).sum(axis=0)
        return dY * self.s


class BadConfigKeys(Scale):
    def config(self):
        return {"size": self.n}


class NotJsonConfig(Scale):
    def config(self):
        return {"n": np.int64(self.n)}


class HiddenState(Scale):
    """Keeps a per-instance offset outside params()/buffers()."""

    _count = 0

    def __init__(self, n):
        super().__init__(n)
        HiddenState._count += 1
        self.offset = float(HiddenState._count)

    def forward(self, X, training=False):
        Y = super().forward(X, training)
        return Y + self.offset


class NoValidation(Scale):
    def forward(self, X, training=False):
        X = np.asarray(X, dtype=self.s.dtype)
        Y = X * self.s
        if training:
            self._X, self._Y = X, Y
        return Y


class AlwaysFloat64(Scale):
    def forward(self, X, training=False):
        return super().forward(X, training).astype(np.float64)


class WrongWidth(Scale):
    def forward(self, X, training=False):
        return super().forward(X, training)[:, :-1]


def rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ---------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradcheck_passes_on_dense(dtype):
    layer = Dense(4, 3).to_dtype(dtype)
    assert gradcheck(layer, rand((5, 4))) is True
    assert layer.dtype == np.float64  # a float32 layer is cast, as documented


def test_gradcheck_restores_params_and_input():
    layer = Dense(4, 3)
    before = {k: v.copy() for k, v in layer.params().items()}
    X = rand((5, 4))
    X0 = X.copy()
    gradcheck(layer, X)
    for k, v in layer.params().items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_array_equal(X, X0)


@pytest.mark.parametrize("layer", [Scale(4), Center(4)], ids=["scale", "center"])
def test_gradcheck_passes_on_python_layers(layer):
    assert gradcheck(layer, rand((6, 4))) is True


def test_gradcheck_restores_buffers():
    layer = Center(4)
    layer.running_mean[...] = [1.0, 2.0, 3.0, 4.0]
    gradcheck(layer, rand((6, 4)) + 10.0)
    np.testing.assert_array_equal(layer.running_mean, [1.0, 2.0, 3.0, 4.0])


def test_gradcheck_names_bad_dX_entry():
    with pytest.raises(AssertionError, match=r"dX\[\d+, \d+\] analytic .* vs numeric") as e:
        gradcheck(ForgetsFactorInDX(4), rand((3, 4)))
    assert "ForgetsFactorInDX" in str(e.value)


def test_gradcheck_names_bad_param_grad():
    with pytest.raises(AssertionError, match=r"grad of 's'\[\d\] analytic"):
        gradcheck(WrongParamGrad(4), rand((3, 4)))


def test_gradcheck_reports_worst_entry_values():
    # s = [1, 3]: dX forgets the factor s, so the worst entry is in column 1 and the
    # numeric value (R * s) is 3 times the analytic one (R)
    layer = ForgetsFactorInDX(2)
    layer.s[...] = [1.0, 3.0]
    with pytest.raises(AssertionError) as e:
        gradcheck(layer, rand((1, 2)))
    msg = str(e.value)
    assert "dX[0, 1]" in msg
    analytic = float(msg.split("analytic ")[1].split()[0])
    numeric = float(msg.split("numeric ")[1].split()[0])
    assert numeric == pytest.approx(3.0 * analytic, rel=1e-6)


def test_gradcheck_tolerances_are_used():
    # a gradient off by a relative 1e-3 passes with rtol 1e-2 and fails with 1e-5
    class SlightlyOff(Scale):
        def backward(self, dY):
            return super().backward(dY) * (1 + 1e-3)

    assert gradcheck(SlightlyOff(3), rand((2, 3)), rtol=1e-2)
    with pytest.raises(AssertionError, match="dX"):
        gradcheck(SlightlyOff(3), rand((2, 3)))


# -------------------------------------------------------------- check_layer
@pytest.mark.parametrize(
    ("factory", "in_features"),
    [
        (lambda: Dense(5, 3), 5),
        (lambda: Dense(1, 1), 1),
        (lambda: Scale(4), 4),
        (lambda: Center(3), 3),
    ],
    ids=["dense", "dense_1x1", "scale", "center"],
)
def test_check_layer_passes(factory, in_features):
    assert check_layer(factory, in_features) is True


def test_check_layer_passes_with_float32_factory():
    assert check_layer(lambda: Dense(3, 2).to_dtype("float32"), 3, batch=4) is True


@pytest.mark.parametrize(
    ("cls", "check", "detail"),
    [
        (ForgetsFactorInDX, "gradcheck", "dX"),
        (WrongParamGrad, "gradcheck", "grad of 's'"),
        (AccumulatesGrads, "backward", "accumulat"),
        (BadConfigKeys, "config round trip", "size"),
        (NotJsonConfig, "config round trip", "JSON"),
        (HiddenState, "state round trip", r"params\(\)/buffers\(\)"),
        (NoValidation, "bad inputs", "did not raise ValueError"),
        (AlwaysFloat64, "float32", "float32"),
        (WrongWidth, "forward shapes", r"shape \(8, 3\)"),
    ],
)
def test_check_layer_catches(cls, check, detail):
    with pytest.raises(AssertionError, match=rf"check_layer\({cls.__name__}\(.*\)\): {check}:"):
        check_layer(lambda: cls(4), 4)
    with pytest.raises(AssertionError, match=detail):
        check_layer(lambda: cls(4), 4)


def test_check_layer_wrong_in_features():
    with pytest.raises(AssertionError, match="in_features is 5.*in_features=4"):
        check_layer(lambda: Dense(5, 3), 4)


def test_check_layer_reports_exceptions_as_assertions():
    class NoBackward(Scale):
        def backward(self, dY):
            raise NotImplementedError("no backward here")

    with pytest.raises(AssertionError, match="backward: raised NotImplementedError"):
        check_layer(lambda: NoBackward(2), 2)
