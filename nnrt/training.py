"""Training and inference loops: ``fit``, ``predict``, ``predict_classes``, ``evaluate``.

``Sequential.fit`` / ``predict`` / ``evaluate`` delegate here. The loop is plain
mini-batch gradient descent::

    for each epoch:  permute the rows (generator seeded from the network's seed)
        for each mini-batch:  Y = net.forward(Xb, training=True)
                              loss, dY = loss_fn(Y, yb);  net.backward(dY);  opt.step()

Determinism: the permutation generator is derived from ``net.seed`` (or
``fit(seed=)``) and nothing else is random, so the same seed, data and
hyper-parameters give bit-identical weights.

Non-finite values: ``fit`` scans X and y once, before training (``forward``
does not). If a loss becomes NaN/Inf the network is put back to the weights and
buffers that produced the last finite loss (a copy of the previous step's
state is kept; for small networks the copy is a few microseconds) and
``FloatingPointError`` is raised.

Mini-batches are gathered with ``np.take(..., out=)`` into buffers allocated
once per ``fit``; forward outputs are buffers the next call reuses, so
``predict`` copies each batch into its own result array.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nnrt._locks import serialised, state_lock
from nnrt.warnings import TrainingWarning, warn_user

if TYPE_CHECKING:
    from nnrt.network import Sequential

__all__ = [
    "Callback",
    "EarlyStopping",
    "History",
    "LambdaCallback",
    "TrainingState",
    "evaluate",
    "fit",
    "has_batch_statistics",
    "predict",
    "predict_classes",
]

LossFn = Callable[[Any, Any], tuple[float, np.ndarray]]

DEFAULT_PREDICT_BATCH = 1024


# ---------------------------------------------------------------- results
@dataclass
class History:
    """What ``fit`` returns.

    ``history`` maps ``"loss"`` (mean training loss of each epoch),
    ``"accuracy"`` (for integer class labels), and with validation data
    ``"val_loss"`` / ``"val_accuracy"`` to per-epoch lists; ``epoch`` lists the
    epoch indices that ran (shorter than ``epochs`` after early stopping);
    ``stopped_early`` says whether a callback stopped training.
    """

    history: dict[str, list[float]] = field(default_factory=dict)
    epoch: list[int] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False

    def append(self, epoch: int, logs: Mapping[str, float]) -> None:
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))

    def plot(self, path: Any = None, **kwargs: Any) -> Any:
        """Loss and metric curves, train vs validation (``nnrt.plotting.plot_history``)."""
        from nnrt.plotting import plot_history

        return plot_history(self, path, **kwargs)

    def __repr__(self) -> str:
        last = {k: round(v[-1], 6) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"


@dataclass
class TrainingState:
    """Handed to every callback: the network, the history so far, and a stop flag.

    A callback sets ``stop_training = True`` to end training after the current epoch.
    """

    net: Sequential
    history: History
    epochs: int
    stop_training: bool = False


class Callback:
    """Base class for ``fit(callbacks=[...])``; override what you need.

    ``logs`` holds the epoch's entries (``"loss"``, ``"val_loss"``, metrics).
    """

    def on_train_begin(self, state: TrainingState) -> None:
        """Called once before the first epoch."""

    def on_epoch_begin(self, state: TrainingState, epoch: int) -> None:
        """Called at the start of each epoch."""

    def on_epoch_end(self, state: TrainingState, epoch: int, logs: dict[str, float]) -> None:
        """Called after each epoch (and its validation) with that epoch's logs."""

    def on_train_end(self, state: TrainingState) -> None:
        """Called once after the last epoch (also after an early stop)."""


