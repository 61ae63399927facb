"""nnrt.engine: the one training loop (non-finite rewind, callbacks, data in).

References: a hand-written loop of forward / loss / backward / optimizer step
(the exact steps fit must take), numpy arrays for the data-in equivalences, and
tracemalloc for "never copied whole".
"""

from __future__ import annotations

import contextlib
import copy
import io
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.engine import TrainStep, has_batch_statistics


def _bn_net(dtype: str = "float32", n_in: int = 6) -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", n_in, 8),
            nnrt.layer("batchnorm", 8),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 8, 3),
        ],
        seed=0,
        dtype=dtype,
    )


def _blobs(n: int = 90, n_in: int = 6, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    X = rng.normal(size=(n, n_in)) + y[:, None]
    return X, y


def _same_state(a: nnrt.Sequential, b: nnrt.Sequential) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].tobytes() == sb[k].tobytes() for k in sa)


# ----------------------------------------------------------- non-finite rewind
@pytest.mark.parametrize(("lr", "where"), [(0.15, 2), (1.0, 0)], ids=["mid-epoch", "epoch-start"])
def test_non_finite_loss_restores_weights_and_optimizer_state(lr: float, where: int) -> None:
    # 4 batches per epoch, in order; SGD with momentum diverges after some epochs. The
    # reference loop records the weights and the optimizer state before every step.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 4)) * 10
    T = rng.normal(size=(16, 2)) * 10

    def make() -> tuple[nnrt.Sequential, nnrt.optim.SGD]:
        net = nnrt.Sequential([nnrt.layer("dense", 4, 2)], seed=0, dtype="float64")
        return net, nnrt.optim.SGD(net, lr=lr, momentum=0.9)

    ref, ref_opt = make()
    weights, opt_states, losses = [], [], []
    with np.errstate(all="ignore"):
        for s in range(2000):
            b = s % 4
            weights.append(ref.state_dict())
            opt_states.append(ref_opt.state_dict())
            value, dY = nnrt.losses.mse(
                ref.forward(X[4 * b : 4 * b + 4], training=True), T[4 * b : 4 * b + 4]
            )
            losses.append(value)
            if not np.isfinite(value):
                break
            ref.backward(dY)
            ref_opt.step()
    k = len(losses) - 1
    assert not np.isfinite(losses[k]) and np.isfinite(losses[k - 1])
    assert k % 4 == where and k >= 8  # the case this parameter is about

    net, opt = make()
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="last finite loss"):
        net.fit(
            X,
            T,
            loss="mse",
            optimizer=opt,
            epochs=1000,
            batch_size=4,
            shuffle=False,
            progress=False,
        )
    got = net.state_dict()
    for key, want in weights[k - 1].items():
        assert np.array_equal(got[key], want), key
    # the optimizer is back where it was too (momentum buffers, step count)
    want_opt, got_opt = opt_states[k - 1], opt.state_dict()
    assert got_opt["step"] == want_opt["step"]
    for name, st in want_opt["state"].items():
        for key, arr in st.items():
            assert np.array_equal(got_opt["state"][name][key], arr), (name, key)


@pytest.mark.parametrize("lr", [3e36, 2e36], ids=["first-epoch", "fourth-epoch"])
def test_non_finite_in_the_compiled_loop_rewinds_like_the_python_loop(lr: float) -> None:
    # plain SGD + the built-in loss: fit's chunks run in compiled code
    # (TrainStep.run); a non-finite loss there (float32 logits overflow) must rewind
    # exactly as the Python loop does: to the weights that gave the last finite loss
    rng = np.random.default_rng(1)
    X = (rng.normal(size=(24, 4)) * 10).astype(np.float32)
    y = rng.integers(0, 3, size=24)

    def make() -> tuple[nnrt.Sequential, nnrt.optim.SGD]:
        net = nnrt.Sequential([nnrt.layer("dense", 4, 3)], seed=0, dtype="float32")
        return net, nnrt.optim.SGD(net, lr=lr)

    ref, ref_opt = make()
    weights, losses = [], []
    with np.errstate(all="ignore"):
        for s in range(300):
            b = s % 6
            weights.append(ref.state_dict())
            value, dY = nnrt.losses.softmax_cross_entropy(
                ref.forward(X[4 * b : 4 * b + 4], training=True), y[4 * b : 4 * b + 4]
            )
            losses.append(value)
            if not np.isfinite(value):
                break
            ref.backward(dY)
            ref_opt.step()
    k = len(losses) - 1
    assert not np.isfinite(losses[k]) and k >= 5  # a few steps to replay

    net, opt = make()
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="last finite loss"):
        net.fit(X, y, optimizer=opt, epochs=100, batch_size=4, shuffle=False, progress=False)
    got = net.state_dict()
    for key, want in weights[k - 1].items():
        assert np.array_equal(got[key], want), key
    assert opt.step_count == k - 1


