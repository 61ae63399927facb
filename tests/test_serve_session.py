"""Frozen inference sessions (``nnrt.freeze``, nnrt/serve.py).

Checked against an independent float64 numpy forward written in this file (the
network's weights read at freeze time), for mutation of the network after
freezing, the input errors of ``net.forward``, threads, pickling and layers the
session cannot merge (a Python layer runs through its own eval forward).
"""

from __future__ import annotations

import pickle
import sys
import threading
import warnings
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.dense import _set_eval_kernel

EPS = 1e-5


def _layers(dtype: Any, n_in: int, width: int, n_out: int, seed: int) -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense", n_in, width),
            nnrt.layer("batchnorm", width),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense_nobias", width, width),
            nnrt.layer("batchnorm", width),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", width, n_out),
        ],
        seed=seed,
        dtype=dtype,
    )


def _net(
    dtype: Any, n_in: int = 12, width: int = 40, n_out: int = 3, seed: int = 2
) -> nnrt.Sequential:
    with warnings.catch_warnings():  # the first dense keeps its bias: the fold's b term
        warnings.simplefilter("ignore", nnrt.NetworkWarning)
        net = _layers(dtype, n_in, width, n_out, seed)
    rng = np.random.default_rng(seed + 7)
    for k in (1, 4):  # non-trivial statistics so every term of the fold counts
        p, buf = net[k].params(), net[k].buffers()
        p["gamma"][...] = rng.uniform(0.5, 1.5, size=width)
        p["beta"][...] = rng.normal(size=width)
        buf["running_mean"][...] = rng.normal(size=width)
        buf["running_var"][...] = rng.uniform(0.5, 2.0, size=width)
    return net


def _ref(state: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """Textbook float64 eval forward of the network of _net."""
    s = {k: v.astype(np.float64) for k, v in state.items()}
    h = X.astype(np.float64)

    def bn(h: np.ndarray, k: int) -> np.ndarray:
        xhat = (h - s[f"{k}.running_mean"]) / np.sqrt(s[f"{k}.running_var"] + EPS)
        return s[f"{k}.gamma"] * xhat + s[f"{k}.beta"]

    h = h @ s["0.weight"] + s["0.bias"]
    h = 1.0 / (1.0 + np.exp(-bn(h, 1)))
    h = h @ s["3.weight"]
    h = 1.0 / (1.0 + np.exp(-bn(h, 4)))
    return h @ s["6.weight"] + s["6.bias"]


@pytest.mark.parametrize("kernel", ["auto", "gemm", "small"])
@pytest.mark.parametrize("batch", [1, 3, 4, 16, 65])
def test_matches_float64_reference(batch: int, kernel: str) -> None:
    net = _net(np.float64)
    X = np.random.default_rng(batch).normal(size=(batch, 12))
    ref = _ref(net.state_dict(), X)
    sess = nnrt.freeze(net)
    np.testing.assert_allclose(sess(X), ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sess.predict(X), net.predict(X), rtol=1e-12, atol=1e-12)
    _set_eval_kernel(kernel)  # the session's choice is its own; the net's is forced
    try:
        np.testing.assert_allclose(net.predict(X), sess.predict(X), rtol=1e-12, atol=1e-12)
    finally:
        _set_eval_kernel("auto")


@pytest.mark.parametrize("batch", [1, 4, 64])
def test_float32_close(batch: int) -> None:
    net = _net(np.float32)
    X = np.random.default_rng(5).normal(size=(batch, 12)).astype(np.float32)
    ref = _ref(net.state_dict(), X)
    sess = nnrt.freeze(net)
    out = sess(X)
    assert out.dtype == np.float32 and out.shape == (batch, 3)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out, net.predict(X), rtol=2e-5, atol=2e-5)


def test_folds_and_fuses_the_chain() -> None:
    sess = nnrt.freeze(_net(np.float64))
    # dense + batchnorm + sigmoid three times -> 3 stages; the last dense alone
    assert len(sess.stages) == 3
    assert "folded" in sess.stages[0] and "fused" in sess.stages[0]


