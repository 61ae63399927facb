"""Regression tests: concurrency and processes (issue 12; docs/reliability.md §5).

The issue's reproducers, each now a test:

* ``predict`` in threads while another thread hot-swaps the weights with
  ``load_state_dict`` returned answers matching neither model in 53 of 60
  calls: every answer must now equal the old or the new model's (float64 numpy
  references computed from the two state dicts).
* ``save`` from another thread during ``fit`` wrote half of step n and half of
  step n-1: every file saved during ``fit`` must now hold the state after one
  whole step (the optimizer records the state after each of its steps).
* forking while another thread is inside ``fit`` left the child's ``predict``
  blocked forever: the child (in a subprocess, under a timeout) must predict,
  and train, at once.
* a pickled network carried its last output buffer (about 190x the size, and
  the last predictions): a pickle now carries layers, parameters, buffers and
  config only; after ``fit(loss=<local function>)`` the network still pickles.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt

HANG_TIMEOUT = 90


def _net(dtype: str = "float64", seed: int = 0) -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 6, 16),
            nnrt.layer("batchnorm", 16),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 16, 4),
        ],
        seed=seed,
        dtype=dtype,
    )


def _reference(state: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
    """float64 numpy forward (eval mode) of the network above from its state dict."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
    h = np.asarray(X, dtype=np.float64) @ p["0.weight"]
    h = (h - p["1.running_mean"]) / np.sqrt(p["1.running_var"] + 1e-5)
    h = h * p["1.gamma"] + p["1.beta"]
    h = 1.0 / (1.0 + np.exp(-h))
    return h @ p["3.weight"] + p["3.bias"]


def _trained_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    net = _net(seed=seed)
    net.fit(rng.normal(size=(128, 6)), rng.integers(0, 4, 128), epochs=2, progress=False)
    return net.state_dict()


@pytest.fixture(autouse=True)
def _switch_often() -> Any:
    # switch threads every few microseconds (default 5 ms), so that a missing lock
    # shows up in a short test
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def _threads(targets: list[Any]) -> None:
    errors: list[BaseException] = []

    def run(fn: Any) -> None:
        try:
            fn()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


# ----------------------------------------------------------------- hot swap
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hot_swap_during_predict_gives_the_old_or_the_new_answers(dtype: str) -> None:
    a, b = _trained_state(1), _trained_state(2)
    X = np.random.default_rng(3).normal(size=(96, 6))
    net = _net(dtype)
    tol = 1e-9 if dtype == "float64" else 2e-4
    # the references from the arrays as the network stores them (float32 rounding)
    refs = []
    for state in (a, b):
        net.load_state_dict(state)
        refs.append(_reference(net.state_dict(), X.astype(dtype)))
    assert np.abs(refs[0] - refs[1]).max() > 100 * tol  # the two models differ
    swapping = threading.Event()
    finished = threading.Semaphore(0)
    answers: list[np.ndarray] = []
    swaps = [0]

    def predictor() -> None:
        assert swapping.wait(HANG_TIMEOUT)
        for _ in range(300):
            # small batches: one predict is many forward calls, a swap in between
            # would mix the two models' rows
            answers.append(net.predict(X, batch_size=4))
        finished.release()

    def swapper() -> None:
        done = 0
        while done < 3:
            net.load_state_dict(a if swaps[0] % 2 == 0 else b)
            swaps[0] += 1
            swapping.set()
            done += finished.acquire(blocking=False)

    _threads([predictor, predictor, predictor, swapper])
    assert swaps[0] > 10, "the swapper did not run"
    for out in answers:
        errs = [float(np.abs(out - r).max()) for r in refs]
        assert min(errs) <= tol, f"an answer matches neither model (errors {errs})"
    assert len(answers) == 900


def test_state_dict_during_a_swap_is_one_whole_model() -> None:
    a, b = _trained_state(1), _trained_state(2)
    net = _net()
    stop = threading.Event()
    seen: list[dict[str, np.ndarray]] = []

    def reader() -> None:
        for _ in range(3000):
            seen.append(net.state_dict())
        stop.set()

    def swapper() -> None:
        k = 0
        while not stop.is_set():
            net.load_state_dict(a if k % 2 == 0 else b)
            k += 1

    net.load_state_dict(a)
    _threads([reader, swapper])
    for state in seen:
        same_a = all(np.array_equal(state[k], a[k]) for k in a)
        same_b = all(np.array_equal(state[k], b[k]) for k in b)
        assert same_a or same_b, "state_dict mixed two models"