def test_non_finite_on_the_first_step_keeps_initial_weights() -> None:
    X = np.full((8, 4), 1e300)
    net = nnrt.Sequential([nnrt.layer("dense", 4, 2)], seed=0, dtype="float64")
    before = net.state_dict()
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="no loss was finite"):
        net.fit(X, np.zeros((8, 2)), loss="mse", epochs=2, batch_size=4, progress=False)
    assert all(np.array_equal(before[k], v) for k, v in net.state_dict().items())


# ----------------------------------------------------------- the step and its rules
def test_train_step_is_forward_loss_backward_update() -> None:
    X, y = _blobs(32)
    net, ref = _bn_net("float64"), _bn_net("float64")
    step = TrainStep(net, nnrt.optim.SGD(net, lr=0.1), "softmax_cross_entropy", count_correct=True)
    loss, correct = step(X, y)
    ref_opt = nnrt.optim.SGD(ref, lr=0.1)
    Y = ref.forward(X, training=True)
    want_loss, dY = nnrt.losses.softmax_cross_entropy(Y, y)
    assert correct == int(np.sum(Y.argmax(axis=1) == y))
    ref.backward(dY)
    ref_opt.step()
    assert loss == want_loss and _same_state(net, ref)


def test_short_batch_rule_follows_the_class_attribute() -> None:
    class Recorder(nnrt.Layer):
        uses_batch_statistics = True

        def __init__(self) -> None:
            super().__init__()
            self.in_features = self.out_features = None
            self.sizes: list[int] = []

        def forward(self, X: Any, training: bool = False) -> np.ndarray:
            if training:
                self.sizes.append(len(X))
            return np.asarray(X)

        def backward(self, dY: Any) -> np.ndarray:
            return np.asarray(dY)

    rec = Recorder()
    net = nnrt.Sequential([nnrt.layer("dense", 6, 3), rec], seed=0)
    assert has_batch_statistics(net) and has_batch_statistics(_bn_net())
    assert not has_batch_statistics(nnrt.Sequential([nnrt.layer("dense", 2, 2)]))
    X, y = _blobs(17)
    with pytest.warns(nnrt.TrainingWarning, match="mini-batch of 1 sample"):
        hist = net.fit(X, y, epochs=2, batch_size=8, progress=False)
    assert rec.sizes == [8, 8, 8, 8] and hist.params["skipped"] == 1
    with pytest.raises(ValueError, match="1 sample left for training"):
        net.fit(X[:1], y[:1], progress=False)


# ----------------------------------------------------------- callbacks
def test_checkpoint_and_per_batch_callbacks(tmp_path: Path) -> None:
    X, y = _blobs(40)
    net = _bn_net()
    seen: list[tuple[int, int]] = []
    saved: list[dict[str, np.ndarray]] = []

    class Batches(nnrt.Callback):
        def on_batch_end(self, state: Any, epoch: int, batch: int, loss: float) -> None:
            assert np.isfinite(loss)
            seen.append((epoch, batch))

        def on_epoch_end(self, state: Any, epoch: int, logs: dict[str, float]) -> None:
            saved.append(state.net.state_dict())

    path = tmp_path / "ckpt.npz"
    with pytest.raises(ValueError, match="every"):
        nnrt.Checkpoint(path, every=0)
    net.fit(
        X,
        y,
        epochs=4,
        batch_size=16,
        callbacks=[nnrt.Checkpoint(path, every=2), Batches()],
        progress=False,
    )
    assert seen == [(e, b) for e in range(4) for b in range(3)]
    loaded = nnrt.load(path)  # written after epochs 1 and 3: the last one stays
    assert all(np.array_equal(v, saved[3][k]) for k, v in loaded.state_dict().items())


