"""fit / predict / predict_classes / evaluate, History and callbacks (public API only).

References are written here in float64 numpy (softmax cross-entropy, the eval
forward pass of dense/batchnorm/sigmoid); nothing is compared with nnrt's own
output except where the property is "the same computation twice".
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.datasets import load_digits
from nnrt.registry import registry


def _mlp(seed: int = 0, dtype: str = "float32", bn: bool = True, n_in: int = 8) -> nnrt.Sequential:
    first = "dense_nobias" if bn else "dense"
    layers = [nnrt.layer(first, n_in, 16)]
    if bn:
        layers.append(nnrt.layer("batchnorm", 16))
    layers += [nnrt.layer("sigmoid"), nnrt.layer("dense", 16, 3)]
    return nnrt.Sequential(layers, seed=seed, dtype=dtype)


def _blobs(n: int = 120, n_in: int = 8, k: int = 3, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(k, n_in))
    y = rng.integers(0, k, size=n)
    X = centers[y] + rng.normal(size=(n, n_in))
    return X, y.astype(np.int64)


def _ce64(scores: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy in float64 (reference)."""
    z = scores.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def _eval_forward64(net: nnrt.Sequential, X: np.ndarray) -> np.ndarray:
    """Eval-mode forward pass in float64 from the state dict (reference)."""
    state = net.state_dict()
    out = X.astype(np.float64)
    for i, layer in enumerate(net.layers):
        name = registry.name_of(type(layer))
        if name in ("dense", "dense_nobias"):
            out = out @ state[f"{i}.weight"].astype(np.float64)
            if f"{i}.bias" in state:
                out = out + state[f"{i}.bias"]
        elif name == "batchnorm":
            eps = layer.config()["eps"]
            out = (out - state[f"{i}.running_mean"]) / np.sqrt(state[f"{i}.running_var"] + eps)
            out = out * state[f"{i}.gamma"] + state[f"{i}.beta"]
        elif name == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out))
        else:  # pragma: no cover
            raise AssertionError(name)
    return out


class _Recorder:
    """A loss callable that records what it sees and delegates to softmax_cross_entropy."""

    def __init__(self, loss: Any = None) -> None:
        self.loss = loss or nnrt.losses.softmax_cross_entropy
        self.targets: list[np.ndarray] = []

    def __call__(self, Y: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
        self.targets.append(np.array(t, copy=True))
        return self.loss(Y, t)  # type: ignore[no-any-return]


# ----------------------------------------------------------- the real dataset
def test_digits_reach_95_percent_in_under_a_minute() -> None:
    X, y = load_digits()
    assert X.shape == (1797, 64) and set(np.unique(y)) == set(range(10))
    X = (X / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(X))
    test, train = order[:360], order[360:]
    net = nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 64, 64),
            nnrt.layer("batchnorm", 64),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 64, 10),
        ],
        seed=0,
    )
    t0 = time.perf_counter()
    history = net.fit(
        X[train], y[train], optimizer=nnrt.optim.Adam(net, lr=1e-2), epochs=20, progress=False
    )
    elapsed = time.perf_counter() - t0
    scores = net.predict(X[test])
    accuracy = float(np.mean(scores.argmax(axis=1) == y[test]))
    assert accuracy >= 0.95, accuracy
    assert elapsed < 60.0
    assert len(history.history["loss"]) == 20
    assert history.history["loss"][-1] < history.history["loss"][0]
    # evaluate agrees with the float64 reference computed from predict's scores
    result = net.evaluate(X[test], y[test])
    assert result["accuracy"] == pytest.approx(accuracy, abs=0)
    assert result["loss"] == pytest.approx(_ce64(scores, y[test]), rel=1e-5)


