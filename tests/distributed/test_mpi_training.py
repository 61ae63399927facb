"""Data-parallel training on 2+ MPI ranks equals single-process training.

Run by tests/test_distributed.py as ``mpirun -n 2 python -m pytest tests/distributed``.
Every test is collective: all ranks run it in the same order.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import pytest
from _reference import batches, train

import nnrt
from nnrt.distributed import Communicator, fit
from nnrt.optim import SGD, Adam

N_IN, N_HIDDEN, N_OUT = 8, 6, 3


@pytest.fixture(scope="module")
def comm() -> Communicator:
    c = Communicator(timeout=120)
    assert c.size >= 2, "run these tests with mpirun -n 2 (or more)"
    return c


def data(n: int = 96, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_IN)) * 2.0 + 0.5
    y = rng.integers(0, N_OUT, size=n)
    return X, y


def build(bn: str, seed: int = 0, dtype: str = "float64") -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", N_IN, N_HIDDEN),
            nnrt.layer(bn, N_HIDDEN),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", N_HIDDEN, N_OUT),
        ],
        seed=seed,
        dtype=dtype,
    )


def single_process(bn_state: dict[str, np.ndarray], opt: str, X, y, order) -> dict:
    """nnrt in one process with plain batchnorm on the same global batches."""
    net = build("batchnorm")
    net.load_state_dict(bn_state)
    o = SGD(net, lr=0.1, momentum=0.9) if opt == "sgd" else Adam(net, lr=0.01)
    for idx in order:
        loss, dY = nnrt.losses.softmax_cross_entropy(net.forward(X[idx], training=True), y[idx])
        net.backward(dY)
        o.step()
    return net.state_dict()


def assert_state_close(got: dict, want: dict, tol: float = 1e-9) -> None:
    assert set(got) == set(want)
    for k in sorted(want):
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)


def max_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def gather(comm: Communicator, obj: Any) -> list[Any]:
    return comm.comm.allgather(obj)


def test_world(comm: Communicator) -> None:
    ranks = gather(comm, comm.rank)
    assert ranks == list(range(comm.size))


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_sync_batchnorm_equals_single_process(comm: Communicator, opt: str) -> None:
    X, y = data()
    init = build("batchnorm", seed=0).state_dict()
    # every rank builds different weights: fit must broadcast rank 0's
    net = build("sync_batchnorm", seed=0 if comm.rank == 0 else 100 + comm.rank)
    o = SGD(net, lr=0.1, momentum=0.9) if opt == "sgd" else Adam(net, lr=0.01)
    hist = fit(net, X, y, optimizer=o, epochs=3, batch_size=16, seed=5, progress=False, comm=comm)
    order = batches(len(X), 16, 3, seed=5)
    assert hist.params["steps"] * 3 == len(order) == 18
    got = net.state_dict()
    assert max_diff(got, init) > 1e-2  # training moved the weights
    assert_state_close(got, single_process(init, opt, X, y, order))
    if opt == "sgd":
        want, losses = train(init, X, y, order, groups=1)
        assert_state_close(got, want)
        per_epoch = np.asarray(losses).reshape(3, -1).mean(axis=1)
        np.testing.assert_allclose(hist.history["loss"], per_epoch, rtol=1e-9, atol=1e-12)
    # and every rank holds exactly the same weights
    states = gather(comm, got)
    for other in states[1:]:
        assert_state_close(other, states[0], tol=0.0)


def test_uneven_shards_sync(comm: Communicator) -> None:
    # global batches of 15 (8 + 7 rows on 2 ranks) and a last one of 5: the
    # N_local / N_global scaling of dY must still give the global-batch update
    X, y = data(50)
    init = build("batchnorm").state_dict()
    net = build("sync_batchnorm")
    o = SGD(net, lr=0.1, momentum=0.9)
    fit(net, X, y, optimizer=o, epochs=2, batch_size=15, seed=3, progress=False, comm=comm)
    want, _ = train(init, X, y, batches(50, 15, 2, seed=3), groups=1)
    assert_state_close(net.state_dict(), want)


def test_local_batchnorm_normalises_each_shard(comm: Communicator) -> None:
    # documented semantics without sync: each rank normalises its own shard
    # (the k-group reference), running statistics averaged over the ranks
    X, y = data()
    init = build("batchnorm").state_dict()
    net = build("batchnorm")
    o = SGD(net, lr=0.1, momentum=0.9)
    fit(net, X, y, optimizer=o, epochs=3, batch_size=16, seed=5, progress=False, comm=comm)
    order = batches(len(X), 16, 3, seed=5)
    got = net.state_dict()
    per_shard, _ = train(init, X, y, order, groups=comm.size)
    assert_state_close(got, per_shard)
    whole, _ = train(init, X, y, order, groups=1)
    assert max_diff(got, whole) > 1e-4  # really different from the global-batch result


def test_float32_ranks_agree(comm: Communicator) -> None:
    X, y = data()
    init = build("batchnorm").state_dict()
    net = build("sync_batchnorm", dtype="float32")
    o = SGD(net, lr=0.1, momentum=0.9)
    fit(net, X, y, optimizer=o, epochs=2, batch_size=16, seed=5, progress=False, comm=comm)
    got = net.state_dict()
    assert all(v.dtype == np.float32 for v in got.values())
    states = gather(comm, got)
    for other in states[1:]:
        assert_state_close(other, states[0], tol=0.0)
    want, _ = train(init, X, y, batches(len(X), 16, 2, seed=5), groups=1)
    assert_state_close({k: v.astype(np.float64) for k, v in got.items()}, want, tol=2e-4)


def test_checkpoint_only_on_rank_0(comm: Communicator) -> None:
    folder = comm.comm.bcast(tempfile.mkdtemp(prefix="nnrt-mpi-") if comm.rank == 0 else None)
    X, y = data()
    net = build("sync_batchnorm")
    path = os.path.join(folder, f"ckpt-rank{comm.rank}.npz")
    hist = fit(
        net,
        X,
        y,
        optimizer=SGD(net, lr=0.1),
        epochs=2,
        batch_size=32,
        callbacks=[nnrt.Checkpoint(path)],
        progress=False,
        validation=(X[:40], y[:40]),
        comm=comm,
    )
    comm.barrier()
    files = sorted(os.listdir(folder))
    assert files == ["ckpt-rank0.npz"]
    loaded = nnrt.load(os.path.join(folder, "ckpt-rank0.npz"))
    assert_state_close(loaded.state_dict(), net.state_dict(), tol=0.0)
    # validation loss: every rank evaluates the whole set; all get the same value
    loss, _ = nnrt.losses.softmax_cross_entropy(net.forward(X[:40]), y[:40])
    np.testing.assert_allclose(hist.history["val_loss"][-1], loss, rtol=1e-12)
    comm.barrier()
    if comm.rank == 0:
        os.remove(os.path.join(folder, "ckpt-rank0.npz"))
        os.rmdir(folder)
