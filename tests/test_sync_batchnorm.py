"""``sync_batchnorm``: the compiled BatchNorm with its statistics reduced over ranks.

Several ranks are simulated in one process: one thread per rank, each with its own
layer, and a communicator whose ``allreduce_sum`` adds the threads' buffers (a
barrier between them). Checked against a float64 numpy BatchNorm of the global batch
written here, and against communicators that misbehave (garbage sums, buffers changed
under the layer's feet): clear errors, never a crash.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import nnrt
import nnrt._network
from nnrt_plugins.batchnorm import BatchNorm
from nnrt_plugins.sync_batchnorm import SyncBatchNorm

EPS = 1e-5
MOM = 0.1


class ThreadComm:
    """``size`` ranks as threads: ``allreduce_sum`` returns the sum over all of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=30)
        self._slots: list[Any] = [None] * size
        self._local = threading.local()
        self.calls: list[str] = []

    def rank_of_thread(self, rank: int) -> None:
        self._local.rank = rank

    @property
    def rank(self) -> int:
        return int(self._local.rank)

    def allreduce_sum(self, buf: np.ndarray, what: str = "allreduce") -> np.ndarray:
        self._slots[self.rank] = buf.copy()
        self._barrier.wait()
        total = np.sum(self._slots, axis=0)
        self._barrier.wait()
        buf[...] = total
        if self.rank == 0:
            self.calls.append(what)
        return buf


def run_ranks(size: int, work: Callable[[int], Any]) -> list[Any]:
    """``work(rank)`` on ``size`` threads at once; their results (or re-raised errors)."""
    results: list[Any] = [None] * size

    def target(rank: int) -> None:
        try:
            results[rank] = work(rank)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def reference(
    X: np.ndarray, gamma: np.ndarray, beta: np.ndarray, dY: np.ndarray
) -> dict[str, np.ndarray]:
    """Float64 BatchNorm of the whole batch X: output, statistics and gradients."""
    n = len(X)
    mean = X.mean(axis=0)
    var = ((X - mean) ** 2).mean(axis=0)
    xhat = (X - mean) / np.sqrt(var + EPS)
    dxhat = dY * gamma
    dX = (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0)) / (n * np.sqrt(var + EPS))
    return {
        "Y": gamma * xhat + beta,
        "running_mean": MOM * mean,
        "running_var": (1 - MOM) + MOM * var * n / (n - 1),
        "dX": dX,
        "dgamma": (dY * xhat).sum(0),
        "dbeta": dY.sum(0),
    }


@pytest.mark.parametrize("rows", [(5, 7), (1, 6), (4, 4, 3)])
def test_ranks_together_equal_one_batchnorm_of_the_global_batch(rows: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(rows))
    f = 4
    X = rng.normal(3.0, 2.0, size=(sum(rows), f))
    dY = rng.normal(size=X.shape)
    gamma, beta = rng.uniform(0.5, 1.5, size=f), rng.normal(size=f)
    want = reference(X, gamma, beta, dY)
    bounds = np.cumsum((0, *rows))
    comm = ThreadComm(len(rows))

    def work(rank: int) -> dict[str, np.ndarray]:
        comm.rank_of_thread(rank)
        layer = nnrt.layer("sync_batchnorm", f)
        layer.comm = comm
        layer.params()["gamma"][...] = gamma
        layer.params()["beta"][...] = beta
        lo, hi = bounds[rank], bounds[rank + 1]
        Y = layer.forward(X[lo:hi], training=True).copy()
        dX = layer.backward(dY[lo:hi]).copy()
        return {"Y": Y, "dX": dX, **{k: v.copy() for k, v in layer.grads().items()},
                **{k: v.copy() for k, v in layer.buffers().items()}}  # fmt: skip

    got = run_ranks(len(rows), work)
    # three small allreduces per step, each saying what it is
    assert [c.split(") ", 1)[1] for c in comm.calls] == [
        "forward: batch size and sum",
        "forward: sums of deviations",
        "backward: sums of dy and dy*xhat",
    ]
    assert all(c.startswith("SyncBatchNorm") for c in comm.calls)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(np.concatenate([g["Y"] for g in got]), want["Y"], **tol)
    np.testing.assert_allclose(np.concatenate([g["dX"] for g in got]), want["dX"], **tol)
    for g in got:  # the running statistics are the global ones, on every rank
        np.testing.assert_allclose(g["running_mean"], want["running_mean"], **tol)
        np.testing.assert_allclose(g["running_var"], want["running_var"], **tol)
    # parameter gradients: each rank's share; they add up to the global ones
    for k in ("gamma", "beta"):
        np.testing.assert_allclose(sum(g[k] for g in got), want[f"d{k}"], **tol)


def test_one_rank_is_batchnorm_and_float32_keeps_its_accuracy() -> None:
    rng = np.random.default_rng(5)
    X = rng.normal(1000.0, 0.1, size=(32, 3))
    dY = rng.normal(size=X.shape)
    want = reference(X, np.ones(3), np.zeros(3), dY)
    for dtype, tol in (("float64", 1e-10), ("float32", 2e-3)):
        layer = SyncBatchNorm(3).to_dtype(dtype)
        Y = layer.forward(X.astype(dtype), training=True)
        dX = layer.backward(dY.astype(dtype))
        assert Y.dtype == dX.dtype == np.dtype(dtype)
        np.testing.assert_allclose(Y, want["Y"], rtol=tol, atol=tol)
        np.testing.assert_allclose(dX, want["dX"], rtol=tol, atol=tol * 10)


