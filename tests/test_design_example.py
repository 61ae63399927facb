"""The network example of DESIGN.md runs exactly as printed.

The code block is kept verbatim as a string (so formatting tools cannot touch
it) and executed with ``X`` = random (batch, 784) and ``dY`` = ones.
"""

from __future__ import annotations

import numpy as np
from numpy.testing import assert_allclose
from scipy.special import expit

DESIGN_EXAMPLE = """\
import nnrt
net = nnrt.Sequential([
    nnrt.layer("dense_nobias", 784, 128),
    nnrt.layer("batchnorm", 128),
    nnrt.layer("sigmoid"),
    nnrt.layer("dense", 128, 10),
], seed=0, dtype="float32")          # float32 default; float64 supported
Y  = net.forward(X, training=True)   # also net(X) == net.forward(X, training=False)
dX = net.backward(dY)
"""


def _run_example(batch: int, rng: np.random.Generator) -> dict:
    ns: dict = {"X": rng.random((batch, 784)), "dY": np.ones((batch, 10))}
    exec(compile(DESIGN_EXAMPLE, "DESIGN.md", "exec"), ns)
    return ns


def test_design_example_runs_as_printed(rng):
    ns = _run_example(32, rng)
    net, X, Y, dX = ns["net"], ns["X"], ns["Y"], ns["dX"]
    assert Y.shape == (32, 10) and Y.dtype == np.float32
    assert dX.shape == (32, 784) and dX.dtype == np.float32
    assert len(net) == 4
    assert sorted(net.state_dict()) == sorted(
        ["0.weight", "1.gamma", "1.beta", "1.running_mean", "1.running_var",
         "3.weight", "3.bias"]
    )  # fmt: skip

    # independent float64 reference from the network's own (float32) parameters
    p = {k: v.astype(np.float64) for k, v in net.params().items()}
    X32 = X.astype(np.float32).astype(np.float64)
    h = X32 @ p["0.weight"]
    mu, var = h.mean(0), h.var(0)
    xhat = (h - mu) / np.sqrt(var + 1e-5)
    s = expit(p["1.gamma"] * xhat + p["1.beta"])
    Y_ref = s @ p["3.weight"] + p["3.bias"]
    assert_allclose(Y, Y_ref, rtol=1e-4, atol=1e-4)
    # running stats after one step from (0, 1) with momentum 0.1, unbiased variance
    rv_ref = 0.9 + 0.1 * var * 32 / 31
    assert_allclose(net.buffers()["1.running_mean"], 0.1 * mu, rtol=1e-4, atol=1e-5)
    assert_allclose(net.buffers()["1.running_var"], rv_ref, rtol=1e-4, atol=1e-6)
    # dY = ones: the output layer's bias gradient is the batch size
    assert_allclose(net.grads()["3.bias"], np.full(10, 32.0))
    assert_allclose(net.grads()["3.weight"], s.T @ np.ones((32, 10)), rtol=1e-4, atol=1e-4)

    # the comment's claim: net(X) == net.forward(X, training=False)
    a = net(X).copy()
    b = net.forward(X, training=False).copy()
    np.testing.assert_array_equal(a, b)


def test_design_example_is_deterministic():
    first = _run_example(8, np.random.default_rng(1))
    second = _run_example(8, np.random.default_rng(1))
    for key, value in first["net"].state_dict().items():
        np.testing.assert_array_equal(value, second["net"].state_dict()[key], err_msg=key)
    np.testing.assert_array_equal(first["Y"], second["Y"])
    np.testing.assert_array_equal(first["dX"], second["dX"])