# ----------------------------------------------------------- determinism
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_gives_bit_identical_weights(dtype: str) -> None:
    X, y = _blobs()
    states = []
    for _ in range(2):
        net = _mlp(seed=7, dtype=dtype)
        net.fit(X, y, epochs=3, batch_size=16, progress=False)
        states.append(net.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert states[0][k].tobytes() == states[1][k].tobytes(), k
    other = _mlp(seed=8, dtype=dtype)
    other.fit(X, y, epochs=3, batch_size=16, progress=False)
    assert not np.array_equal(other.state_dict()["0.weight"], states[0]["0.weight"])


def test_shuffle_is_seeded_and_covers_every_sample() -> None:
    X, y = _blobs(n=40)
    ids = np.arange(40, dtype=np.float64)  # mse targets identify the rows

    def run(seed: int, shuffle: bool) -> list[np.ndarray]:
        net = nnrt.Sequential([nnrt.layer("dense", 8, 1)], seed=seed)
        rec = _Recorder(nnrt.losses.mse)
        net.fit(X, ids[:, None], loss=rec, epochs=3, batch_size=8, shuffle=shuffle, progress=False)
        return [t[:, 0].astype(int) for t in rec.targets]

    a, b, c = run(3, True), run(3, True), run(4, True)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    epochs = [np.concatenate(a[i * 5 : (i + 1) * 5]) for i in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[0], np.arange(40))
    plain = run(3, False)
    assert np.array_equal(np.concatenate(plain[:5]), np.arange(40))


# ----------------------------------------------------------- batch of one
def test_batchnorm_final_batch_of_one_is_skipped_with_one_warning() -> None:
    X, y = _blobs(n=33)
    net = _mlp()
    rec = _Recorder()
    with pytest.warns(nnrt.TrainingWarning, match="mini-batch of 1") as record:
        hist = net.fit(X, y, loss=rec, epochs=3, batch_size=32, progress=False)
    assert len([w for w in record if issubclass(w.category, nnrt.TrainingWarning)]) == 1
    assert [len(t) for t in rec.targets] == [32, 32, 32]
    assert len(hist.history["loss"]) == 3
    # no BatchNorm: the single-sample batch is used, without a warning
    plain = _mlp(bn=False)
    rec2 = _Recorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain.fit(X, y, loss=rec2, epochs=1, batch_size=32, progress=False)
    assert [len(t) for t in rec2.targets] == [32, 1]


# ----------------------------------------------------------- non-finite
@pytest.mark.parametrize("where", ["X-nan", "X-inf", "y-nan", "val-X"])
def test_non_finite_data_rejected_before_training(where: str) -> None:
    X, y = _blobs()
    net = _mlp(bn=False)
    before = net.state_dict()
    kwargs: dict[str, Any] = {}
    target: Any = y
    loss = "softmax_cross_entropy"
    if where == "X-nan":
        X[5, 3] = np.nan
    elif where == "X-inf":
        X[7, 0] = -np.inf
    elif where == "y-nan":
        target = np.eye(3)[y]
        target[2, 1] = np.nan
        loss = "mse"
    else:
        Xv = X[:10].copy()
        Xv[0, 0] = np.nan
        kwargs["validation"] = (Xv, y[:10])
    with pytest.raises(ValueError, match="non-finite"):
        net.fit(X, target, loss=loss, epochs=1, progress=False, **kwargs)
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_exploding_loss_raises_and_keeps_last_finite_weights() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16, 4)) * 10
    T = rng.normal(size=(16, 2)) * 10
    lr = 5.0  # far too large for mse on this scale: diverges within a few steps

    def make() -> nnrt.Sequential:
        return nnrt.Sequential([nnrt.layer("dense", 4, 2)], seed=0, dtype="float64")

    # reference: the same full-batch SGD steps done by hand, recording the weights
    # before every step and the loss they give
    ref = make()
    opt = nnrt.optim.SGD(ref, lr=lr)
    weights, losses = [], []
    with np.errstate(all="ignore"):
        for _ in range(200):
            weights.append(ref.state_dict())
            value, dY = nnrt.losses.mse(ref.forward(X, training=True), T)
            losses.append(value)
            if not np.isfinite(value):
                break
            ref.backward(dY)
            opt.step()
    k = len(losses) - 1
    assert not np.isfinite(losses[k]) and k >= 2, "the setup must diverge after some steps"
    expected = weights[k - 1]  # the weights whose loss was the last finite one
    assert np.isfinite(losses[k - 1])

    net = make()
    with np.errstate(all="ignore"), pytest.raises(FloatingPointError, match="loss became"):
        net.fit(
            X,
            T,
            loss="mse",
            optimizer=nnrt.optim.SGD(net, lr=lr),
            epochs=200,
            batch_size=16,
            shuffle=False,
            progress=False,
        )
    got = net.state_dict()
    for key in expected:
        assert np.all(np.isfinite(got[key]))
        assert np.array_equal(got[key], expected[key]), key


# ----------------------------------------------------------- validation, callbacks
def test_validation_split_uses_the_last_rows() -> None:
    X, y = _blobs(n=50)
    net = _mlp(bn=False)
    rec = _Recorder()
    hist = net.fit(X, y, loss=rec, epochs=4, batch_size=8, validation_split=0.2, progress=False)
    assert set(hist.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 4 for v in hist.history.values())
    train_seen = np.concatenate([t for t in rec.targets if len(t) <= 8])
    val_seen = [t for t in rec.targets if len(t) == 10]
    assert len(train_seen) == 4 * 40
    assert len(val_seen) == 4 and all(np.array_equal(v, y[40:]) for v in val_seen)
    assert sorted(np.bincount(train_seen, minlength=3).tolist()) == sorted(
        (4 * np.bincount(y[:40], minlength=3)).tolist()
    )
    scores = net.predict(X[40:])
    assert hist.history["val_loss"][-1] == pytest.approx(_ce64(scores, y[40:]), rel=1e-5)
    assert hist.history["val_accuracy"][-1] == np.mean(scores.argmax(1) == y[40:])