def test_it_is_the_compiled_batchnorm() -> None:
    layer = nnrt.layer("sync_batchnorm", 3)
    assert isinstance(layer, BatchNorm) and type(layer).uses_communicator
    assert not nnrt._network._is_python_layer(layer)
    with pytest.raises(AttributeError):
        layer.gamma = np.ones(3)  # type: ignore[misc]
    # never fused with a following sigmoid (the plugin fuses the exact pair only)
    net = nnrt.Sequential([layer, nnrt.layer("sigmoid")])
    assert net._fuse_plan() is None


def test_first_use_of_the_registry_from_several_threads() -> None:
    """Ranks as threads build their layers at once: the registry loads once and every
    thread finds the built-in layers (none sees a half-loaded registry)."""
    code = """
import threading, nnrt
out = []
def build():
    out.append(type(nnrt.layer("sync_batchnorm", 3)).__name__)
threads = [threading.Thread(target=build) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert out == ["SyncBatchNorm"] * 4, out
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


class _BadComm:
    """A communicator that does something wrong to the buffer it is given."""

    rank, size = 0, 1

    def __init__(self, how: str, layer: Any = None) -> None:
        self.how = how
        self.layer = layer

    def allreduce_sum(self, buf: np.ndarray, what: str = "") -> np.ndarray:
        if self.how == "nan":
            buf[...] = np.nan
        elif self.how == "fraction":
            buf[0] = 2.5
        elif self.how == "huge":
            buf[0] = 1e300
        elif self.how == "reshape":
            buf.shape = (1, buf.size)
        elif self.how == "raise":
            raise RuntimeError("network down")
        elif self.how == "retype" and self.layer is not None:
            self.layer.to_dtype(np.float32)
        return buf


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        ("nan", ValueError, "more than 1 sample per global batch"),
        ("fraction", RuntimeError, "not a whole number of rows"),
        ("huge", RuntimeError, "not a whole number of rows"),
        ("reshape", RuntimeError, "statistics message is no longer"),
        ("raise", RuntimeError, "network down"),
    ],
)
def test_a_misbehaving_communicator_gets_a_clear_error(how: str, error: type, match: str) -> None:
    layer = SyncBatchNorm(3)
    layer.comm = _BadComm(how)
    X = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises(error, match=match):
        layer.forward(X, training=True)
    # the layer recovers with a working communicator (message buffers are remade)
    layer.comm = None
    want = (X - X.mean(0)) / np.sqrt(X.var(0) + EPS)
    np.testing.assert_allclose(layer.forward(X, training=True), want, rtol=1e-12, atol=1e-12)


def test_a_communicator_that_changes_the_layer_cannot_crash_it() -> None:
    layer = SyncBatchNorm(3)
    layer.comm = _BadComm("retype", layer)
    X = np.random.default_rng(0).normal(size=(4, 3))
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        layer.forward(X, training=True)
    # and the layer still works afterwards, in its new dtype
    layer.comm = None
    assert layer.forward(X.astype(np.float32), training=True).dtype == np.float32


def _trained_sync_net() -> tuple[nnrt.Sequential, np.ndarray]:
    rng = np.random.default_rng(11)
    net = nnrt.Sequential(
        [nnrt.layer("dense_nobias", 3, 4), nnrt.layer("sync_batchnorm", 4, eps=1e-3),
         nnrt.layer("sigmoid"), nnrt.layer("dense", 4, 2)],
        seed=0, dtype="float64",
    )  # fmt: skip
    p, b = net[1].params(), net[1].buffers()
    p["gamma"][...] = rng.uniform(0.5, 1.5, size=4)
    p["beta"][...] = rng.normal(size=4)
    b["running_mean"][...] = rng.normal(size=4)
    b["running_var"][...] = rng.uniform(0.5, 2.0, size=4)
    return net, rng.normal(size=(6, 3))


def test_it_folds_like_batchnorm() -> None:
    net, X = _trained_sync_net()
    folded = net.fold()
    assert [type(layer).__name__ for layer in folded.layers] == ["Dense", "Sigmoid", "Dense"]
    # float64 reference of the eval network
    s = net.state_dict()
    z = X @ s["0.weight"]
    z = (z - s["1.running_mean"]) / np.sqrt(s["1.running_var"] + 1e-3) * s["1.gamma"]
    h = 1 / (1 + np.exp(-(z + s["1.beta"])))
    want = h @ s["3.weight"] + s["3.bias"]
    np.testing.assert_allclose(folded(X), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(net(X), want, rtol=1e-12, atol=1e-12)


def test_it_exports_to_onnx_like_batchnorm(tmp_path: Any) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    import nnrt.onnx

    net, X = _trained_sync_net()
    path = str(tmp_path / "sync.onnx")
    nnrt.onnx.export(net, path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: X})
    np.testing.assert_allclose(got, net(X), rtol=1e-10, atol=1e-12)
