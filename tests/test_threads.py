"""Threads: inference on one network from many threads; training one network twice at once.

Layers reuse per-layer output buffers and BatchNorm per-feature scratch, and
the kernels release the GIL, so two threads inside ``forward`` of the same
network would overwrite each other's results. ``predict``/``evaluate`` hold a
per-network lock for a whole call and ``fit`` for each step (``predict`` from 8
threads equals sequential ``predict``; ``predict`` during ``fit`` sees the weights
of one whole step), and a second ``fit`` on a network that is already training
raises RuntimeError instead of corrupting the weights. Separate networks run in
parallel. More in tests/test_reliability_concurrency.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import nnrt

N_THREADS = 8


def _net(dtype: str = "float32", seed: int = 0) -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 32, 64),
            nnrt.layer("batchnorm", 64),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 64, 64),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 64, 10),
        ],
        seed=seed,
        dtype=dtype,
    )


def _trained(dtype: str) -> nnrt.Sequential:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(256, 32))
    y = rng.integers(0, 10, 256)
    net = _net(dtype)
    net.fit(X, y, epochs=2, batch_size=32, progress=False)  # non-trivial running stats
    return net


def _run_threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_from_8_threads_equals_sequential_predict(dtype: str) -> None:
    net = _trained(dtype)
    rng = np.random.default_rng(2)
    # different batch sizes per thread: buffers get reallocated as well as reused
    inputs = [rng.normal(size=(50 + 37 * i, 32)) for i in range(N_THREADS)]
    expected = [net.predict(X, batch_size=64) for X in inputs]
    # an independent float64 reference for one of them (not just self-consistency)
    ref = _numpy_forward(net, inputs[0])
    tol = 1e-4 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(expected[0], ref, rtol=tol, atol=tol)

    def work(i: int) -> list[np.ndarray]:
        return [net.predict(inputs[i], batch_size=64) for _ in range(15)]

    for _round in range(3):
        for i, outs in enumerate(_run_threads(N_THREADS, work)):
            for out in outs:
                np.testing.assert_array_equal(out, expected[i])


def test_evaluate_and_predict_classes_from_threads() -> None:
    net = _trained("float32")
    rng = np.random.default_rng(3)
    data = [
        (rng.normal(size=(100 + i, 32)), rng.integers(0, 10, 100 + i)) for i in range(N_THREADS)
    ]
    expected = [(net.evaluate(X, y), net.predict_classes(X)) for X, y in data]

    def work(i: int) -> list[Any]:
        X, y = data[i]
        return [(net.evaluate(X, y), net.predict_classes(X)) for _ in range(10)]

    for i, outs in enumerate(_run_threads(N_THREADS, work)):
        for ev, classes in outs:
            assert ev == expected[i][0]
            np.testing.assert_array_equal(classes, expected[i][1])


def test_second_fit_on_the_same_network_raises_and_weights_stay_intact() -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(128, 32))
    y = rng.integers(0, 10, 128)
    net = _net()
    started = threading.Event()
    attempted = threading.Event()
    second: dict[str, BaseException | None] = {"error": None}

    def hold(state: Any, epoch: int) -> None:
        if epoch == 1:
            started.set()
            assert attempted.wait(60), "the second fit never ran"

    def first() -> None:
        net.fit(
            X,
            y,
            epochs=3,
            batch_size=16,
            progress=False,
            callbacks=[nnrt.LambdaCallback(on_epoch_begin=hold)],
        )

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(60)
    try:
        net.fit(X, y, epochs=1, progress=False)
    except RuntimeError as exc:
        second["error"] = exc
    finally:
        attempted.set()
    t.join(60)
    assert isinstance(second["error"], RuntimeError), "a concurrent fit was allowed"
    msg = str(second["error"])
    assert "fit" in msg and "thread" in msg, msg
    # the first training was not disturbed: same weights as training alone
    alone = _net()
    alone.fit(X, y, epochs=3, batch_size=16, progress=False)
    for k, v in alone.state_dict().items():
        np.testing.assert_array_equal(net.state_dict()[k], v, err_msg=k)
    # and the network trains again afterwards
    net.fit(X, y, epochs=1, progress=False)


class _RecordingSGD(nnrt.optim.SGD):
    """SGD that keeps a copy of the whole state (weights, running stats) after each step."""

    def __init__(self, net: nnrt.Sequential, lr: float) -> None:
        super().__init__(net, lr=lr)
        self.net = net
        self.states = [net.state_dict()]

    def step(self) -> None:
        super().step()
        self.states.append(self.net.state_dict())


def test_predict_during_fit_sees_the_weights_of_one_whole_step() -> None:
    # fit holds the network's lock per step (forward, loss, backward, optimizer
    # step), so a predict from another thread runs between two steps: its answer is
    # that of the state after some whole step, never of a half-updated network.
    rng = np.random.default_rng(5)
    X = rng.normal(size=(256, 32))
    y = rng.integers(0, 10, 256)
    Xq = rng.normal(size=(40, 32))
    net = _net("float64")
    opt = _RecordingSGD(net, lr=0.5)
    seen: list[np.ndarray] = []
    in_fit = threading.Event()
    done = threading.Event()
    predicted = threading.Event()

    class PauseOnce(nnrt.Callback):
        # after the first step, wait (outside the lock) until a predict has run, so
        # at least one predict lands mid-fit however the threads are scheduled
        def on_batch_end(self, state: Any, epoch: int, batch: int, loss: float) -> None:
            if not in_fit.is_set():
                in_fit.set()
                predicted.wait(60)

    def trainer() -> None:
        try:
            net.fit(
                X,
                y,
                optimizer=opt,
                epochs=3,
                batch_size=8,
                progress=False,
                callbacks=[PauseOnce()],
            )
        finally:
            done.set()

    t = threading.Thread(target=trainer)
    t.start()
    assert in_fit.wait(60)
    while not done.is_set():
        seen.append(net.predict(Xq))
        predicted.set()
    t.join(60)
    assert len(opt.states) == 3 * 32 + 1
    refs = [_numpy_forward_state(state, Xq) for state in opt.states]
    assert seen
    for out in seen:
        errs = [float(np.abs(out - ref).max()) for ref in refs]
        assert min(errs) < 1e-9, f"predict during fit matched no whole step (closest {min(errs)})"
    np.testing.assert_allclose(net.predict(Xq), refs[-1], rtol=0, atol=1e-9)


def test_predict_during_fit_sees_the_state_a_callback_recorded() -> None:
    # fit holds the inference lock around each step (optimizer update included), so a
    # predict from another thread runs between two steps: it sees the weights after
    # some step, never half an update
    rng = np.random.default_rng(5)
    X = rng.normal(size=(256, 32))
    y = rng.integers(0, 10, 256)
    Xq = rng.normal(size=(40, 32))
    net = _net()
    states: list[dict[str, np.ndarray]] = [net.state_dict()]
    in_fit = threading.Event()

    class Record(nnrt.Callback):
        def on_batch_end(self, state: Any, epoch: int, batch: int, loss: float) -> None:
            states.append(state.net.state_dict())  # the next step waits for this
            in_fit.set()

    def trainer() -> None:
        net.fit(X, y, epochs=3, batch_size=8, progress=False, callbacks=[Record()])

    t = threading.Thread(target=trainer)
    t.start()
    assert in_fit.wait(60)
    seen = [net.predict(Xq) for _ in range(5)]
    t.join(60)
    assert not t.is_alive()
    copy = _net()
    outputs = []
    for st in states:
        copy.load_state_dict(st)
        outputs.append(copy.predict(Xq))
    for got in seen:
        assert any(np.array_equal(got, want) for want in outputs)


def test_separate_networks_run_in_parallel_threads(tmp_path: Any) -> None:
    path = tmp_path / "m.npz"
    _trained("float64").save(path)
    nets = [nnrt.load(path) for _ in range(N_THREADS)]
    rng = np.random.default_rng(6)
    inputs = [rng.normal(size=(64, 32)) for _ in range(N_THREADS)]
    expected = [nets[0].predict(X) for X in inputs]

    def work(i: int) -> list[np.ndarray]:
        # forward directly: each thread owns its network
        return [np.array(nets[i].forward(inputs[i])) for _ in range(20)]

    for i, outs in enumerate(_run_threads(N_THREADS, work)):
        for o in outs:
            np.testing.assert_array_equal(o, expected[i])


def _numpy_forward(net: nnrt.Sequential, X: np.ndarray) -> np.ndarray:
    """float64 reference of the network above in eval mode."""
    return _numpy_forward_state(net.state_dict(), X.astype(net.dtype))


def _numpy_forward_state(state: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """float64 reference of the network above in eval mode, from a state dict."""
    p = {k: v.astype(np.float64) for k, v in state.items()}
    h = X.astype(np.float64) @ p["0.weight"]
    h = (h - p["1.running_mean"]) / np.sqrt(p["1.running_var"] + 1e-5) * p["1.gamma"] + p["1.beta"]
    h = 1 / (1 + np.exp(-h))
    h = 1 / (1 + np.exp(-(h @ p["3.weight"] + p["3.bias"])))
    return h @ p["5.weight"] + p["5.bias"]