def test_progress_bar_draws_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    X, y = _blobs(40)
    hist = _bn_net().fit(X, y, epochs=2, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "epoch 2/2" in err and "6/6" in err and len(hist.epoch) == 2


# ----------------------------------------------------------- data in
def _fit_state(X: Any, y: Any, **kwargs: Any) -> nnrt.Sequential:
    net = _bn_net()
    net.fit(X, y, epochs=2, batch_size=16, progress=False, **kwargs)
    return net


def test_memory_mapped_npy_is_read_batch_by_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40_000, 50))  # float64, 16 MB, for a float32 network
    y = rng.integers(0, 3, size=40_000)
    np.save(tmp_path / "X.npy", X)
    Xm = np.load(tmp_path / "X.npy", mmap_mode="r")
    net = nnrt.Sequential(
        [nnrt.layer("dense", 50, 16), nnrt.layer("sigmoid"), nnrt.layer("dense", 16, 3)], seed=0
    )
    ref = nnrt.Sequential(
        [nnrt.layer("dense", 50, 16), nnrt.layer("sigmoid"), nnrt.layer("dense", 16, 3)], seed=0
    )
    tracemalloc.start()
    try:
        hist = net.fit(
            Xm, y, epochs=1, batch_size=256, validation=(Xm[:5000], y[:5000]), progress=False
        )
        scores = net.predict(Xm)
        result = net.evaluate(Xm, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # no copy of X (16 MB, or 8 MB cast to float32): batches, the chunked NaN scan and
    # the (40000, 3) scores are all that is allocated
    assert peak < 3 * 2**20, peak
    ref_hist = ref.fit(
        X.astype(np.float32),
        y,
        epochs=1,
        batch_size=256,
        validation=(X[:5000], y[:5000]),
        progress=False,
    )
    assert _same_state(net, ref) and hist.history == ref_hist.history
    assert np.array_equal(scores, ref.predict(X))
    assert result == ref.evaluate(X, y)


def test_pandas_frames_and_series() -> None:
    pd = pytest.importorskip("pandas")
    X, y = _blobs(70)
    ref = _fit_state(X, y, validation=(X[:20], y[:20]))
    # one dtype: a view of the frame's block (Fortran-ordered)
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(6)])
    got = _fit_state(df, pd.Series(y), validation=(df.iloc[:20], pd.Series(y[:20])))
    assert _same_state(got, ref)
    np.testing.assert_array_equal(got.predict(df), ref.predict(X))
    assert got.evaluate(df, pd.Series(y)) == ref.evaluate(X, y)
    # mixed dtypes: read column by column, cast per batch
    mixed = df.copy()
    mixed["f0"] = mixed["f0"].astype(np.float32)
    mixed["f5"] = (X[:, 5] > 0).astype(np.int64)
    Xmixed = np.column_stack([X[:, 0].astype(np.float32), X[:, 1:5], (X[:, 5] > 0)]).astype(
        np.float64
    )
    got = _fit_state(mixed, y)
    assert _same_state(got, _fit_state(Xmixed, y))
    np.testing.assert_array_equal(got.predict(mixed), got.predict(Xmixed))
    # what cannot be a feature is named
    bad = df.assign(f3=["a"] * 70)
    with pytest.raises(TypeError, match="column 'f3'"):
        _bn_net().fit(bad, y, progress=False)
    nan = df.copy()
    nan.iloc[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\(4, 2\)"):
        _bn_net().fit(nan, y, progress=False)


def test_progress_bar_names_the_held_out_data() -> None:
    # the demo's held-out digits are a test set: the bar shows test_accuracy
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 4))
    y = (X[:, 0] > 0).astype(np.int64)
    net = nnrt.Sequential([nnrt.layer("dense", 4, 2)], seed=0)
    bar = nnrt.ProgressBar(held_out="test")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        net.fit(X, y, epochs=1, validation=(X, y), progress=False, callbacks=[bar])
    text = err.getvalue()
    assert "test_accuracy" in text and "val_accuracy" not in text, text
    assert bar._label("val_loss") == "test_loss" and bar._label("loss") == "loss"
    assert nnrt.ProgressBar()._label("val_loss") == "val_loss"


# ----------------------------------------------------------- the epoch, step by step
@pytest.mark.parametrize("momentum", [0.9, 0.0], ids=["python-step", "compiled-step"])
@pytest.mark.parametrize(
    "layout", ["c-contiguous", "fortran", "cast-from-float32", "int32-labels", "large"]
)
def test_fit_is_the_hand_written_shuffled_loop(layout: str, momentum: float) -> None:
    # Reference: one generator seeded with the network's seed, a permutation per epoch,
    # batch b = the rows order[b*bs:(b+1)*bs] in increasing index order, a short last
    # batch of >= 2 rows kept; History's loss is the batch-size-weighted mean, accuracy
    # the argmax count of the training-mode outputs (numpy, before each update).
    # "large": a data set of several MB, whose next batch fit's compiled epoch has
    # prefetched by nnrt's GEMM kernel while a batch trains (a prefetch changes nothing).
    n_in = 2000 if layout == "large" else 6
    X, y = _blobs(333 if layout == "large" else 77, n_in=n_in, seed=4)
    if layout == "fortran":
        X = np.asfortranarray(X)
    elif layout == "cast-from-float32":
        X = X.astype(np.float32)
    elif layout == "int32-labels":
        y = y.astype(np.int32)
    net, ref = _bn_net("float64", n_in), _bn_net("float64", n_in)
    opt = nnrt.optim.SGD(net, lr=0.1, momentum=momentum)
    ref_opt = nnrt.optim.SGD(ref, lr=0.1, momentum=momentum)
    bs, epochs = 16, 3
    if layout == "large":
        assert X.nbytes >= 4 << 20
    rng = np.random.default_rng(ref.seed)
    want_loss, want_acc = [], []
    for _ in range(epochs):
        order = rng.permutation(len(X))
        total, right = 0.0, 0
        for b in range(0, len(X), bs):
            rows = np.sort(order[b : b + bs])
            Y = ref.forward(X[rows].astype(np.float64), training=True)
            right += int(np.sum(Y.argmax(axis=1) == y[rows]))
            value, dY = nnrt.losses.softmax_cross_entropy(Y, y[rows].astype(np.int64))
            total += value * len(rows)
            ref.backward(dY)
            ref_opt.step()
        want_loss.append(total / len(X))
        want_acc.append(right / len(X))
    hist = net.fit(X, y, optimizer=opt, epochs=epochs, batch_size=bs, progress=False)
    assert _same_state(net, ref)
    assert hist.history["loss"] == want_loss
    assert hist.history["accuracy"] == want_acc