# ----------------------------------------------------------------- save during fit
class _RecordingAdam(nnrt.optim.Adam):
    """Adam that keeps a copy of the whole state after each of its steps."""

    def __init__(self, net: nnrt.Sequential) -> None:
        super().__init__(net, lr=0.05)
        self.net = net
        self.states = [net.state_dict()]

    def step(self) -> None:
        super().step()
        self.states.append(self.net.state_dict())


def test_save_during_fit_writes_the_weights_of_one_whole_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(256, 6))
    y = rng.integers(0, 4, 256)
    net = _net("float32")
    opt = _RecordingAdam(net)
    started = threading.Event()
    done = threading.Event()
    saved: list[Path] = []

    def trainer() -> None:
        try:
            net.fit(
                X,
                y,
                optimizer=opt,
                epochs=8,
                batch_size=4,
                progress=False,
                callbacks=[
                    nnrt.LambdaCallback(
                        on_train_begin=lambda s: started.set(),
                        # each epoch waits for a save, so that saves do happen during fit
                        on_epoch_end=lambda s, e, logs: a_save.wait(HANG_TIMEOUT),
                    )
                ],
            )
        finally:
            done.set()

    a_save = threading.Event()

    def saver() -> None:
        assert started.wait(HANG_TIMEOUT)
        k = 0
        while not done.is_set() and k < 1000:
            path = tmp_path / f"during-{k}.npz"
            net.save(path)
            saved.append(path)
            a_save.set()
            k += 1

    _threads([trainer, saver])
    assert len(opt.states) == 8 * 64 + 1
    assert saved
    keys = sorted(opt.states[0])
    steps_seen = set()
    for path in saved:
        state = nnrt.load(path).state_dict()
        match = [
            i
            for i, rec in enumerate(opt.states)
            if all(np.array_equal(state[k], rec[k]) for k in keys)
        ]
        assert match, f"{path.name} holds no whole step's weights (a mix of two steps)"
        steps_seen.add(match[0])
    # saves ran during fit (not all after it)
    assert min(steps_seen) < len(opt.states) - 1, sorted(steps_seen)


# ----------------------------------------------------------------- fork
_FORK_SCRIPT = """
import os, signal, sys, threading
import numpy as np
import nnrt

net = nnrt.Sequential([nnrt.layer("dense", 6, 8), nnrt.layer("sigmoid"),
                       nnrt.layer("dense", 8, 3)], seed=0, dtype="float64")
rng = np.random.default_rng(0)
X, y = rng.normal(size=(64, 6)), rng.integers(0, 3, 64)
Xq = rng.normal(size=(5, 6))
inside = threading.Event()
release = threading.Event()
calls = [0]

def loss(Y, target):
    # runs inside a training step, i.e. holding the network's locks
    calls[0] += 1
    if calls[0] == 3:
        inside.set()
        release.wait(60)
    return nnrt.losses.softmax_cross_entropy(Y, target)

t = threading.Thread(target=lambda: net.fit(X, y, loss=loss, epochs=2, batch_size=8,
                                            progress=False))
t.start()
assert inside.wait(60)
pid = os.fork()
if pid == 0:
    signal.alarm(30)  # a hang kills the child: the parent sees SIGALRM
    try:
        out = net.predict(Xq)
        assert out.shape == (5, 3) and np.isfinite(out).all()
        net.fit(X, y, epochs=1, progress=False)  # the training lock is fresh too
        net.save(sys.argv[1])
        net.load_state_dict(net.state_dict())
    except BaseException as exc:
        print("child failed:", repr(exc), flush=True)
        os._exit(3)
    os._exit(0)
release.set()
_, status = os.waitpid(pid, 0)
t.join(60)
code = os.waitstatus_to_exitcode(status)
print("child exit", code)
sys.exit(0 if code == 0 else 1)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs os.fork")
def test_fork_while_another_thread_is_inside_fit_leaves_a_working_child(tmp_path: Path) -> None:
    try:
        out = subprocess.run(
            [sys.executable, "-c", _FORK_SCRIPT, str(tmp_path / "child.npz")],
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the forking process hung") from exc
    assert out.returncode == 0, out.stdout + out.stderr
    assert "child exit 0" in out.stdout, out.stdout
    assert nnrt.load(tmp_path / "child.npz").predict(np.zeros((1, 6))).shape == (1, 3)


# ----------------------------------------------------------------- pickling
def test_a_pickle_carries_parameters_buffers_and_config_only() -> None:
    net = _net("float32")
    rng = np.random.default_rng(5)
    net.fit(rng.normal(size=(64, 6)), rng.integers(0, 4, 64), epochs=1, progress=False)
    # a large, distinctive last batch: its outputs must not travel in the pickle
    X = rng.normal(size=(20_000, 6)) * 3.0
    net.forward(X[:5000], training=True)
    Y = net.predict(X)
    last = np.array(net.forward(X[:4096]))
    blob = pickle.dumps(net)
    state_bytes = sum(v.nbytes for v in net.state_dict().values())
    assert len(blob) < 2 * state_bytes + 16_384, (len(blob), state_bytes)
    assert last[:2].tobytes() not in blob and Y[-2:].tobytes() not in blob
    back = pickle.loads(blob)
    np.testing.assert_allclose(
        back.predict(X[:100]), _reference(net.state_dict(), X[:100].astype(np.float32)), atol=2e-4
    )
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v, err_msg=k)
    assert back.dtype == net.dtype and back.seed == net.seed
    # copies are pickles too
    clone = copy.deepcopy(net)
    np.testing.assert_array_equal(clone.predict(X[:50]), net.predict(X[:50]))


class _CachingScale(nnrt.Layer):
    """A registered Python layer with a batch-sized training cache (``_X``)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.in_features = self.out_features = int(width)
        self.scale = np.ones(width)
        self.dscale = np.zeros(width)
        self._X: np.ndarray | None = None

    def params(self) -> dict[str, np.ndarray]:
        return {"scale": self.scale}

    def grads(self) -> dict[str, np.ndarray]:
        return {"scale": self.dscale}

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        Xa = self.prepare_input(X)
        if training:
            self._X = Xa.copy()
        return Xa * self.scale

    def backward(self, dY: Any) -> np.ndarray:
        assert self._X is not None
        self.dscale[...] = (dY * self._X).sum(axis=0)
        return np.asarray(dY * self.scale)

    def config(self) -> dict[str, Any]:
        return {"width": self.in_features}