class LambdaCallback(Callback):
    """A callback from plain functions, e.g. ``LambdaCallback(on_epoch_end=fn)``."""

    def __init__(
        self,
        on_train_begin: Callable[[TrainingState], None] | None = None,
        on_epoch_begin: Callable[[TrainingState, int], None] | None = None,
        on_epoch_end: Callable[[TrainingState, int, dict[str, float]], None] | None = None,
        on_train_end: Callable[[TrainingState], None] | None = None,
    ) -> None:
        self._fns = (on_train_begin, on_epoch_begin, on_epoch_end, on_train_end)

    def on_train_begin(self, state: TrainingState) -> None:
        if self._fns[0] is not None:
            self._fns[0](state)

    def on_epoch_begin(self, state: TrainingState, epoch: int) -> None:
        if self._fns[1] is not None:
            self._fns[1](state, epoch)

    def on_epoch_end(self, state: TrainingState, epoch: int, logs: dict[str, float]) -> None:
        if self._fns[2] is not None:
            self._fns[2](state, epoch, logs)

    def on_train_end(self, state: TrainingState) -> None:
        if self._fns[3] is not None:
            self._fns[3](state)


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs in a row in which ``monitor`` did not improve.

    ``patience=0`` stops at the first epoch without improvement.

    ``monitor`` is a history key (``"val_loss"`` by default; ``"loss"``,
    ``"val_accuracy"``, ...). ``mode`` is ``"min"``, ``"max"`` or ``"auto"``
    (max for names containing "accuracy", else min). An epoch improves when it
    beats the best value by more than ``min_delta``. With
    ``restore_best_weights=True`` the network gets the parameters and buffers
    of the best epoch back when training ends. After training, ``best``,
    ``best_epoch`` and ``stopped_epoch`` (None if it never stopped) tell what
    happened.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 0,
        min_delta: float = 0.0,
        mode: str = "auto",
        restore_best_weights: bool = False,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'auto', 'min' or 'max', got {mode!r}")
        if mode == "auto":
            mode = "max" if "acc" in monitor else "min"
        self.monitor = monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.mode = mode
        self.restore_best_weights = bool(restore_best_weights)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self._wait = 0
        self._best_state: dict[str, np.ndarray] | None = None

    def on_train_begin(self, state: TrainingState) -> None:
        self.best = None
        self.best_epoch = None
        self.stopped_epoch = None
        self._wait = 0
        self._best_state = None

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, state: TrainingState, epoch: int, logs: dict[str, float]) -> None:
        if self.monitor not in logs:
            raise KeyError(
                f"EarlyStopping: monitored quantity {self.monitor!r} is not logged; "
                f"available: {sorted(logs)} (val_* needs validation= or validation_split=)"
            )
        value = float(logs[self.monitor])
        if self._improved(value):
            self.best = value
            self.best_epoch = epoch
            self._wait = 0
            if self.restore_best_weights:
                self._best_state = state.net.state_dict()
            return
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            state.stop_training = True

    def on_train_end(self, state: TrainingState) -> None:
        if self.restore_best_weights and self._best_state is not None:
            state.net.load_state_dict(self._best_state)


# ---------------------------------------------------------------- helpers
def has_batch_statistics(net: Sequential) -> bool:
    """True if some layer normalises with batch statistics in training.

    Detected generically: a class attribute ``uses_batch_statistics = True``,
    the registry name ``batchnorm``, or buffers named ``running_mean`` /
    ``running_var``.
    """
    from nnrt.registry import registry

    for layer in net.layers:
        flag = getattr(type(layer), "uses_batch_statistics", None)
        if flag is not None:
            if flag:
                return True
            continue
        if registry.name_of(type(layer)) == "batchnorm":
            return True
        if {"running_mean", "running_var"} & set(layer.buffers()):
            return True
    return False


def _as_2d_features(X: Any, net: Sequential, what: str) -> np.ndarray:
    """X as a C-contiguous 2-D array of the network's dtype (rank/dtype checked)."""
    arr = np.asarray(X)
    if arr.dtype.kind not in "fiub":
        raise TypeError(
            f"{what}: must be a real numeric array (float, int or bool), got shape "
            f"{arr.shape} dtype {arr.dtype}"
        )
    if arr.ndim != 2:
        raise ValueError(
            f"{what}: must be 2-D (samples, features), got shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{what}: is empty: shape {arr.shape} dtype {arr.dtype}")
    n_in = net.in_features
    if n_in is not None and arr.shape[1] != n_in:
        raise ValueError(
            f"{what}: has {arr.shape[1]} features (shape {arr.shape} dtype {arr.dtype}), "
            f"the network's first layer {net.layers[0]!r} expects {n_in}"
        )
    return np.ascontiguousarray(arr, dtype=net.dtype)


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        n_bad = int(bad.sum())
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{what}: contains {n_bad} non-finite value(s) (NaN/Inf), first at index "
            f"{first} (shape {arr.shape} dtype {arr.dtype}); clean or impute them before fit"
        )