# ----------------------------------------------------------- compiled helpers
def test_n_correct_counts_like_numpy_argmax() -> None:
    from nnrt._engine import n_correct
    from nnrt._kernels import softmax_cross_entropy

    rng = np.random.default_rng(5)
    for dtype in (np.float32, np.float64):
        for c in (1, 2, 7):
            Y = rng.normal(size=(50, c)).astype(dtype)
            Y[3] = 0.5  # a tie: the first maximum wins, as argmax
            Y[4, c // 2] = np.nan  # a NaN wins, as argmax
            labels = rng.integers(0, max(c, 2), size=50)
            pred = (Y[:, 0] > 0).astype(np.int64) if c == 1 else Y.argmax(axis=1)
            want = int(np.sum(pred == labels))
            assert n_correct(Y, labels) == want
            assert n_correct(np.asfortranarray(Y), labels.astype(np.int32)) == want
            assert n_correct(Y[::-1], labels[::-1]) == want
    # every row of 3 values from {-inf, -1, 0, 1, inf, nan} (ties, NaN before, at and
    # after the label, infinities) against every label, out-of-range ones included
    vals = np.array([-np.inf, -1.0, 0.0, 1.0, np.inf, np.nan])
    grid = np.array(np.meshgrid(vals, vals, vals, indexing="ij")).reshape(3, -1).T
    for dtype in (np.float32, np.float64):
        Y = np.repeat(grid, 5, axis=0).astype(dtype)
        labels = np.tile(np.arange(-1, 4), len(grid))
        want = int(np.sum(Y.argmax(axis=1) == labels))
        assert n_correct(Y, labels) == want
        # the same through the loss kernel (which takes in-range labels only)
        keep = (labels >= 0) & (labels < 3)
        Yk, lk = np.ascontiguousarray(Y[keep]), labels[keep]
        with np.errstate(all="ignore"):
            got = softmax_cross_entropy(Yk, lk, True)
        assert got is not None and got[2] == int(np.sum(Yk.argmax(axis=1) == lk))
    assert n_correct(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == 0
    with pytest.raises(ValueError, match="labels must be 1-D with 3 entries"):
        n_correct(np.zeros((3, 2)), np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="Y must be 2-D"):
        n_correct(np.zeros(3), np.zeros(3, dtype=np.int64))


def test_take_rows_is_np_take_or_declines(tmp_path: Path) -> None:
    from nnrt._engine import take_rows

    rng = np.random.default_rng(6)
    idx = np.array([7, 0, 7, 19, 3], dtype=np.intp)
    for src in (
        rng.normal(size=(20, 9)).astype(np.float32),
        rng.normal(size=(20, 3, 2)),
        rng.integers(0, 9, size=20),
        rng.normal(size=(20, 1500)),  # rows longer than the prefetched part
    ):
        out = np.full((len(idx), *src.shape[1:]), -1, dtype=src.dtype)
        assert take_rows(src, idx, out) is True
        np.testing.assert_array_equal(out, src[idx])
    mm = np.lib.format.open_memmap(tmp_path / "m.npy", mode="w+", dtype=np.float64, shape=(20, 4))
    mm[:] = rng.normal(size=(20, 4))
    out = np.empty((len(idx), 4))
    assert take_rows(mm, idx, out) is True
    np.testing.assert_array_equal(out, np.asarray(mm)[idx])
    # anything but C-contiguous, same dtype and row shape, writeable out, intp indices
    X = rng.normal(size=(20, 4))
    ro = np.empty((len(idx), 4))
    ro.flags.writeable = False
    for args in (
        (np.asfortranarray(X), idx, np.empty((5, 4))),
        (X, idx, np.empty((5, 4), dtype=np.float32)),
        (X, idx, np.empty((5, 3))),
        (X, idx, np.empty((4, 4))),
        (X, idx.astype(np.int32), np.empty((5, 4))),
        (X, list(idx), np.empty((5, 4))),
        (X, idx, ro),
        (X.astype(object), idx, np.empty((5, 4), dtype=object)),
    ):
        assert take_rows(*args) is False
    for bad in (20, -1):
        out = np.zeros((1, 4))
        with pytest.raises(IndexError, match="out of bounds for 20 rows"):
            take_rows(X, np.array([bad], dtype=np.intp), out)
        assert not out.any()


def test_take_rows_check_finds_every_non_finite_row() -> None:
    from nnrt._engine import NonFinite, take_rows

    rng = np.random.default_rng(7)
    idx = np.array([3, 11, 0, 11, 5], dtype=np.intp)
    for dtype in (np.float32, np.float64):
        info = np.finfo(dtype)
        src = rng.normal(size=(12, 37)).astype(dtype)
        # extremes that are finite: no false alarm
        src[3, 0], src[3, 36], src[0, 5] = info.max, -info.max, info.smallest_subnormal
        out = np.empty((len(idx), 37), dtype=dtype)
        assert take_rows(src, idx, out, True) is True
        np.testing.assert_array_equal(out, src[idx])
        for value in (np.nan, np.inf, -np.inf, -np.nan):
            for col in (0, 17, 36):
                bad = src.copy()
                bad[11, col] = value
                with pytest.raises(NonFinite) as exc:
                    take_rows(bad, idx, np.empty_like(out), True)
                assert exc.value.row == 11 and isinstance(exc.value, ValueError)
                bad = src.copy()
                bad[7, col] = value  # a row not gathered
                assert take_rows(bad, idx, np.empty_like(out), True) is True
    # the copy itself (the checking copy is not memcpy): bit for bit at every row length
    # around the vector widths, signed zeros and subnormals included
    for dtype in (np.float32, np.float64):
        for cols in (1, 3, 7, 8, 9, 15, 16, 17, 1500):
            src = rng.normal(size=(12, cols)).astype(dtype)
            src[3, 0], src[5, -1] = -0.0, np.finfo(dtype).smallest_subnormal
            out = np.empty((len(idx), cols), dtype=dtype)
            assert take_rows(src, idx, out, True) is True
            assert out.tobytes() == src[idx].tobytes()
    # the scan needs float rows and an aligned out; else the caller scans
    ints = rng.integers(0, 9, size=(12, 4))
    assert take_rows(ints, idx, np.empty((5, 4), dtype=ints.dtype), True) is False
    raw = np.empty(5 * 4 * 8 + 1, dtype=np.uint8)[1:].view(np.float64).reshape(5, 4)
    assert not raw.flags.aligned
    assert take_rows(rng.normal(size=(12, 4)), idx, raw, True) is False


@pytest.mark.parametrize("threads", [1, 2])
def test_take_rows_split_over_two_threads_copies_and_checks_like_one(threads: int) -> None:
    # a gather large enough to be split with nnrt's helper thread (when two threads are
    # allowed): the same bytes as np.take, and the first bad row in index order named
    from nnrt import _parallel
    from nnrt._engine import NonFinite, take_rows

    rng = np.random.default_rng(8)
    src = rng.normal(size=(600, 1024)).astype(np.float32)  # rows of 4 KB
    idx = np.sort(rng.choice(600, size=256, replace=False)).astype(np.intp)
    out = np.empty((256, 1024), dtype=np.float32)
    try:
        nnrt.set_num_threads(threads)
        jobs = _parallel.stats()["jobs"]
        for check in (False, True):
            out[:] = np.nan
            assert take_rows(src, idx, out, check) is True
            assert out.tobytes() == src[idx].tobytes()
        if threads == 2:
            assert _parallel.stats()["jobs"] > jobs  # the split ran
        # NaN/Inf in two gathered rows, one in each half: the first in idx order is named
        for first, second in ((10, 200), (200, 250), (0, 255)):
            bad = src.copy()
            bad[idx[first], 5] = np.nan
            bad[idx[second], 1023] = np.inf
            with pytest.raises(NonFinite) as exc:
                take_rows(bad, idx, out, True)
            assert exc.value.row == idx[first]
    finally:
        nnrt.set_num_threads(None)


def _opt_bytes(state: Any) -> list[bytes]:
    # an optimizer's state_dict, flattened to bytes (keys and arrays, in order)
    if isinstance(state, dict):
        return [
            b for k in sorted(state, key=str) for b in [repr(k).encode(), *_opt_bytes(state[k])]
        ]
    if isinstance(state, (list, tuple)):
        return [b for item in state for b in _opt_bytes(item)]
    return [np.asarray(state).tobytes()]


@pytest.mark.filterwarnings("ignore::nnrt.TrainingWarning")
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])  # sgd: fit's compiled epoch
@pytest.mark.parametrize(
    "case", ["last-batch", "first-batch", "skipped-row", "split-tail", "in-order", "cast"]
)
def test_nan_in_x_found_in_first_epoch_restores_network_and_optimizer(
    case: str, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A NaN/Inf in X is found as the first epoch gathers its rows (or before, where the
    # rows are never gathered); fit raises ValueError naming the entry, and the network
    # and the optimizer are bit for bit as before fit. The optimizer has state already
    # (a previous fit), so "as before" is not "as new". One batch is gathered at a time
    # (as for wide rows), so a NaN in the last batch is found after two steps.
    monkeypatch.setattr(nnrt.engine, "_CHUNK_BYTES", 1)
    X, y = _blobs(97)  # 97 = 3 batches of 32 + 1 row: skipped under batchnorm
    X = X.astype(np.float32)
    net = _bn_net()
    Opt = nnrt.optim.Adam if optimizer == "adam" else nnrt.optim.SGD
    opt = Opt(net, lr=0.01)
    net.fit(X, y, optimizer=opt, epochs=2, progress=False)
    before, opt_before = net.state_dict(), copy.deepcopy(opt.state_dict())
    kwargs: dict[str, Any] = {}
    order = np.random.default_rng(net.seed).permutation(97)  # fit's first epoch
    if case == "last-batch":
        row, col = int(order[95]), 4  # last row of the last full batch
    elif case == "first-batch":
        row, col = int(order[0]), 0
    elif case == "skipped-row":
        row, col = int(order[96]), 5  # the row the short last batch would hold
    elif case == "split-tail":
        row, col = 95, 2
        kwargs["validation_split"] = 0.1
    elif case == "in-order":
        row, col = 95, 1
        kwargs["shuffle"] = False
    else:  # float64 data for a float32 network: scanned before training
        X = X.astype(np.float64)
        row, col = 60, 3
    X[row, col] = np.inf if case == "first-batch" else np.nan
    seen: list[int] = []
    cb = nnrt.engine.LambdaCallback(on_epoch_end=lambda s, e, logs: seen.append(e))
    with pytest.raises(
        ValueError, match=rf"fit: X: contains 1 non-finite .* \({row}, {col}\)"
    ) as info:
        net.fit(X, y, optimizer=opt, epochs=3, progress=False, callbacks=[cb], **kwargs)
    assert seen == []  # no epoch ended
    assert info.value.__suppress_context__ or info.value.__context__ is None  # one error shown
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(before[k].tobytes() == after[k].tobytes() for k in before)
    assert _opt_bytes(opt.state_dict()) == _opt_bytes(opt_before)
    # and it trains on as if nothing had happened
    X[row, col] = 0.0
    ref = _bn_net()
    ref.load_state_dict(before)
    ref_opt = Opt(ref, lr=0.01)
    ref_opt.load_state_dict(opt_before)
    net.fit(X, y, optimizer=opt, epochs=1, progress=False, **kwargs)
    ref.fit(X, y, optimizer=ref_opt, epochs=1, progress=False, **kwargs)
    assert _same_state(net, ref)


def _wide_net(n_in: int) -> nnrt.Sequential:
    return nnrt.Sequential(
        [nnrt.layer("dense_nobias", n_in, 16), nnrt.layer("batchnorm", 16),
         nnrt.layer("sigmoid"), nnrt.layer("dense", 16, 3)],
        seed=0, dtype="float64",
    )  # fmt: skip


@pytest.mark.parametrize("threads", [1, 2])
def test_background_gather_of_the_next_batch_is_the_hand_written_loop(threads: int) -> None:
    # batches of >= 64 KB of X: with two threads the compiled epoch gathers each next
    # batch on nnrt's helper thread into a second buffer while one trains. Same bits as
    # the hand-written loop; a NaN in a batch gathered so is reported at that batch,
    # with the network and optimizer back to their state before fit.
    from nnrt import _parallel

    X, y = _blobs(32 * 10 + 5, n_in=300, seed=3)  # 32 x 300 float64 = 75 KB a batch
    net, ref = _wide_net(300), _wide_net(300)
    opt, ref_opt = nnrt.optim.SGD(net, lr=0.05), nnrt.optim.SGD(ref, lr=0.05)
    rng = np.random.default_rng(ref.seed)
    want = []
    for _ in range(2):
        order = rng.permutation(len(X))
        total = 0.0
        for b in range(0, len(X), 32):
            rows = np.sort(order[b : b + 32])
            value, dY = nnrt.losses.softmax_cross_entropy(
                ref.forward(X[rows], training=True), y[rows]
            )
            total += value * len(rows)
            ref.backward(dY)
            ref_opt.step()
        want.append(total / len(X))
    try:
        nnrt.set_num_threads(threads)
        posted = _parallel.stats()["background_jobs"]
        hist = net.fit(X, y, optimizer=opt, epochs=2, batch_size=32, progress=False)
        posted = _parallel.stats()["background_jobs"] - posted
        assert hist.history["loss"] == want
        assert _same_state(net, ref)
        assert posted == (2 * 9 if threads == 2 else 0)  # every full batch but the first
        # a NaN in the 5th batch of the next fit's first epoch
        before, opt_before = net.state_dict(), copy.deepcopy(opt.state_dict())
        order = np.random.default_rng(net.seed).permutation(len(X))
        row = int(np.sort(order[4 * 32 : 5 * 32])[7])
        X[row, 123] = np.nan
        with pytest.raises(ValueError, match=rf"fit: X: contains 1 non-finite .* \({row}, 123\)"):
            net.fit(X, y, optimizer=opt, epochs=2, batch_size=32, progress=False)
        assert all(v.tobytes() == net.state_dict()[k].tobytes() for k, v in before.items())
        assert _opt_bytes(opt.state_dict()) == _opt_bytes(opt_before)
    finally:
        nnrt.set_num_threads(None)


@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_epoch_pins_x_and_its_buffers_against_resizing(threads: int) -> None:
    # the compiled epoch's gathers run after their set-up (in the background, or inside
    # the step after GEMMs that released the GIL): another thread resizing X or a batch
    # buffer meanwhile, even with refcheck=False, would move memory from under them.
    # numpy refuses while the epoch holds a weak reference to each owner. The "lock"
    # handed to the epoch tries the resizes at every step (from the stepping thread:
    # the same refusal as from another one) and the training still matches fit's.
    from nnrt._engine import sgd_sce_epoch
    from nnrt.engine import softmax_cross_entropy
    from nnrt.optim import _check_live

    X, y = _blobs(32 * 6, n_in=300, seed=2)
    order = np.random.default_rng(0).permutation(len(X))
    rows = np.sort(order.reshape(6, 32), axis=1)
    bufs = [nnrt.engine._aligned_empty((32, 300), np.dtype(np.float64)) for _ in range(2)]
    yb = np.empty(32, dtype=y.dtype)

    def owner(a: np.ndarray) -> np.ndarray:
        while not a.flags.owndata:
            a = a.base
        return a

    owners = [owner(X), owner(bufs[0]), owner(bufs[1])]
    refused: list[str] = []

    class ResizingLock:
        def acquire(self) -> None:
            for o in owners:
                try:
                    o.resize(o.shape[0] // 2, refcheck=False)
                    refused.append("resized")
                except ValueError:
                    refused.append("refused")

        def release(self) -> None:
            pass

    net, ref = _wide_net(300), _wide_net(300)
    opt, ref_opt = nnrt.optim.SGD(net, lr=0.05), nnrt.optim.SGD(ref, lr=0.05)
    try:
        nnrt.set_num_threads(threads)
        done, _, _, bad = sgd_sce_epoch(
            net, opt, softmax_cross_entropy, _check_live, ResizingLock(), X, y, rows, 0,
            bufs[0], yb, True, 0.0, 0, bufs[1],
        )  # fmt: skip
    finally:
        nnrt.set_num_threads(None)
    assert (done, bad) == (6, None)
    assert refused == ["refused"] * 18
    for r in rows:
        _, dY = nnrt.losses.softmax_cross_entropy(ref.forward(X[r], training=True), y[r])
        ref.backward(dY)
        ref_opt.step()
    assert _same_state(net, ref)
    # the row indices: a gather copies its batch's when it is set up, so rows changed
    # meanwhile (here: made out of bounds at each step) end in a clean IndexError at
    # the next batch's y, never in a read outside X
    owners.clear()

    class RowsLock(ResizingLock):
        def acquire(self) -> None:
            rows[1:] = 10**9

    try:
        nnrt.set_num_threads(threads)
        with pytest.raises(IndexError, match="out of bounds"):
            sgd_sce_epoch(
                net, opt, softmax_cross_entropy, _check_live, RowsLock(), X, y, rows, 0,
                bufs[0], yb, True, 0.0, 0, bufs[1],
            )  # fmt: skip
    finally:
        nnrt.set_num_threads(None)
    X.resize(10, 300, refcheck=False)  # released when the epoch returned
    # fit's own buffers (the chunk loop's too, which the first layer may keep) stay pinned
    for buf in bufs + [nnrt.engine._Rows(X[:4], net, "X").buffer(2)[0]]:
        with pytest.raises(ValueError, match="cannot resize"):
            owner(buf).resize(1, refcheck=False)


def test_background_gathers_of_two_threads_fits_at_once() -> None:
    # two Python threads fit two networks at once with two nnrt threads allowed: one
    # background gather at a time (the other thread gathers its batch itself); every
    # network ends with the bits of the same fit run alone
    import threading

    X, y = _blobs(32 * 12, n_in=300, seed=5)
    alone = []
    for seed in range(4):
        net = _wide_net(300)
        net.seed = seed
        net.fit(X, y, optimizer=nnrt.optim.SGD(net, lr=0.05), epochs=2, batch_size=32,
                progress=False)  # fmt: skip
        alone.append(net.state_dict())
    nets = [_wide_net(300) for _ in range(4)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            nets[i].seed = i
            nets[i].fit(X, y, optimizer=nnrt.optim.SGD(nets[i], lr=0.05), epochs=2,
                        batch_size=32, progress=False)  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    try:
        nnrt.set_num_threads(2)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        nnrt.set_num_threads(None)
    assert not errors
    for net, want in zip(nets, alone, strict=True):
        got = net.state_dict()
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_repeated_fits_reuse_their_workspace_and_stay_the_hand_written_loop() -> None:
    # fit keeps its seeded generator, rewind copy and batch buffers on the network for
    # the next call (nnrt.engine._Workspace): every call still starts the stream of
    # np.random.default_rng(seed) afresh, and a call of another batch size, seed, dtype
    # or layer list gets buffers of its own shape. Reference: the hand-written loop.
    X, y = _blobs(70, seed=9)
    net, ref = _bn_net("float64"), _bn_net("float64")
    opt = nnrt.optim.SGD(net, lr=0.1)
    ref_opt = nnrt.optim.SGD(ref, lr=0.1)

    def ref_epoch(seed: int, bs: int) -> float:
        order = np.random.default_rng(seed).permutation(len(X))
        total = 0.0
        for b in range(0, len(X), bs):
            rows = np.sort(order[b : b + bs])
            value, dY = nnrt.losses.softmax_cross_entropy(
                ref.forward(X[rows], training=True), y[rows]
            )
            total += value * len(rows)
            ref.backward(dY)
            ref_opt.step()
        return total / len(X)

    for seed, bs in [(None, 16), (None, 16), (3, 16), (None, 10), (None, 16), (3, 16)]:
        want = ref_epoch(ref.seed if seed is None else seed, bs)
        hist = net.fit(X, y, optimizer=opt, batch_size=bs, seed=seed, progress=False)
        assert hist.history["loss"] == [want]
        assert _same_state(net, ref)
    space = net.__dict__["_fit_workspace"]
    assert space.arrays is not None and set(space.kept) == {"X", "y"}
    kept = [a.ctypes.data for a in space.arrays]
    net.fit(X, y, optimizer=opt, batch_size=16, progress=False)
    assert [a.ctypes.data for a in space.arrays] == kept  # reused, not reallocated
    ref_epoch(ref.seed, 16)
    # another layer list: new arrays of the new shapes (and a new optimizer)
    for m in (net, ref):
        m.layers[-1] = nnrt.layer("dense_nobias", 8, 3)
    ref.load_state_dict(net.state_dict())
    opt, ref_opt = nnrt.optim.SGD(net, lr=0.1), nnrt.optim.SGD(ref, lr=0.1)
    want = ref_epoch(ref.seed, 16)
    assert net.fit(X, y, optimizer=opt, batch_size=16, progress=False).history["loss"] == [want]
    assert _same_state(net, ref)
    assert len(space.arrays) == len(kept) - 1
    # private: neither pickled nor copied
    assert "_fit_workspace" not in copy.deepcopy(net).__dict__
    assert "_fit_workspace" not in copy.copy(net).__dict__


def test_softmax_ce_kernel_counts_like_numpy_argmax() -> None:
    # the training step's fused loss + accuracy call: the count is numpy's argmax count
    # (ties: the first maximum; a NaN row predicts its NaN's column), and the loss and
    # dY are those of the call without the count
    from nnrt._kernels import softmax_cross_entropy as kernel

    rng = np.random.default_rng(6)
    for dtype in (np.float32, np.float64):
        for c in (2, 7):
            Y = rng.normal(size=(40, c)).astype(dtype)
            Y[3] = 0.5
            Y[4, c // 2] = np.nan
            labels = rng.integers(0, c, size=40)
            labels[3] = 0
            with np.errstate(invalid="ignore"):
                loss, dY, right = kernel(Y, labels, True)
                loss2, dY2 = kernel(Y, labels)
            assert right == int(np.sum(Y.argmax(axis=1) == labels))
            assert np.array_equal(dY, dY2, equal_nan=True)
            assert loss == loss2 or (np.isnan(loss) and np.isnan(loss2))
    assert kernel(np.zeros((3, 2)), np.array([0, 1, 2]), True) is None  # label out of range


def test_train_step_refuses_an_optimizer_whose_arrays_were_replaced() -> None:
    # the step's optimizer call (without the lock taken twice) keeps the check that the
    # optimizer's arrays are still the network's live parameters
    X, y = _blobs(16)
    net = _bn_net("float64")
    step = TrainStep(net, nnrt.optim.SGD(net, lr=0.1))
    step(X, y)
    net[3].to_dtype("float32")
    net[3].to_dtype("float64")  # new arrays, same dtype: only the identity check sees it
    with pytest.raises(RuntimeError, match="were replaced"):
        step(X, y)
    other = _bn_net("float64")
    step = TrainStep(other, nnrt.optim.SGD(net, lr=0.1))  # another network's optimizer
    step(X, y)  # its step is the optimizer's own, under its own network's lock


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_common_step_is_the_general_step(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SGD without momentum and the built-in loss take one compiled call
    # (nnrt._engine.sgd_sce_step); a loss given as another function takes the general
    # Python path. Both must give the same losses, counts and weights, bit for bit.
    X, y = _blobs(48)
    X = X.astype(dtype)
    nets = [_bn_net(dtype), _bn_net(dtype)]
    losses = ["softmax_cross_entropy", lambda Y, t: nnrt.losses.softmax_cross_entropy(Y, t)]
    steps = [
        TrainStep(net, nnrt.optim.SGD(net, lr=0.2, weight_decay=0.01), loss, count_correct=True)
        for net, loss in zip(nets, losses, strict=True)
    ]
    from nnrt import engine

    taken: list[object] = []
    compiled = engine._sgd_sce_step

    def spy(*args: Any) -> Any:
        taken.append(args[0])
        return compiled(*args)

    monkeypatch.setattr(engine, "_sgd_sce_step", spy)
    for b in range(0, 48, 16):
        a, g = steps[0](X[b : b + 16], y[b : b + 16]), steps[1](X[b : b + 16], y[b : b + 16])
        assert a == g and a[1] > 0
    assert taken == [nets[0]] * 3  # the compiled call ran (and only for the built-in loss)
    assert _same_state(*nets)
    assert steps[0].optimizer.step_count == 3
    quiet = TrainStep(nets[0], steps[0].optimizer)  # count_correct=False: 0
    assert quiet(X[:16], y[:16])[1] == 0