class _CachingScalePlugin:
    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register("test_caching_scale", _CachingScale)


def test_a_python_layer_s_caches_do_not_travel_in_the_pickle() -> None:
    # a registered Python layer whose training cache is batch-sized
    if "test_caching_scale" not in nnrt.available_layers():
        nnrt.register_plugin(_CachingScalePlugin(), name="test_caching_scale_plugin")
    net = nnrt.Sequential(
        [nnrt.layer("dense", 6, 8), nnrt.layer("test_caching_scale", 8), nnrt.layer("dense", 8, 2)],
        dtype="float64",
    )
    X = np.random.default_rng(6).normal(size=(20_000, 6))
    net.forward(X, training=True)
    net.predict(X)
    blob = pickle.dumps(net)
    state_bytes = sum(v.nbytes for v in net.state_dict().values())
    assert len(blob) < 2 * state_bytes + 16_384, (len(blob), state_bytes)
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.predict(X[:64]), net.predict(X[:64]))


def test_pickle_after_fit_with_a_local_loss_function() -> None:
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(64, 6)), rng.normal(size=(64, 4))

    def local_mse(Y: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
        diff = Y - target
        return float((diff**2).mean()), 2.0 * diff / diff.size

    net = _net()
    net.fit(X, y, loss=local_mse, epochs=1, progress=False)
    back = pickle.loads(pickle.dumps(net))
    np.testing.assert_array_equal(back.predict(X), net.predict(X))
    # a loss given by name is kept: evaluate's default stays the fitted loss
    net.fit(X, y, loss="mse", epochs=1, progress=False)
    back = pickle.loads(pickle.dumps(net))
    expected = float(((_reference(net.state_dict(), X) - y) ** 2).mean())
    assert back.evaluate(X, y)["loss"] == pytest.approx(expected, rel=1e-9)


def test_pickle_keeps_public_attributes_and_drops_private_ones() -> None:
    net = _net()
    net.note = "kept"  # type: ignore[attr-defined]
    net._scratch = np.zeros(10**5)  # type: ignore[attr-defined]  # private: dropped
    back = pickle.loads(pickle.dumps(net))
    assert back.note == "kept"
    assert not hasattr(back, "_scratch")
    X = np.random.default_rng(8).normal(size=(7, 6))
    np.testing.assert_array_equal(back.predict(X), net.predict(X))
    back.fit(X, np.arange(7) % 4, epochs=1, progress=False)  # trains after unpickling


# ----------------------------------------------------------------- optimizer steps
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_state_dict_never_sees_half_an_optimizer_step(name: str) -> None:
    # a manual loop's optimizer step writes the parameters one array after another;
    # it holds the network's lock, so a concurrent state_dict/save sees whole steps
    net = nnrt.Sequential(
        [nnrt.layer("dense", 6, 32), nnrt.layer("dense", 32, 32), nnrt.layer("dense", 32, 4)],
        dtype="float64",
    )
    for g in net.grads().values():
        g.fill(1.0)
    opt = nnrt.optim.SGD(net, lr=0.5) if name == "SGD" else nnrt.optim.Adam(net, lr=0.5)
    start = net.state_dict()
    stop = threading.Event()
    seen: list[dict[str, np.ndarray]] = []

    reading = threading.Event()

    def stepper() -> None:
        assert reading.wait(HANG_TIMEOUT)
        for _ in range(400):
            opt.step()
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            seen.append(net.state_dict())
            reading.set()

    _threads([stepper, reader])
    assert len(seen) > 1
    for state in seen:
        # SGD: p = p0 - 0.5 k; Adam with a constant gradient: p = p0 - 0.5 k as well
        # (m_hat / sqrt(v_hat) = 1 exactly up to eps): the same k in every array
        ks = {round(float(np.median((start[key] - v) / 0.5))) for key, v in state.items()}
        assert len(ks) == 1, f"state_dict saw parameters from different steps: {sorted(ks)}"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_protocols_copy_and_deepcopy_rebuild_real_layers(protocol: int) -> None:
    net = nnrt.Sequential(
        [nnrt.layer("dense", 6, 8), nnrt.layer("sync_batchnorm", 8), nnrt.layer("dense", 8, 2)],
        dtype="float64",
    )
    X = np.random.default_rng(9).normal(size=(5, 6))
    want = net.predict(X)
    back = pickle.loads(pickle.dumps(net, protocol=protocol))
    shallow = copy.copy(net)
    deep = copy.deepcopy(net)
    for other in (back, shallow, deep):
        assert [type(a) for a in other.layers] == [type(a) for a in net.layers]
        np.testing.assert_array_equal(other.predict(X), want)
    # a shallow copy shares the layer objects; pickles and deep copies do not
    assert all(a is b for a, b in zip(shallow.layers, net.layers, strict=True))
    assert shallow.layers is not net.layers
    assert not any(a is b for a, b in zip(deep.layers, net.layers, strict=True))


def test_fork_while_another_thread_holds_the_registry_lock_does_not_hang() -> None:
    # the whole scenario in a subprocess with a timeout: a hang fails, never blocks pytest
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, threading, time
        import nnrt
        from nnrt.registry import registry

        registry.ensure_loaded()
        held, release = threading.Event(), threading.Event()

        def holder():
            with registry._lock:
                held.set()
                release.wait(30)

        t = threading.Thread(target=holder)
        t.start()
        held.wait(30)
        pid = os.fork()
        if pid == 0:  # child: the registry must work although the lock was held at the fork
            try:
                nnrt.register_plugin(type("P", (), {})(), name="fork_child_plugin")
                assert nnrt.layer("dense", 2, 3).out_features == 3
                os._exit(0)
            except BaseException:
                os._exit(1)
        release.set()
        t.join()
        _, status = os.waitpid(pid, 0)
        raise SystemExit(os.waitstatus_to_exitcode(status))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_exports_wait_for_the_network_lock(kind: str, tmp_path: Any) -> None:
    # an export reads the weights under the network's lock: never half of a step
    import threading

    from nnrt._locks import holding

    if kind == "onnx":
        pytest.importorskip("onnx")
        from nnrt.onnx import export

        def run(net: Any) -> Any:
            return export(net, tmp_path / "m.onnx")
    else:
        pytest.importorskip("torch")

        def run(net: Any) -> Any:
            return net.to_torch()

    net = nnrt.Sequential([nnrt.layer("dense", 3, 4), nnrt.layer("dense", 4, 2)], seed=0)
    done = threading.Event()
    t = threading.Thread(target=lambda: (run(net), done.set()))
    with holding(net):
        t.start()
        assert not done.wait(0.3), "the export did not wait for the network's lock"
    t.join(60)
    assert done.is_set()