def test_unaffected_by_later_mutation() -> None:
    net = _net(np.float64)
    X = np.random.default_rng(1).normal(size=(5, 12))
    ref = _ref(net.state_dict(), X)
    sess = nnrt.freeze(net)
    # in-place writes, replaced arrays, training: none reach the session
    for p in net.params().values():
        p[...] = 0.0
    net[1].buffers()["running_var"][...] = 100.0
    net[1].buffers()["running_mean"][...] = -3.0
    net.fit(X, np.zeros(5, dtype=np.int64), epochs=1, batch_size=5, progress=False)
    assert not np.allclose(net.predict(X), ref)
    net[0].to_dtype(np.float32)  # the network now refuses to run (its layer was cast)
    with pytest.raises(TypeError, match="was cast after the network was built"):
        net.predict(X)
    np.testing.assert_allclose(sess(X), ref, rtol=1e-12, atol=1e-12)


def test_outputs_are_new_arrays() -> None:
    sess = nnrt.freeze(_net(np.float64))
    X = np.ones((2, 12))
    a = sess(X)
    b = sess(X * 2)
    assert a is not b and not np.shares_memory(a, b)
    a[...] = np.nan  # the caller owns the result
    np.testing.assert_array_equal(sess(X), sess(X))
    assert np.isfinite(sess(X)).all()


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((3, 11)),
        np.ones(12),
        np.ones((2, 3, 12)),
        np.ones((0, 12)),
        np.array([["a"] * 12]),
        [[1.0, 2.0], [3.0]],
    ],
)
def test_input_errors_as_forward(bad: Any) -> None:
    net = _net(np.float64)
    sess = nnrt.freeze(net)
    with pytest.raises((ValueError, TypeError)) as want:
        net.forward(bad)
    with pytest.raises(want.type) as got:
        sess(bad)
    assert str(got.value) == str(want.value)


def test_input_cast_and_layouts() -> None:
    net = _net(np.float64)
    sess = nnrt.freeze(net)
    X = np.random.default_rng(3).normal(size=(6, 24))
    for Xv in (
        X[:, ::2],
        X[:, :12].astype(np.float32),
        X[:, :12].tolist(),
        np.asfortranarray(X[:, :12]),
    ):
        np.testing.assert_allclose(
            sess(Xv), net.predict(np.asarray(Xv, dtype=np.float64)), rtol=1e-12, atol=1e-12
        )


def test_predict_batch_size() -> None:
    net = _net(np.float64)
    sess = nnrt.freeze(net)
    X = np.random.default_rng(4).normal(size=(10, 12))
    np.testing.assert_allclose(sess.predict(X, batch_size=3), sess(X), rtol=1e-14, atol=0)
    with pytest.raises(ValueError):
        sess.predict(X, batch_size=0)


