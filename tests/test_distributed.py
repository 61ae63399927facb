"""nnrt.distributed: SyncBatchNorm and the trainer in one process, and the MPI runs.

The multi-rank tests live in tests/distributed/ and are launched here with
``mpirun -n 2`` (skipped, with the reason, when mpirun or mpi4py is missing).
References are float64 numpy formulas (tests/distributed/_reference.py) and
finite differences.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.distributed import LocalCommunicator, fit, mpirun_command, shard_bounds
from nnrt.optim import SGD, Adam
from nnrt.testing import check_layer, gradcheck
from nnrt_plugins.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "tests" / "distributed"
sys.path.insert(0, str(DIST))
from _reference import batches, train  # noqa: E402


# ------------------------------------------------------------------ one process
def bn_reference(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = 1e-5):
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)
    return gamma * (x - mean) / np.sqrt(var + eps) + beta, mean, var


def test_sync_batchnorm_alone_is_batchnorm(rng: np.random.Generator) -> None:
    layer = nnrt.layer("sync_batchnorm", 5, momentum=0.2)
    assert isinstance(layer, SyncBatchNorm)
    x = rng.normal(3.0, 2.0, size=(9, 5))
    layer.gamma[...] = rng.normal(size=5)
    layer.beta[...] = rng.normal(size=5)
    want, mean, var = bn_reference(x, layer.gamma.copy(), layer.beta.copy())
    np.testing.assert_allclose(layer.forward(x, training=True), want, rtol=1e-12, atol=1e-12)
    assert isinstance(layer.comm, LocalCommunicator)
    np.testing.assert_allclose(layer.running_mean, 0.2 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var, 0.8 + 0.2 * var * 9 / 8, rtol=1e-12)
    ev = layer.forward(x, training=False)
    want_ev = layer.gamma * (x - layer.running_mean) / np.sqrt(layer.running_var + 1e-5)
    np.testing.assert_allclose(ev, want_ev + layer.beta, rtol=1e-12, atol=1e-12)


def test_sync_batchnorm_gradients(rng: np.random.Generator) -> None:
    layer = SyncBatchNorm(4)
    layer.gamma[...] = rng.normal(size=4)
    assert gradcheck(layer, rng.normal(size=(6, 4)) * 3 + 1)
    assert check_layer(lambda: nnrt.layer("sync_batchnorm", 4), 4)


def test_sync_batchnorm_float32_and_errors(rng: np.random.Generator) -> None:
    layer = SyncBatchNorm(3).to_dtype(np.float32)
    x = rng.normal(1000.0, 0.1, size=(16, 3)).astype(np.float32)
    y = layer.forward(x, training=True)
    assert y.dtype == np.float32
    want, _, _ = bn_reference(x.astype(np.float64), np.ones(3), np.zeros(3))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="more than 1 sample"):
        layer.forward(x[:1], training=True)
    with pytest.raises(RuntimeError, match="before forward"):
        SyncBatchNorm(3).backward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(0)


def test_shards() -> None:
    for n in (1, 7, 16, 33):
        for size in (1, 2, 3, 5):
            parts = np.array_split(np.arange(n), size)
            for r in range(size):
                lo, hi = shard_bounds(n, size, r)
                assert list(range(lo, hi)) == list(parts[r])


def _net(bn: str, seed: int = 0) -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 8, 6),
            nnrt.layer(bn, 6),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 6, 3),
        ],
        seed=seed,
        dtype="float64",
    )


def test_fit_on_one_rank_equals_reference(rng: np.random.Generator) -> None:
    X = rng.normal(size=(40, 8))
    y = rng.integers(0, 3, size=40)
    net = _net("sync_batchnorm")
    init = net.state_dict()
    opt = SGD(net, lr=0.1, momentum=0.9)
    hist = fit(net, X, y, optimizer=opt, epochs=2, batch_size=16, seed=1, progress=False,
               comm=LocalCommunicator())  # fmt: skip
    want, losses = train(init, X, y, batches(40, 16, 2, seed=1))
    for k, v in want.items():
        np.testing.assert_allclose(net.state_dict()[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
    # the epoch's loss is the mean over its samples (batches of 16, 16, 8)
    sizes = np.array([16, 16, 8])
    per_epoch = [np.dot(losses[:3], sizes) / 40, np.dot(losses[3:], sizes) / 40]
    np.testing.assert_allclose(hist.history["loss"], per_epoch, rtol=1e-10)


def test_fit_skips_batches_too_small_for_batchnorm(rng: np.random.Generator) -> None:
    X = rng.normal(size=(17, 8))
    y = rng.integers(0, 3, size=17)
    net = _net("batchnorm")
    with pytest.warns(nnrt.TrainingWarning, match="mini-batch of 1 sample"):
        hist = fit(net, X, y, optimizer=SGD(net, lr=0.1), epochs=1, batch_size=8,
                   progress=False, comm=LocalCommunicator())  # fmt: skip
    assert hist.params["steps"] == 2 and hist.params["skipped"] == 1


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bn", ["batchnorm", "sync_batchnorm"])
def test_distributed_fit_on_one_rank_is_net_fit_bit_for_bit(
    rng: np.random.Generator, dtype: str, bn: str, optimizer: str
) -> None:
    # one engine: the same batches, short-batch rule, step and update on one rank
    # (sgd: net.fit runs its compiled epoch, the one-rank distributed fit the general
    # step through the gradient sync; the same bits all the same)
    X = rng.normal(size=(53, 8)).astype(dtype)  # 53 = 3 * 16 + 5: a short last batch
    y = rng.integers(0, 3, size=53)
    kwargs = dict(epochs=3, batch_size=16, validation=(X[:10], y[:10]), progress=False)

    def run(distributed: bool) -> tuple[dict[str, np.ndarray], nnrt.History]:
        net = nnrt.Sequential(_net(bn).layers, seed=0, dtype=dtype)
        opt = Adam(net, lr=0.01) if optimizer == "adam" else nnrt.optim.SGD(net, lr=0.1)
        if distributed:
            hist = fit(net, X, y, optimizer=opt, comm=LocalCommunicator(), **kwargs)
        else:
            hist = net.fit(X, y, optimizer=opt, **kwargs)
        return net.state_dict(), hist

    (single, h1), (dist, h2) = run(False), run(True)
    assert max(float(np.max(np.abs(single[k] - _net(bn).state_dict()[k]))) for k in single) > 1e-3
    for k in single:
        assert single[k].tobytes() == dist[k].tobytes(), k
    assert (
        h1.history.keys() == h2.history.keys() == {"loss", "accuracy", "val_loss", "val_accuracy"}
    )
    assert h1.history["accuracy"] == h2.history["accuracy"]
    assert h1.history["val_loss"] == h2.history["val_loss"]
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-6)


def test_convert_sync_batchnorm(rng: np.random.Generator) -> None:
    net = _net("batchnorm", seed=3)
    net[1].buffers()["running_mean"][...] = rng.normal(size=6)
    new = convert_sync_batchnorm(net)
    assert isinstance(new[1], SyncBatchNorm) and new[0] is net[0]
    sd_old, sd_new = net.state_dict(), new.state_dict()
    assert all(np.array_equal(sd_old[k], sd_new[k]) for k in sd_old)
    x = rng.normal(size=(5, 8))
    np.testing.assert_allclose(new.forward(x), net.forward(x), rtol=1e-12, atol=1e-12)


class _Counting(nnrt.Layer):
    """A third party's layer that talks to the ranks itself: sums its input's rows
    over the communicator it is handed (the ``uses_communicator`` interface)."""

    uses_batch_statistics = True
    uses_communicator = True

    def __init__(self) -> None:
        super().__init__()
        self.comm: object = None
        self.total = np.zeros(1)

    def buffers(self) -> dict[str, np.ndarray]:
        return {"total": self.total}

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=self.dtype)
        if training:
            rows = np.array([float(len(X))])
            self.total += self.comm.allreduce_sum(rows, what="rows")  # type: ignore[attr-defined]
        return X

    def backward(self, dY: Any) -> np.ndarray:
        return np.ascontiguousarray(dY)

    def config(self) -> dict[str, Any]:
        return {}


def test_a_layer_that_uses_the_communicator_gets_it() -> None:
    """GradientAllreduce hands its communicator to every layer declaring
    ``uses_communicator``, keeps that layer's buffers out of the averaging and
    needs two rows in the whole global batch (not two per rank)."""
    from nnrt.distributed import GradientAllreduce

    comm = LocalCommunicator()
    layer = _Counting()
    net = nnrt.Sequential([nnrt.layer("dense", 3, 3), layer], seed=0, dtype="float64")
    sync = GradientAllreduce(net, comm)
    assert layer.comm is comm
    assert not any(b is layer.total for b in sync._avg_buffers)
    assert sync.min_batch(net) == 2
    X = np.random.default_rng(0).normal(size=(10, 3))
    fit(net, X, X, loss="mse", epochs=1, batch_size=4, comm=comm, progress=False)
    assert layer.total[0] == 10  # 4 + 4 + 2 rows, each counted through the communicator


def test_mpirun_command() -> None:
    cmd = mpirun_command(3, ["python", "train.py"], hostfile="hosts")
    assert cmd[:3] == ["mpirun", "-n", "3"]
    assert cmd[-2:] == ["python", "train.py"]
    assert cmd[cmd.index("--hostfile") + 1] == "hosts"


# ------------------------------------------------------------------ MPI launches
def _mpi_missing() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py not installed (pip install 'nnrt[mpi]')"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def _launch(args: list[str], timeout: float, n: int = 2) -> tuple[int, str, float]:
    """Run ``python args`` on ``n`` ranks; kill the whole process group on timeout."""
    cmd = mpirun_command(n, [sys.executable, *args])
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", NNRT_MPI_TIMEOUT="120")
    env.pop("PYTEST_ADDOPTS", None)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s (hang):\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - t0


@pytest.mark.slow
@needs_mpi
def test_two_ranks_equal_single_process() -> None:
    rc, out, _ = _launch(
        ["-m", "pytest", str(DIST), "-q", "-p", "no:cacheprovider", "--color=no"], timeout=300
    )
    assert rc == 0, out[-5000:]
    assert "passed" in out and "failed" not in out, out[-5000:]


@pytest.mark.slow
@needs_mpi
def test_killed_rank_fails_the_job() -> None:
    rc, out, elapsed = _launch([str(DIST / "_dying_rank.py"), "kill"], timeout=60)
    assert rc != 0, out
    assert "UNEXPECTED-FINISH" not in out
    assert "rank 1: sending myself KILL" in out
    assert "signal 9" in out or "killed" in out.lower(), out
    assert elapsed < 60


@pytest.mark.slow
@needs_mpi
def test_stuck_rank_times_out() -> None:
    rc, out, elapsed = _launch([str(DIST / "_dying_rank.py"), "stop", "3"], timeout=60)
    assert rc != 0, out
    assert "UNEXPECTED-FINISH" not in out
    assert "on rank 0 of 2 timed out after 3 s" in out, out
    assert elapsed < 60