def _prepare_targets(y: Any, n: int, net: Sequential, what: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.dtype.kind not in "fiub":
        raise TypeError(
            f"{what}: must be a real numeric array, got shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.ndim == 0 or arr.shape[0] != n:
        raise ValueError(f"{what}: has shape {arr.shape}, expected {n} rows to match the inputs")
    if arr.dtype.kind == "f":
        arr = arr.astype(net.dtype, copy=False)
    elif arr.dtype.kind == "b":
        arr = arr.astype(net.dtype)
    return np.ascontiguousarray(arr)


def _is_class_labels(y: np.ndarray) -> bool:
    return y.ndim == 1 and y.dtype.kind in "iu"


def _resolve_loss(loss: str | LossFn) -> tuple[str, LossFn]:
    from nnrt import losses

    fn = losses.get_loss(loss)
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    return name, fn


def _default_loss(y: np.ndarray) -> str:
    return "softmax_cross_entropy" if _is_class_labels(y) else "mse"


def _call_loss(fn: LossFn, Y: np.ndarray, target: np.ndarray, name: str) -> tuple[float, Any]:
    result = fn(Y, target)
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"loss {name!r} must return (loss, dY), got {type(result).__name__}")
    value, dY = result
    return float(value), dY


def _n_correct(Y: np.ndarray, labels: np.ndarray) -> int:
    if Y.shape[1] == 1:
        pred = (Y[:, 0] > 0).astype(labels.dtype)
    else:
        pred = Y.argmax(axis=1)
    return int(np.count_nonzero(pred == labels))


def _check_batch_size(batch_size: Any, what: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"{what}: batch_size must be a positive int, got {batch_size!r}")
    if batch_size <= 0:
        raise ValueError(f"{what}: batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def _use_progress(progress: bool | None) -> bool:
    if progress is None:
        try:
            return sys.stderr is not None and sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(progress)


class _Snapshot:
    """Two rotating copies of every parameter and buffer (for non-finite recovery)."""

    def __init__(self, live: Sequence[np.ndarray]) -> None:
        self.live = list(live)
        self.copies = [[np.empty_like(a) for a in self.live] for _ in range(2)]
        self.valid = [False, False]
        self.cur = 0

    def take(self) -> None:
        """Copy the live state into the next slot."""
        self.cur ^= 1
        for dst, src in zip(self.copies[self.cur], self.live, strict=True):
            np.copyto(dst, src)
        self.valid[self.cur] = True

    def restore(self, which: str) -> None:
        """Copy back the newest ("last") or the one before it ("previous", if taken)."""
        slot = self.cur if which == "last" or not self.valid[self.cur ^ 1] else self.cur ^ 1
        for dst, src in zip(self.live, self.copies[slot], strict=True):
            np.copyto(dst, src)


# ---------------------------------------------------------------- thread safety
# predict/evaluate hold the network's state lock for the whole call; fit holds the
# training lock for the whole call and the state lock for each step (nnrt/_locks.py,
# docs/reliability.md).
_serialised = serialised


# ---------------------------------------------------------------- inference
@_serialised(exclusive=False)
def predict(net: Sequential, X: Any, batch_size: int | None = None) -> np.ndarray:
    """Scores (samples, out_features) of ``net`` in eval mode, computed in batches.

    Returns a new array of the network's dtype (never an internal buffer).
    """
    bs = DEFAULT_PREDICT_BATCH if batch_size is None else _check_batch_size(batch_size, "predict")
    Xa = _as_2d_features(X, net, "predict: X")
    n = Xa.shape[0]
    out: np.ndarray | None = None
    for start in range(0, n, bs):
        Y = net.forward(Xa[start : start + bs], training=False)
        if out is None:
            out = np.empty((n, Y.shape[1]), dtype=Y.dtype)
        out[start : start + Y.shape[0]] = Y
    assert out is not None
    return out


def predict_classes(net: Sequential, X: Any, batch_size: int | None = None) -> np.ndarray:
    """Predicted class labels (int64): argmax of the scores, or ``score > 0`` for one output."""
    scores = predict(net, X, batch_size)
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).astype(np.int64)
    return scores.argmax(axis=1).astype(np.int64)


@_serialised(exclusive=False)
def evaluate(
    net: Sequential,
    X: Any,
    y: Any,
    loss: str | LossFn | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Mean loss (eval mode) and, for integer class labels, accuracy.

    ``loss`` defaults to the loss of the last ``fit``, else to
    ``softmax_cross_entropy`` for integer labels and ``mse`` otherwise. The mean
    is weighted by batch size, so it equals the loss of the whole set for the
    built-in ("mean"-reduced) losses.
    """
    bs = DEFAULT_PREDICT_BATCH if batch_size is None else _check_batch_size(batch_size, "evaluate")
    Xa = _as_2d_features(X, net, "evaluate: X")
    n = Xa.shape[0]
    ya = _prepare_targets(y, n, net, "evaluate: y")
    if loss is None:
        loss = getattr(net, "_fit_loss", None) or _default_loss(ya)
    name, fn = _resolve_loss(loss)
    classes = _is_class_labels(ya)
    total = 0.0
    correct = 0
    for start in range(0, n, bs):
        Y = net.forward(Xa[start : start + bs], training=False)
        yb = ya[start : start + bs]
        value, _ = _call_loss(fn, Y, yb, name)
        total += value * Y.shape[0]
        if classes:
            correct += _n_correct(Y, yb)
    result = {"loss": total / n}
    if classes:
        result["accuracy"] = correct / n
    return result


# ---------------------------------------------------------------- training
@_serialised(exclusive=True)
def fit(
    net: Sequential,
    X: Any,
    y: Any,
    loss: str | LossFn = "softmax_cross_entropy",
    optimizer: Any = None,
    epochs: int = 1,
    batch_size: int = 32,
    shuffle: bool = True,
    validation: tuple[Any, Any] | None = None,
    validation_split: float | None = None,
    callbacks: Iterable[Callback] | None = None,
    progress: bool | None = None,
    seed: int | None = None,
) -> History:
    """Train ``net`` on (X, y) with mini-batches; see ``Sequential.fit``."""
    from nnrt import optim

    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}")
    epochs = int(epochs)
    batch_size = _check_batch_size(batch_size, "fit")
    loss_name, loss_fn = _resolve_loss(loss)

    Xa = _as_2d_features(X, net, "fit: X")
    ya = _prepare_targets(y, Xa.shape[0], net, "fit: y")
    _check_finite(Xa, "fit: X")
    _check_finite(ya, "fit: y")

    # ---- validation data
    if validation is not None and validation_split is not None:
        raise ValueError("fit: pass validation=(X, y) or validation_split=, not both")
    Xv: np.ndarray | None = None
    yv: np.ndarray | None = None
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("fit: validation must be a pair (X_val, y_val)")
        Xv = _as_2d_features(validation[0], net, "fit: validation X")
        yv = _prepare_targets(validation[1], Xv.shape[0], net, "fit: validation y")
        _check_finite(Xv, "fit: validation X")
        _check_finite(yv, "fit: validation y")
    elif validation_split is not None:
        vs = float(validation_split)
        if not 0.0 < vs < 1.0:
            raise ValueError(f"fit: validation_split must be in (0, 1), got {validation_split!r}")
        # the last fraction of the rows, taken before any shuffling (as Keras)
        n_val = int(math.floor(Xa.shape[0] * vs))
        if n_val < 1 or n_val >= Xa.shape[0]:
            raise ValueError(
                f"fit: validation_split={vs} of {Xa.shape[0]} samples leaves "
                f"{n_val} validation and {Xa.shape[0] - n_val} training samples; "
                f"both must be >= 1"
            )
        split = Xa.shape[0] - n_val
        Xv, yv = Xa[split:], ya[split:]
        Xa, ya = Xa[:split], ya[:split]

    n = Xa.shape[0]
    classes = _is_class_labels(ya)

    if optimizer is None:
        optimizer = optim.Adam(net)
    if not callable(getattr(optimizer, "step", None)):
        raise TypeError(
            f"fit: optimizer must be an optimizer instance with step() (e.g. "
            f"nnrt.optim.Adam(net)), got {type(optimizer).__name__}"
        )

    # ---- batches: a final batch of one sample breaks batch statistics
    n_used = n
    if has_batch_statistics(net) and n % batch_size == 1:
        n_used = n - 1
        if n_used == 0:
            raise ValueError(
                "fit: the network has BatchNorm, which cannot train on a single sample; "
                "pass at least 2 training samples"
            )
        warn_user(
            f"fit: {n} training samples with batch_size={batch_size} leave a final "
            f"mini-batch of 1 sample, which BatchNorm cannot normalise; it is skipped in "
            f"every epoch (a different sample each epoch when shuffling). Pick another "
            f"batch_size to use every sample.",
            TrainingWarning,
        )
    steps = (n_used + batch_size - 1) // batch_size

    seed_value = net.seed if seed is None else seed
    seq = np.random.SeedSequence(entropy=seed_value, spawn_key=(0x5EED,))
    rng = np.random.default_rng(seq)

    Xbuf = np.empty((min(batch_size, n), Xa.shape[1]), dtype=Xa.dtype)
    ybuf = np.empty((min(batch_size, n),) + ya.shape[1:], dtype=ya.dtype)
    order = np.arange(n)

    live = list(net.params().values()) + list(net.buffers().values())
    snapshot = _Snapshot(live)

    history = History(
        params={
            "epochs": epochs,
            "batch_size": batch_size,
            "steps": steps,
            "loss": loss_name,
            "samples": n,
            "optimizer": type(optimizer).__name__,
        }
    )
    state = TrainingState(net=net, history=history, epochs=epochs)
    cbs = list(callbacks or [])
    for cb in cbs:
        if not isinstance(cb, Callback):
            raise TypeError(f"fit: callbacks must be nnrt Callback instances, got {cb!r}")

    bar = None
    if _use_progress(progress) and epochs > 0:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=epochs * steps, unit="batch", file=sys.stderr, dynamic_ncols=True, leave=True
        )

    net._fit_loss = loss  # type: ignore[attr-defined]
    try:
        for cb in cbs:
            cb.on_train_begin(state)
        step_index = 0
        for epoch in range(epochs):
            for cb in cbs:
                cb.on_epoch_begin(state, epoch)
            if shuffle:
                order = rng.permutation(n)
            total = 0.0
            correct = 0
            for b in range(steps):
                idx = order[b * batch_size : min((b + 1) * batch_size, n_used)]
                m = idx.shape[0]
                Xb = np.take(Xa, idx, axis=0, out=Xbuf[:m])
                yb = np.take(ya, idx, axis=0, out=ybuf[:m])
                # NOTE: one whole step under the state lock (looked up per step: a
                # forked child gets a new one), so another thread's save, state_dict,
                # predict or load_state_dict sees the weights between two steps.
                with state_lock(net):
                    snapshot.take()
                    Y = net.forward(Xb, training=True)
                    value, dY = _call_loss(loss_fn, Y, yb, loss_name)
                    if not math.isfinite(value):
                        # the weights before the previous step gave the last finite loss
                        snapshot.restore("previous" if step_index > 0 else "last")
                        raise FloatingPointError(
                            f"fit: the loss became {value} at epoch {epoch}, batch {b} "
                            f"(step {step_index}; loss {loss_name!r}, optimizer "
                            f"{type(optimizer).__name__}); the network keeps the weights "
                            f"of the last finite loss. Lower the learning rate or check "
                            f"the data scale."
                        )
                    if classes:
                        correct += _n_correct(Y, yb)
                    total += value * m
                    net.backward(dY)
                    optimizer.step()
                step_index += 1
                if bar is not None:
                    bar.update(1)
                    if b == steps - 1 or b % 16 == 0:
                        bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
                        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            logs: dict[str, float] = {"loss": total / n_used}
            if classes:
                logs["accuracy"] = correct / n_used
            if Xv is not None and yv is not None:
                val = evaluate(net, Xv, yv, loss=loss)
                logs["val_loss"] = val["loss"]
                if "accuracy" in val:
                    logs["val_accuracy"] = val["accuracy"]
            history.append(epoch, logs)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=True)
            for cb in cbs:
                cb.on_epoch_end(state, epoch, logs)
            if state.stop_training:
                history.stopped_early = True
                break
        for cb in cbs:
            cb.on_train_end(state)
    finally:
        if bar is not None:
            bar.close()
    return history