def test_threads() -> None:
    net = _net(np.float64, width=64)
    sess = nnrt.freeze(net)
    rng = np.random.default_rng(9)
    inputs = [rng.normal(size=(int(rng.integers(1, 40)), 12)) for _ in range(8)]
    refs = [_ref(net.state_dict(), X) for X in inputs]
    errors: list[str] = []

    def work(k: int) -> None:
        for _ in range(30):
            out = sess(inputs[k])
            if not np.allclose(out, refs[k], rtol=1e-12, atol=1e-12):
                errors.append(f"thread {k}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_pickle_round_trip() -> None:
    net = _net(np.float32)
    sess = nnrt.freeze(net)
    X = np.random.default_rng(8).normal(size=(4, 12)).astype(np.float32)
    out = sess(X)
    for p in net.params().values():
        p[...] = 1.0
    again = pickle.loads(pickle.dumps(sess))
    assert isinstance(again, nnrt.InferenceSession)
    np.testing.assert_array_equal(again(X), out)


class Scale(nnrt.Layer):
    """A Python layer: y = 2 x (its own eval forward)."""

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        self._out = np.asarray(X, dtype=np.float64) * 2.0
        return self._out

    def backward(self, dY: Any) -> np.ndarray:
        return np.asarray(dY) * 2.0


def test_python_layer_runs_its_own_forward() -> None:
    net = _net(np.float64)
    layers = list(net.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnrt.NetworkWarning)
        net2 = nnrt.Sequential(layers[:3] + [Scale()] + layers[3:], seed=2, dtype=np.float64)
    net2.load_state_dict(
        {
            (f"{int(k.split('.')[0]) + (int(k.split('.')[0]) >= 3)}.{k.split('.', 1)[1]}"): v
            for k, v in net.state_dict().items()
        }
    )
    X = np.random.default_rng(6).normal(size=(7, 12))
    sess = nnrt.freeze(net2)
    assert any("own eval forward" in s for s in sess.stages)
    state = net.state_dict()
    s = {k: v for k, v in state.items()}
    # reference: the same network with the hidden activations doubled before layer 3
    h = X @ s["0.weight"] + s["0.bias"]
    h = (h - s["1.running_mean"]) / np.sqrt(s["1.running_var"] + EPS) * s["1.gamma"]
    h = 2.0 / (1.0 + np.exp(-(h + s["1.beta"])))
    h = h @ s["3.weight"]
    h = (h - s["4.running_mean"]) / np.sqrt(s["4.running_var"] + EPS) * s["4.gamma"]
    h = 1.0 / (1.0 + np.exp(-(h + s["4.beta"])))
    ref = h @ s["6.weight"] + s["6.bias"]
    np.testing.assert_allclose(sess(X), ref, rtol=1e-12, atol=1e-12)
    for p in net2.params().values():  # the session's copies of the layers are its own
        p[...] = 0.0
    net2[3].forward = None  # type: ignore[method-assign]
    np.testing.assert_allclose(sess(X), ref, rtol=1e-12, atol=1e-12)


def test_freeze_rejects_non_networks() -> None:
    with pytest.raises(TypeError, match="nnrt network"):
        nnrt.freeze(object())


def test_stage_arrays_are_private_and_read_only() -> None:
    from nnrt._serve import FrozenDense

    W = np.arange(6.0).reshape(2, 3)
    st = FrozenDense(W, np.ones(3), 0)
    W[...] = 0.0  # the stage copied W
    Wc, bc = st.arrays()
    np.testing.assert_array_equal(Wc, np.arange(6.0).reshape(2, 3))
    Wc[...] = 5.0  # copies: the stage is unchanged
    np.testing.assert_array_equal(st(np.ones((1, 2))), [[4.0, 6.0, 8.0]])
    with pytest.raises(AttributeError):
        st._W = np.zeros((2, 3))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="shape"):
        st(np.ones((1, 3)))


@pytest.fixture
def stage_kernel():
    from nnrt import _serve

    yield _serve._set_kernel
    _serve._set_kernel("auto")


