"""nnrt.set_num_threads / get_num_threads, nnrt.profile, and backward(input_grad=False)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import nnrt


def _net(dtype: Any = "float64", first: str = "dense_nobias") -> nnrt.Sequential:
    # dense (with bias) -> batchnorm is deliberate here: the bias gradient must still be
    # right; the network check's warning about it is expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnrt.BiasBeforeBatchNormWarning)
        return _build(dtype, first)


def _build(dtype: Any, first: str) -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer(first, 12, 16),
            nnrt.layer("batchnorm", 16),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 16, 5),
        ],
        seed=3,
        dtype=dtype,
    )


# ------------------------------------------------------------------ threads
def test_set_num_threads_round_trip_through_threadpoolctl() -> None:
    before = nnrt.get_num_threads()
    try:
        for n in (1, 2, 1):
            nnrt.set_num_threads(n)
            assert nnrt.get_num_threads() == n
            blas = [d for d in threadpool_info() if d["user_api"] == "blas"]
            assert len(blas) >= 1
            # every loaded BLAS copy (numpy's and scipy's OpenBLAS) follows
            assert all(d["num_threads"] == n for d in blas), blas
    finally:
        nnrt.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, "auto"])
def test_set_num_threads_rejects_bad_values(bad: Any) -> None:
    with pytest.raises(ValueError, match="positive int"):
        nnrt.set_num_threads(bad)


# --------------------------------------------------------- input_grad=False
@pytest.mark.parametrize("first", ["dense", "dense_nobias"])
def test_backward_without_input_grad_gives_the_same_parameter_gradients(first: str) -> None:
    rng = np.random.default_rng(0)
    net = _net(first=first)
    X = rng.standard_normal((9, 12))
    dY = rng.standard_normal((9, 5))
    net.forward(X, training=True)
    dX = net.backward(dY)
    assert dX is not None and dX.shape == (9, 12)
    full = {k: v.copy() for k, v in net.grads().items()}
    net.zero_grad()
    assert net.backward(dY, input_grad=False) is None
    for k, g in net.grads().items():
        np.testing.assert_array_equal(g, full[k], err_msg=k)


def test_backward_without_input_grad_skips_layers_before_the_first_trainable() -> None:
    calls: list[str] = []

    class Spy(nnrt.Layer):
        def __init__(self) -> None:
            super().__init__()

        def forward(self, X: Any, training: bool = False) -> Any:
            return X

        def backward(self, dY: Any) -> Any:
            calls.append("backward")
            return dY

    rng = np.random.default_rng(1)
    net = nnrt.Sequential([Spy(), nnrt.layer("dense", 4, 3)], dtype="float64")
    X = rng.standard_normal((6, 4))
    dY = rng.standard_normal((6, 3))
    net.forward(X, training=True)
    assert net.backward(dY, input_grad=False) is None
    assert calls == []
    # dW = X.T @ dY and db = dY.sum(0), from the formulas
    np.testing.assert_allclose(net.grads()["1.weight"], X.T @ dY, rtol=1e-12)
    np.testing.assert_allclose(net.grads()["1.bias"], dY.sum(0), rtol=1e-12)
    dX = net.backward(dY)
    assert calls == ["backward"]
    np.testing.assert_allclose(dX, dY @ net[1].params()["weight"].T, rtol=1e-12)


def test_input_grad_false_matches_torch_parameter_gradients(torch: Any) -> None:
    rng = np.random.default_rng(2)
    net = _net()
    X = rng.standard_normal((8, 12))
    y = rng.integers(0, 5, size=8)
    state = net.state_dict()
    out = net.forward(X, training=True)
    loss, dY = nnrt.losses.softmax_cross_entropy(out, y)
    net.backward(dY, input_grad=False)
    lin0 = torch.nn.Linear(12, 16, bias=False).double()
    bn = torch.nn.BatchNorm1d(16).double()
    lin1 = torch.nn.Linear(16, 5).double()
    with torch.no_grad():
        lin0.weight.copy_(torch.from_numpy(state["0.weight"].T.copy()))
        lin1.weight.copy_(torch.from_numpy(state["3.weight"].T.copy()))
        lin1.bias.copy_(torch.from_numpy(state["3.bias"]))
    model = torch.nn.Sequential(lin0, bn, torch.nn.Sigmoid(), lin1)
    tl = torch.nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y))
    tl.backward()
    assert loss == pytest.approx(float(tl.detach()), rel=1e-12)
    g = net.grads()
    np.testing.assert_allclose(g["0.weight"], lin0.weight.grad.numpy().T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g["1.gamma"], bn.weight.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g["1.beta"], bn.bias.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g["3.weight"], lin1.weight.grad.numpy().T, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(g["3.bias"], lin1.bias.grad.numpy(), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ profile
def test_profile_training_step_structure_and_sums() -> None:
    rng = np.random.default_rng(4)
    net = _net("float32")
    X = rng.standard_normal((64, 12)).astype(np.float32)
    y = rng.integers(0, 5, size=64)
    before = net.state_dict()
    prof = nnrt.profile(net, X, y, repeat=15)
    assert prof.training and prof.batch == 64
    assert [r.index for r in prof.layers] == [0, 1, 2, 3]
    assert [r.name for r in prof.layers] == ["DenseNoBias", "BatchNorm", "Sigmoid", "Dense"]
    for r in prof.layers:
        assert r.forward > 0 and r.backward > 0
        assert 0 <= r.forward_dispatch <= r.forward
        assert 0 <= r.backward_dispatch <= r.backward
        assert r.forward_kernel + r.forward_dispatch == pytest.approx(r.forward)
        assert r.backward_kernel + r.backward_dispatch == pytest.approx(r.backward)
        assert r.total == pytest.approx(r.forward + r.backward + r.update)
    # layers with parameters get an update time; the sigmoid has none
    assert prof.layers[0].update > 0 and prof.layers[3].update > 0
    assert prof.layers[2].update == 0
    assert prof.loss > 0
    # parts measured one at a time add up to roughly the measured step
    assert prof.layer_sum == pytest.approx(sum(r.total for r in prof.layers) + prof.loss)
    assert 0.25 < prof.layer_sum / prof.total < 4.0, (prof.layer_sum, prof.total)
    # nothing changed in the network
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    text = str(prof)
    assert "DenseNoBias" in text and "measured step" in text
    d = prof.to_dict()
    assert d["batch"] == 64 and len(d["layers"]) == 4
    assert set(d["layers"][0]) >= {"forward", "backward", "update", "forward_kernel"}


def test_profile_inference_has_no_backward_or_update() -> None:
    rng = np.random.default_rng(5)
    net = _net("float32")
    X = rng.standard_normal((32, 12)).astype(np.float32)
    prof = nnrt.profile(net, X, repeat=10)
    assert not prof.training and prof.loss == 0
    assert all(r.backward == 0 and r.update == 0 and r.forward > 0 for r in prof.layers)
    assert 0.25 < prof.layer_sum / prof.total < 4.0


def test_profile_with_a_given_optimizer_attributes_its_update() -> None:
    rng = np.random.default_rng(6)
    net = _net("float64")
    X = rng.standard_normal((16, 12))
    y = rng.integers(0, 5, size=16)
    opt = nnrt.optim.Adam(net, lr=1e-3)
    prof = nnrt.profile(net, X, y, optimizer=opt, repeat=5)
    updates = [r.update for r in prof.layers]
    assert updates[2] == 0 and updates[0] > 0 and updates[3] > 0


def test_profile_rejects_bad_repeat() -> None:
    net = _net()
    with pytest.raises(ValueError, match="repeat"):
        nnrt.profile(net, np.zeros((4, 12)), repeat=0)