def test_validation_pair_and_errors() -> None:
    X, y = _blobs()
    net = _mlp()
    hist = net.fit(X, y, epochs=2, validation=(X[:20], y[:20]), progress=False)
    assert len(hist.history["val_loss"]) == 2 and hist.epoch == [0, 1]
    with pytest.raises(ValueError, match="not both"):
        net.fit(X, y, validation=(X, y), validation_split=0.1, progress=False)
    with pytest.raises(ValueError, match="validation_split"):
        net.fit(X, y, validation_split=1.5, progress=False)
    with pytest.raises(ValueError, match="features"):
        net.fit(X[:, :5], y, progress=False)


def test_early_stopping_stops_and_restores_best_weights() -> None:
    X, y = _blobs()
    net = _mlp(bn=False)
    snapshots: list[dict[str, np.ndarray]] = []
    keep = nnrt.LambdaCallback(on_epoch_end=lambda s, e, logs: snapshots.append(s.net.state_dict()))
    # validation labels are the training labels shifted: learning the training
    # set makes the validation loss worse from the first epoch on
    stop = nnrt.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    hist = net.fit(
        X,
        y,
        optimizer=nnrt.optim.Adam(net, lr=0.05),
        epochs=50,
        validation=(X, (y + 1) % 3),
        callbacks=[keep, stop],
        progress=False,
    )
    val = hist.history["val_loss"]
    assert hist.stopped_early and len(val) < 50
    best = int(np.argmin(val))
    assert stop.best_epoch == best and stop.best == val[best]
    # stops after `patience` epochs in a row without improvement
    assert len(val) == best + 1 + 2  # best epoch, then 2 without improvement
    assert all(v >= val[best] for v in val[best + 1 :])
    got = net.state_dict()
    assert all(np.array_equal(got[k], snapshots[best][k]) for k in got)


def test_early_stopping_with_no_progress_and_missing_key() -> None:
    X, y = _blobs()
    net = _mlp(bn=False)
    # lr = 0: the loss never changes (up to summation order: min_delta), so it never
    # improves after the first epoch
    hist = net.fit(
        X,
        y,
        optimizer=nnrt.optim.SGD(net, lr=0.0),
        epochs=20,
        callbacks=[nnrt.EarlyStopping(monitor="loss", patience=3, min_delta=1e-6)],
        progress=False,
    )
    assert len(hist.epoch) == 1 + 3
    with pytest.raises(KeyError, match="val_loss"):
        net.fit(X, y, epochs=2, callbacks=[nnrt.EarlyStopping()], progress=False)


# ----------------------------------------------------------- inference
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_is_eval_mode_batched_and_a_copy(dtype: str) -> None:
    X, y = _blobs(n=70)
    net = _mlp(dtype=dtype)
    net.fit(X, y, epochs=2, batch_size=16, progress=False)
    ref = _eval_forward64(net, X)
    tol = 1e-5 if dtype == "float32" else 1e-12
    p_all = net.predict(X)
    p_small = net.predict(X, batch_size=7)
    assert p_all.dtype == np.dtype(dtype) and p_all.shape == (70, 3)
    np.testing.assert_allclose(p_all, ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(p_small, ref, rtol=tol, atol=tol)
    kept = p_all.copy()
    net.predict(X[::-1] * 2)
    net.forward(X[:70] * 3)
    assert np.array_equal(p_all, kept)
    assert np.array_equal(net.predict_classes(X), ref.argmax(axis=1))
    with pytest.raises(ValueError, match="batch_size"):
        net.predict(X, batch_size=0)


def test_evaluate_matches_reference_and_defaults() -> None:
    X, y = _blobs(n=90)
    net = _mlp(bn=False)
    net.fit(X, y, epochs=2, progress=False)
    scores = _eval_forward64(net, X)
    result = net.evaluate(X, y, batch_size=32)
    assert set(result) == {"loss", "accuracy"}
    assert result["loss"] == pytest.approx(_ce64(scores, y), rel=1e-5)
    assert result["accuracy"] == np.mean(scores.argmax(1) == y)
    T = np.eye(3)[y]
    mse = net.evaluate(X, T, loss="mse")
    assert set(mse) == {"loss"}
    assert mse["loss"] == pytest.approx(float(np.mean((scores - T) ** 2)), rel=1e-5)


def test_custom_loss_callable_and_history_repr() -> None:
    X, y = _blobs()
    calls = []

    def my_loss(Y: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
        calls.append(len(t))
        return nnrt.losses.softmax_cross_entropy(Y, t)

    net = _mlp()
    hist = net.fit(X, y, loss=my_loss, epochs=1, batch_size=50, progress=False)
    assert calls == [50, 50, 20]
    assert isinstance(hist, nnrt.History) and "epochs=1" in repr(hist)
    with pytest.raises(KeyError, match="unknown loss"):
        net.fit(X, y, loss="nope", progress=False)


def test_progress_bar_on_and_off(capfd: pytest.CaptureFixture[str]) -> None:
    X, y = _blobs()
    net = _mlp()
    net.fit(X, y, epochs=2, progress=False)
    assert capfd.readouterr().err == ""
    net.fit(X, y, epochs=2, progress=True)
    err = capfd.readouterr().err
    assert "epoch 2/2" in err and "batch" in err