@pytest.mark.parametrize("kernel", ["gemm", "small", "packed"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stage_kernels_against_reference(kernel: str, dtype: Any, stage_kernel: Any) -> None:
    from nnrt._serve import FrozenDense

    rng = np.random.default_rng(11)
    stage_kernel(kernel)
    # widths: one panel partly filled, several panels plus a remainder, vectors + scalars;
    # a last panel of every width of 1-6 vectors (float32: 16 columns, float64: 8), whole
    # or with a partly filled last vector
    widths = ((7, 40), (33, 200), (20, 96), (9, 8), (11, 64), (5, 80), (13, 128), (6, 176))
    for k, n in widths + ((3, 160), (4, 72), (30, 56), (2, 1), (8, 10)):
        W = rng.normal(size=(k, n))
        b = rng.normal(size=n)
        st = FrozenDense(W.astype(dtype), b.astype(dtype), 1)
        assert st.kernel == kernel
        for m in (1, 2, 3, 4, 5, 8, 9, 13, 17):
            X = rng.normal(size=(m, k)).astype(dtype)
            Wr, br = W.astype(dtype).astype(np.float64), b.astype(dtype).astype(np.float64)
            ref = 1.0 / (1.0 + np.exp(-(X.astype(np.float64) @ Wr + br)))
            tol = 1e-12 if dtype == np.float64 else 2e-6
            np.testing.assert_allclose(st(X), ref, rtol=tol, atol=tol)


@pytest.mark.skipif(not nnrt.dense.SMALL_M_ENABLED, reason="the small-M kernel is off here")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_and_small_give_the_same_bits(dtype: Any, stage_kernel: Any) -> None:
    from nnrt._serve import FrozenDense

    rng = np.random.default_rng(12)
    W = rng.normal(size=(50, 136)).astype(dtype)
    stage_kernel("packed")
    packed = FrozenDense(W, None, 0)
    stage_kernel("small")
    small = FrozenDense(W, None, 0)
    for m in (1, 2, 4, 7, 8, 9, 24):
        X = rng.normal(size=(m, 50)).astype(dtype)
        np.testing.assert_array_equal(packed(X), small(X))


@pytest.mark.skipif(not nnrt.dense.SMALL_M_ENABLED, reason="the small-M kernel is off here")
def test_a_row_gives_the_same_bits_in_any_batch() -> None:
    # the packed copy serves every batch; one row of a W of at most 512 KB (the second
    # layer) runs on the row-major W with the small-M kernel
    net = nnrt.Sequential(
        [nnrt.layer("dense", 256, 640), nnrt.layer("sigmoid"), nnrt.layer("dense", 640, 64)],
        seed=1,
        dtype=np.float32,
    )
    sess = nnrt.freeze(net)
    assert [st.kernel for st in sess._stages] == ["packed", "packed+small"]
    X = np.random.default_rng(2).normal(size=(21, 256)).astype(np.float32)
    whole = sess(X)
    for bs in (1, 2, 4, 5, 8, 16):
        np.testing.assert_array_equal(sess.predict(X, batch_size=bs), whole)
    ref = net.predict(X).astype(np.float64)
    np.testing.assert_allclose(whole, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_two_threads_give_the_same_bits(dtype: Any) -> None:
    # layers large enough that the packed kernel splits its panels over nnrt's helper
    # thread (the second layer's 200 columns are 3 panels: from 32 rows its rows are
    # split instead): every output is computed by the same code on either thread
    from nnrt import _parallel

    rng = np.random.default_rng(14)
    net = nnrt.Sequential(
        [nnrt.layer("dense", 300, 1040), nnrt.layer("sigmoid"), nnrt.layer("dense", 1040, 200)],
        seed=3,
        dtype=dtype,
    )
    sess = nnrt.freeze(net)
    state = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
    inputs = [rng.normal(size=(m, 300)).astype(dtype) for m in (1, 2, 5, 8, 13, 40, 67)]
    try:
        nnrt.set_num_threads(1)
        one = [sess(X) for X in inputs]
        nnrt.set_num_threads(2)
        jobs = _parallel.stats()["jobs"]
        two = [sess(X) for X in inputs]
        if any(st.kernel.startswith("packed") for st in sess._stages):
            assert _parallel.stats()["jobs"] > jobs  # the packed kernel's split did run
    finally:
        nnrt.set_num_threads(None)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for X, a, b in zip(inputs, one, two, strict=True):
        np.testing.assert_array_equal(a, b)
        h = 1.0 / (1.0 + np.exp(-(X.astype(np.float64) @ state["0.weight"] + state["0.bias"])))
        ref = h @ state["2.weight"] + state["2.bias"]
        np.testing.assert_allclose(b, ref, rtol=tol, atol=tol)
        # a row alone gives the same bits as in the batch
        np.testing.assert_array_equal(sess(X[-1:]), b[-1:])


def test_tampered_session_raises_instead_of_crashing() -> None:
    net = _net(np.float32)
    sess = nnrt.freeze(net)
    X = np.ones((3, 12), dtype=np.float32)
    # what Python can reach is never trusted by a kernel: a first layer of another width
    # lets the wrong input through, and the stage's own check stops it
    sess._first = nnrt.layer("dense", 5, 5)
    with pytest.raises(ValueError, match="expected input of shape"):
        sess(np.ones((3, 5)))
    sess._first = nnrt.freeze(net)._first
    stages = sess._stages
    sess._stages = (stages[1],) + stages  # stages out of order: widths checked per stage
    with pytest.raises(ValueError, match="expected input of shape"):
        sess(X)
    sess._stages = stages
    assert np.isfinite(sess(X)).all()


def test_packed_buffers_are_aligned() -> None:
    # the packed kernel's vector loads want 64-byte alignment; copies from 2 MB on sit on
    # 2 MB boundaries (whole huge pages), small ones on 64 bytes
    from nnrt._serve import _aligned_buffer

    for nbytes in (1, 1000, (1 << 21) - 8, 1 << 21, 5_000_000):
        buf = _aligned_buffer(nbytes)
        assert buf.nbytes == nbytes and buf.dtype == np.uint8
        assert buf.ctypes.data % 64 == 0
        if nbytes >= 1 << 21 and sys.platform.startswith("linux"):
            assert buf.ctypes.data % (1 << 21) == 0
        buf[...] = 7  # writable until the stage packs into it and freezes it
        assert int(buf[-1]) == 7
