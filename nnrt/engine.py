"""The training engine: one training step and one epoch loop behind every way to train.

``Sequential.fit``, ``nnrt.distributed.fit``, the scikit-learn estimators, the
CLI's ``train`` and ``nnrt.profile`` all run :class:`TrainStep` (one step) and,
except the profiler, :func:`fit` (the epochs). A step is::

    Y = net.forward(Xb, training=True);  loss, dY = loss_fn(Y, yb)
    net.backward(dY, input_grad=False)          # parameter gradients only
    sync(...)                                   # data-parallel: one allreduce
    if loss is finite: optimizer.step()

The rules every caller gets from here:

- Batches. One generator ``np.random.default_rng(seed)`` (``seed`` defaults to
  the network's; under MPI rank 0's) draws a permutation per epoch, cut into
  consecutive batches of ``batch_size``; with ``shuffle=False`` the rows stay in
  order. Each process gathers its rows of a batch (all of them in one process,
  its ``np.array_split`` shard under MPI) in increasing index order.
- Short batches. A network with a layer whose class sets
  ``uses_batch_statistics = True`` (batch statistics) cannot train on one sample: a
  final batch too short for that (one sample; under MPI, fewer than two rows per
  rank) is skipped in every epoch, with one ``nnrt.TrainingWarning``.
- Non-finite loss. Training stops, the network (parameters, buffers) and the
  optimizer get back the state that gave the last finite loss, and
  ``FloatingPointError`` is raised. Nothing is copied per step: the state is
  copied at the start of each epoch (this one's and the previous one's are
  kept) and the steps since are replayed, minus the last, which is exact
  because training is deterministic.
- Data. X and y may be numpy arrays (also ``np.load(..., mmap_mode="r")``
  memory maps), pandas DataFrames/Series or anything ``np.asarray`` takes.
  They are never copied whole: each batch's rows are gathered (and cast to the
  network's dtype) as they are used. NaN/Inf raise ValueError naming the first
  bad entry, with the network and optimizer as before ``fit``: X's rows are
  checked as the first epoch gathers them (and the state rewound to the
  epoch's copy), the rest (y, validation data, unused rows, X where the rewind
  or the fused check cannot apply) is scanned before training, in chunks.
  In the common case (compiled layers, the built-in loss, plain SGD, one
  process, no cast) a whole epoch runs in one compiled loop that gathers each
  batch and steps on it; on a data set larger than the caches the GEMM kernel
  prefetches the next batch's rows while a batch trains.
- Threads. ``fit`` holds the network's training lock throughout (a second
  ``fit`` raises) and its inference lock around each step, so ``predict`` or
  ``save`` from another thread sees whole steps.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from nnrt import _locks
from nnrt._engine import BACKGROUND_MIN_BYTES, NonFinite, n_correct, take_rows
from nnrt._engine import sgd_sce_epoch as _sgd_sce_epoch
from nnrt._engine import sgd_sce_run as _sgd_sce_run
from nnrt._engine import sgd_sce_step as _sgd_sce_step
from nnrt._kernels import backward_chain as _backward_chain
from nnrt._kernels import forward_chain as _forward_chain
from nnrt._kernels import softmax_cross_entropy as _sce_kernel
from nnrt._locks import state_lock, training_guard
from nnrt.io import save
from nnrt.losses import softmax_cross_entropy
from nnrt.optim import SGD, _check_live, check_trains, held_step
from nnrt.plotting import plot_history
from nnrt.registry import registry
from nnrt.warnings import TrainingWarning, warn_user

if TYPE_CHECKING:
    from nnrt._network import Network

__all__ = [
    "Callback",
    "Checkpoint",
    "EarlyStopping",
    "GradientSync",
    "History",
    "LambdaCallback",
    "ProgressBar",
    "TrainStep",
    "TrainingState",
    "evaluate",
    "fit",
    "has_batch_statistics",
    "predict",
    "predict_classes",
]

LossFn = Callable[[Any, Any], tuple[float, np.ndarray]]

DEFAULT_PREDICT_BATCH = 1024
_SCAN_ROWS = 4096  # rows per chunk of the NaN/Inf scan
_CHUNK_BYTES = 1 << 18  # input bytes gathered at once (several small batches share the cost)
# fit keeps its rewind copy and batch buffers on the network for the next call up to this
# size (see _Workspace)
_KEEP_BYTES = 8 << 20


# ---------------------------------------------------------------- results
@dataclass
class History:
    """What ``fit`` returns.

    ``history`` maps ``"loss"`` (mean training loss of each epoch, over the
    samples used), ``"accuracy"`` (for integer class labels), and with
    validation data ``"val_loss"`` / ``"val_accuracy"`` to per-epoch lists;
    ``epoch`` lists the epoch indices that ran (shorter than ``epochs`` after
    early stopping); ``stopped_early`` says whether a callback stopped
    training; ``params`` holds the settings (``epochs``, ``batch_size``,
    ``steps`` per epoch, ``skipped`` batches per epoch, ``samples``, ``loss``,
    ``optimizer``, ``ranks``).
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
        return plot_history(self, path, **kwargs)

    def __repr__(self) -> str:
        last = {k: round(v[-1], 6) for k, v in self.history.items() if v}
        return f"History(epochs={len(self.epoch)}, last={last})"


@dataclass
class TrainingState:
    """Handed to every callback: the network, the history so far, and a stop flag.

    A callback sets ``stop_training = True`` to end training after the current
    epoch. ``rank``/``ranks`` say which process of a data-parallel run this is
    (0 and 1 in one process).
    """

    net: Network
    history: History
    epochs: int
    stop_training: bool = False
    rank: int = 0
    ranks: int = 1


# ---------------------------------------------------------------- callbacks
class Callback:
    """Base class for ``fit(callbacks=[...])``; override what you need.

    ``logs`` holds the epoch's entries (``"loss"``, ``"val_loss"``, metrics).
    ``on_batch_end`` is called after every step with its loss; only callbacks
    that override it cost anything per step.
    """

    def on_train_begin(self, state: TrainingState) -> None:
        """Called once before the first epoch."""

    def on_epoch_begin(self, state: TrainingState, epoch: int) -> None:
        """Called at the start of each epoch."""

    def on_batch_end(self, state: TrainingState, epoch: int, batch: int, loss: float) -> None:
        """Called after each step with the loss of its (global) batch."""

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


class ProgressBar(Callback):
    """A tqdm bar on stderr (rank 0 only): one tick per step, the loss, the epoch's logs.

    ``fit(progress=True)`` adds one; ``progress=None`` (the default) adds one
    when stderr is a terminal. ``held_out`` names the validation data in the
    bar (``"test"`` shows ``test_accuracy`` for ``val_accuracy``).
    """

    def __init__(self, leave: bool = True, held_out: str = "val") -> None:
        self.leave = leave
        self.held_out = held_out
        self._bar: Any = None

    def _label(self, key: str) -> str:
        if key.startswith("val_") and self.held_out != "val":
            return f"{self.held_out}_{key[4:]}"
        return key

    def on_train_begin(self, state: TrainingState) -> None:
        steps = int(state.history.params.get("steps", 0))
        if state.rank != 0 or state.epochs == 0:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=state.epochs * steps,
            unit="batch",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=self.leave,
        )

    def on_batch_end(self, state: TrainingState, epoch: int, batch: int, loss: float) -> None:
        bar = self._bar
        if bar is None:
            return
        bar.update(1)
        if batch % 16 == 0:
            bar.set_description(f"epoch {epoch + 1}/{state.epochs}", refresh=False)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def on_epoch_end(self, state: TrainingState, epoch: int, logs: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_description(f"epoch {epoch + 1}/{state.epochs}", refresh=False)
            self._bar.set_postfix(
                {self._label(k): f"{v:.4f}" for k, v in logs.items()}, refresh=True
            )

    def on_train_end(self, state: TrainingState) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Checkpoint(Callback):
    """Save the network (``nnrt.io.save``, as ``net.save``) to ``path`` after every ``every``-th epoch, on rank 0 only.

    The file is written atomically, so a crash mid-save leaves the previous one.
    """

    def __init__(self, path: str | os.PathLike[str], every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Checkpoint: every must be an int >= 1, got {every!r}")
        self.path = os.fspath(path)
        self.every = every

    def on_epoch_end(self, state: TrainingState, epoch: int, logs: dict[str, float]) -> None:
        if state.rank == 0 and (epoch + 1) % self.every == 0:
            save(state.net, self.path)


# ---------------------------------------------------------------- gradient synchronisation
class GradientSync(Protocol):
    """What :func:`fit` needs from a data-parallel strategy (``nnrt.distributed.GradientAllreduce``).

    Every process runs the same epochs and global batches; ``shard`` says which
    rows of a global batch of ``n`` this one computes; after backward the engine
    calls the strategy with this process's share of the loss and of the correct
    count, and it returns the global ones with every gradient summed over the
    processes. ``min_batch`` is the shortest global batch the network can
    train on; ``common_seed`` makes every process shuffle alike.
    """

    rank: int
    size: int

    def shard(self, n: int) -> tuple[int, int]: ...

    def min_batch(self, net: Network) -> int: ...

    def common_seed(self, seed: int | None) -> int | None: ...

    def __call__(self, loss: float, correct: int) -> tuple[float, int]: ...


# ---------------------------------------------------------------- the step
class TrainStep:
    """One training step of ``net``: forward, loss, backward, gradient sync, update.

    ``TrainStep(net, optimizer, loss="softmax_cross_entropy", sync=None,
    count_correct=False)``; ``step(Xb, yb, n_global=None)`` trains on the
    batch (this process's rows of a global batch of ``n_global`` rows) and
    returns ``(loss, correct)``: the mean loss of the global batch and its
    number of correctly classified rows (0 unless ``count_correct``). When the
    loss is not finite the optimizer is not stepped: the parameters are still
    those that produced it. Holds the network's inference lock.
    """

    def __init__(
        self,
        net: Network,
        optimizer: Any,
        loss: str | LossFn = "softmax_cross_entropy",
        sync: GradientSync | None = None,
        count_correct: bool = False,
        owns_batches: bool = False,
    ) -> None:
        self.net = net
        self.optimizer = optimizer
        self.loss_name, self.loss_fn = _resolve_loss(loss)
        self.sync = sync
        self.count_correct = count_correct
        # the caller's batches are its own buffers, left alone until the step returns
        # (fit's gathered batches): the first layer may cache one without a copy
        self.owns_batches = owns_batches
        self._lock: tuple[int, Any] = (-1, None)  # (fork generation, net's state lock)
        self._builtin_sce = self.loss_fn is softmax_cross_entropy
        self._fast = self._builtin_sce and sync is None
        # (optimizer, its step without taking the lock this step already holds)
        self._opt: tuple[Any, Any] = (None, None)

    def __call__(
        self, Xb: np.ndarray, yb: np.ndarray, n_global: int | None = None
    ) -> tuple[float, int]:
        net = self.net
        if self._lock[0] != _locks.generation:  # a forked child has new locks
            self._lock = (_locks.generation, state_lock(net))
        with self._lock[1]:
            if (
                self._fast
                and type(self.optimizer) is SGD
                and (n_global is None or n_global == len(Xb))
            ):
                # the common case in one compiled call (the same computation as below)
                done = _sgd_sce_step(
                    net, self.optimizer, Xb, yb, self.owns_batches, softmax_cross_entropy,
                    _check_live,
                )  # fmt: skip
                if done is not None:
                    return done[0], (done[1] if self.count_correct else 0)
            # NOTE: what Network.forward/backward and losses.softmax_cross_entropy do,
            # without their Python frames (~1 us of a 24 us tiny step): the layer list's
            # structure and dtypes are checked once for the step (under the lock)
            python, fuse, first = net._structure()
            net._check_dtypes("forward")
            if python:
                Y = net._forward_checked(Xb, True)
            else:
                Y = _forward_chain(net.layers, Xb, True, fuse, self.owns_batches)
                net._last_out = Y
            # the built-in loss's kernel counts the correct rows in the same call
            fused = _sce_kernel(Y, yb, True) if self._builtin_sce else None
            if fused is not None:
                loss, dY, correct = fused
                if not self.count_correct:
                    correct = 0
            else:
                result = self.loss_fn(Y, yb)
                if type(result) is not tuple or len(result) != 2:
                    raise TypeError(
                        f"loss {self.loss_name!r} must return (loss, dY), got {result!r:.80}"
                    )
                loss, dY = float(result[0]), result[1]
                correct = n_correct(Y, yb) if self.count_correct else 0
            if n_global is not None and n_global != (n := Xb.shape[0]):
                # NOTE: a mean-reduced loss puts 1/n into dY; this process's share of
                # the global batch's mean needs 1/n_global. Backward is linear in dY,
                # so every gradient becomes this shard's exact share of the global one.
                share = n / n_global
                dY = np.multiply(dY, share, out=dY if _writeable(dY) else None)
                loss *= share
            if python:
                net.backward(dY, input_grad=False)
            else:
                _backward_chain(net.layers, dY, first, False, fuse)
            if self.sync is not None:  # one allreduce: gradients, loss, correct count
                loss, correct = self.sync(loss, correct)
            if math.isfinite(loss):
                opt = self._opt
                if opt[0] is not self.optimizer:
                    o = self.optimizer
                    opt = self._opt = (o, held_step(o, net) or o.step)
                opt[1]()
        return loss, correct

    def run(
        self, batches: list[tuple[np.ndarray, np.ndarray, int]], total: float, correct: int
    ) -> tuple[int, float, int, tuple[float, int] | None]:
        """Steps over ``batches`` in one compiled loop while the compiled case applies
        (``nnrt._engine.sgd_sce_run``; ``fit``'s loop over a gathered chunk).

        Returns ``(done, total, correct, bad)``: the steps done, ``total`` and
        ``correct`` with each one's ``loss * n_global`` and correct count added in
        order, and ``(loss, correct)`` of the next step if its loss was not finite
        (it ran, without an update), else None. The caller steps through the rest.
        """
        if not (self._fast and type(self.optimizer) is SGD):
            return 0, total, correct, None
        if self._lock[0] != _locks.generation:
            self._lock = (_locks.generation, state_lock(self.net))
        done, total, right, bad = _sgd_sce_run(
            batches, self.net, self.optimizer, softmax_cross_entropy, _check_live,
            self._lock[1], self.owns_batches, total, correct,
        )  # fmt: skip
        if not self.count_correct:
            right, bad = correct, (None if bad is None else (bad[0], 0))
        return done, total, right, bad

    def run_epoch(
        self, batches: _Batches, order: np.ndarray, check: bool
    ) -> tuple[int, float, int, tuple[float, int] | None]:
        """The epoch's full batches in one compiled loop that gathers each batch and
        steps on it (``nnrt._engine.sgd_sce_epoch``), where the compiled case applies
        and the batches are plain rows of X and y (no shard, cast or columns).

        Returns ``(done, total, correct, bad)`` as :meth:`run`, counted from batch 0 of
        the epoch: the caller steps through the batches from ``done`` on.
        """
        rows = batches.sorted_rows(order)
        if rows is None or not (self._fast and type(self.optimizer) is SGD):
            return 0, 0.0, 0, None
        if self._lock[0] != _locks.generation:
            self._lock = (_locks.generation, state_lock(self.net))
        Xb, yb = batches.first_buffers(rows.shape[1])
        done, total, right, bad = _sgd_sce_epoch(
            self.net, self.optimizer, softmax_cross_entropy, _check_live, self._lock[1],
            batches.Xs.arr, batches.ys.arr, rows, 0, Xb, yb, check, 0.0, 0,
            batches.second_buffer(rows.shape[1]),
        )  # fmt: skip
        if not self.count_correct:
            right, bad = 0, (None if bad is None else (bad[0], 0))
        return done, total, right, bad


# ---------------------------------------------------------------- fit
def fit(
    net: Network,
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
    sync: GradientSync | None = None,
) -> History:
    """Train ``net`` on (X, y) in mini-batches; returns a :class:`History`.

    The keywords are those of ``Sequential.fit``; ``sync`` is a data-parallel
    strategy (``nnrt.distributed.fit`` passes one; ``batch_size`` is then the
    global batch). See the module docstring for the rules.
    """
    with training_guard(net, "fit"):  # a second fit on this network raises
        return _fit(net, X, y, loss, optimizer, epochs, batch_size, shuffle, validation,
                    validation_split, callbacks, progress, seed, sync)  # fmt: skip


def _fit(
    net: Network,
    X: Any,
    y: Any,
    loss: str | LossFn,
    optimizer: Any,
    epochs: int,
    batch_size: int,
    shuffle: bool,
    validation: tuple[Any, Any] | None,
    validation_split: float | None,
    callbacks: Iterable[Callback] | None,
    progress: bool | None,
    seed: int | None,
    sync: GradientSync | None,
) -> History:
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}")
    epochs = int(epochs)
    batch_size = _check_batch_size(batch_size, "fit")
    Xs = Xall = _Rows(X, net, "fit: X")
    ys = _Rows(y, net, "fit: y", targets=Xs.n)
    try:
        optimizer = _check_optimizer(net, optimizer)
    except (TypeError, ValueError):
        Xs.check_finite()  # bad data is reported first, as before the scan moved
        raise
    # NOTE: X is scanned for NaN/Inf as the first epoch gathers its rows (a separate
    # pass reads all of X once more: ~2% of an epoch on small); a bad row rewinds the
    # network and the optimizer to their state before fit. Where that cannot be done
    # (a cast or per-column gather, an optimizer without state_dict, several ranks
    # that each see a shard), X is scanned here, in chunks, before anything else.
    scan = (
        epochs > 0
        and Xs.fused_scan
        and (sync is None or sync.size == 1)
        and _Rewind.can_replay(optimizer)
    )
    if not scan:
        Xs.check_finite()
    ys.check_finite()
    Xv, yv = _validation_data(net, Xs, ys, validation, validation_split)
    if validation_split is not None and Xv is not None:
        Xs, ys = Xs.head(Xs.n - Xv.n), ys.head(ys.n - Xv.n)
        if scan and not Xv.all_finite():
            Xall.check_finite()
    cbs = _check_callbacks(callbacks, progress)
    step = TrainStep(net, optimizer, loss, sync, count_correct=ys.class_labels, owns_batches=True)
    rank, size = (sync.rank, sync.size) if sync is not None else (0, 1)

    # ---- batches: the same global batches on every process; a short last one is skipped
    n = Xs.n
    full, last = divmod(n, batch_size)
    min_batch = sync.min_batch(net) if sync is not None else (2 if has_batch_statistics(net) else 1)
    if full == 0 and last < min_batch:
        raise ValueError(
            f"fit: {n} sample{'s' if n != 1 else ''} left for training, fewer than the "
            f"{min_batch} that one batch needs (a layer with batch statistics cannot "
            f"normalise a single sample"
            f"{'; every rank needs its rows' if size > 1 else ''}); pass more samples"
        )
    skip_last = 0 < last < min_batch
    if skip_last:
        warn_user(
            f"fit: {n} training samples with batch_size={batch_size} leave a final "
            f"mini-batch of {last} sample{'s' if last > 1 else ''}, fewer than the "
            f"{min_batch} that its layers with batch statistics need"
            f"{f' on {size} ranks' if size > 1 else ''}; it "
            f"is skipped in every epoch (a different sample each epoch when shuffling). Pick "
            f"another batch_size to use every sample.",
            TrainingWarning,
        )
    steps = full + (1 if last and not skip_last else 0)
    n_used = full * batch_size + (last if last and not skip_last else 0)
    seed = net.seed if seed is None else seed
    space = _Workspace.of(net)
    rng = space.generator(sync.common_seed(seed) if sync is not None else seed)

    history = History(
        params={
            "epochs": epochs,
            "batch_size": batch_size,
            "steps": steps,
            "skipped": 1 if skip_last else 0,
            "samples": n,
            "loss": step.loss_name,
            "optimizer": type(optimizer).__name__,
            "ranks": size,
        }
    )
    state = TrainingState(net=net, history=history, epochs=epochs, rank=rank, ranks=size)
    per_batch = [cb for cb in cbs if type(cb).on_batch_end is not Callback.on_batch_end]
    rewind = _Rewind(net, optimizer, space)
    batches = _Batches(Xs, ys, batch_size, steps, sync, space)

    fit_loss, net._fit_loss = getattr(net, "_fit_loss", None), loss  # type: ignore[attr-defined]
    try:
        for cb in cbs:
            cb.on_train_begin(state)
        for epoch in range(epochs):
            for cb in cbs:
                cb.on_epoch_begin(state, epoch)
            order = rng.permutation(n) if shuffle else np.arange(n)
            rewind.epoch_start(order)
            check = scan and epoch == 0
            if check and n_used < n and not Xs.all_finite(order[n_used:]):  # skipped rows
                Xall.check_finite()
            total, correct, b = 0.0, 0, 0
            if not per_batch:  # the common case: gather and step in compiled code
                b, total, correct, bad = step.run_epoch(batches, order, check)
                if bad is not None:
                    _non_finite(bad[0], step, rewind, batches, epoch, b)
            for chunk in batches.chunks(order, check and b == 0, start=b):
                done = 0
                if not per_batch:  # the common case: the chunk's steps in compiled code
                    done, total, correct, bad = step.run(chunk, total, correct)
                    b += done
                    if bad is not None:
                        _non_finite(bad[0], step, rewind, batches, epoch, b)
                for Xb, yb, n_batch in chunk[done:] if done else chunk:
                    value, right = step(Xb, yb, n_batch)
                    if not math.isfinite(value):
                        _non_finite(value, step, rewind, batches, epoch, b)
                    total += value * n_batch
                    correct += right
                    for cb in per_batch:
                        cb.on_batch_end(state, epoch, b, value)
                    b += 1
            logs: dict[str, float] = {"loss": total / n_used}
            if ys.class_labels:
                logs["accuracy"] = correct / n_used
            if Xv is not None and yv is not None:
                val = _evaluate(net, Xv, yv, step.loss_fn, step.loss_name, DEFAULT_PREDICT_BATCH)
                logs.update({f"val_{k}": v for k, v in val.items()})
            history.append(epoch, logs)
            for cb in cbs:
                cb.on_epoch_end(state, epoch, logs)
            if state.stop_training:
                history.stopped_early = True
                break
        for cb in cbs:
            cb.on_train_end(state)
    except NonFinite:  # a NaN/Inf in X, found in the first epoch's gather
        rewind.reset()
        net._fit_loss = fit_loss  # type: ignore[attr-defined]
        try:
            Xall.check_finite()  # the scan's ValueError, naming the first bad entry
        except ValueError as exc:
            raise exc from None
        raise
    finally:
        for cb in cbs:
            if isinstance(cb, ProgressBar):
                cb.close()
    return history


def _non_finite(
    value: float, step: TrainStep, rewind: _Rewind, batches: _Batches, epoch: int, b: int
) -> None:
    """Batch ``b``'s loss was not finite: rewind to the last finite state and raise."""
    rewind.restore(step, batches, epoch, b)
    raise FloatingPointError(
        f"fit: the loss became {value} at epoch {epoch}, batch {b} (loss "
        f"{step.loss_name!r}, optimizer {type(step.optimizer).__name__}); "
        f"{rewind.what}. Lower the learning rate or check the data scale."
    )


class _Batches:
    """This process's rows of every global batch of an epoch, gathered a chunk at a time.

    Global batch ``b`` is ``order[b * batch_size : (b + 1) * batch_size]``; this
    process computes its shard (``sync.shard``; all of it in one process), with
    the rows in increasing index order. The rows of several consecutive batches
    (up to ``_CHUNK_BYTES`` of input) are gathered by one call, so that small
    batches share the Python cost of gathering; a batch's data does not depend
    on the chunking.
    """

    def __init__(
        self,
        Xs: _Rows,
        ys: _Rows,
        batch_size: int,
        steps: int,
        sync: GradientSync | None,
        space: _Workspace,
    ) -> None:
        self.Xs, self.ys, self.bs, self.steps, self.sync = Xs, ys, batch_size, steps, sync
        self.space = space
        batch_bytes = batch_size * max(1, math.prod(Xs.shape[1:])) * Xs.dtype.itemsize
        self.k = max(1, min(steps, _CHUNK_BYTES // batch_bytes))
        lo, hi = self._shard(batch_size)
        self.w = hi - lo

    # NOTE: the chunk buffers and their views are made on first use: fit's compiled
    # epoch (TrainStep.run_epoch) gathers one batch at a time into first_buffers, and
    # needs neither (a tiny fit's set-up was ~10 us of views it never used)
    @functools.cached_property
    def Xbuf(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.Xs.buffer(self.k * self.bs)

    @functools.cached_property
    def ybuf(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.ys.buffer(self.k * self.bs)

    @functools.cached_property
    def views(self) -> list[tuple[np.ndarray, np.ndarray, int]]:
        # NOTE: each chunk is gathered into the same buffers, so the full batches are
        # the same views every time: made once (slicing per step is ~0.3 us of 30),
        # by iterating a (batches, rows, ...) reshape (C-level views: 4x faster than
        # slicing, which was 10 us of a tiny fit's set-up)
        w = self.w
        Xo, yo = self.Xbuf[0], self.ybuf[0]
        nv = min(self.k, Xo.shape[0] // max(w, 1))
        return list(
            zip(
                Xo[: nv * w].reshape(nv, w, *Xo.shape[1:]),
                yo[: nv * w].reshape(nv, w, *yo.shape[1:]),
                itertools.repeat(self.bs, nv),
                strict=True,
            )
        )

    def _shard(self, n: int) -> tuple[int, int]:
        return self.sync.shard(n) if self.sync is not None else (0, n)

    def epoch(
        self, order: np.ndarray, check: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """``(X rows, y rows, global batch size)`` of each batch, in order.

        ``check=True``: X's rows are scanned for NaN/Inf as they are gathered
        (``NonFinite``, raised before the batch holding the row is yielded).
        """
        for chunk in self.chunks(order, check):
            yield from chunk

    def sorted_rows(self, order: np.ndarray) -> np.ndarray | None:
        """Each full batch's rows in increasing order, a (full batches, batch size) intp
        array (as :meth:`chunks` gathers them); None where a batch is not plain rows of
        X and y (a shard of it, a cast, columns)."""
        Xs, ys, bs = self.Xs, self.ys, self.bs
        if self.sync is not None or not (Xs.direct and ys.direct):
            return None
        full = min(self.steps, order.shape[0] // bs)
        if full == 0:
            return None
        rows = np.sort(order[: full * bs].reshape(full, bs), axis=1)
        return rows if rows.dtype == np.intp else rows.astype(np.intp)

    def first_buffers(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Buffers for one batch of ``m`` rows (the compiled epoch's): the chunk buffers'
        first rows where they exist, else buffers of one batch (kept for later calls)."""
        if "Xbuf" in self.__dict__:
            return self.Xbuf[0][:m], self.ybuf[0][:m]
        Xs, ys = self.Xs, self.ys
        return (
            self.space.buffer("X", (m, *Xs.shape[1:]), Xs.dtype),
            self.space.buffer("y", (m, *ys.shape[1:]), ys.dtype),
        )

    def second_buffer(self, m: int) -> np.ndarray | None:
        """A second X buffer like :meth:`first_buffers`' (the compiled epoch gathers the
        next batch into it in the background), for batches of at least
        ``_BACKGROUND_MIN_BYTES``; None for smaller ones."""
        if m * max(1, math.prod(self.Xs.shape[1:])) * self.Xs.dtype.itemsize < BACKGROUND_MIN_BYTES:
            return None
        return self.space.buffer("X2", (m, *self.Xs.shape[1:]), self.Xs.dtype)

    def chunks(
        self, order: np.ndarray, check: bool = False, start: int = 0
    ) -> Iterator[list[tuple[np.ndarray, np.ndarray, int]]]:
        """The batches of :meth:`epoch` from batch ``start`` on, a list per gathered chunk
        (valid until the next)."""
        bs, n, w = self.bs, order.shape[0], self.w
        lo, hi = self._shard(bs)
        for c0 in range(start, self.steps, self.k):
            c1 = min(c0 + self.k, self.steps)
            f1 = min(c1, n // bs)  # batches c0..f1 are full, batch f1 < c1 is the short last
            full = order[c0 * bs : f1 * bs].reshape(-1, bs)[:, lo:hi]
            parts = [np.sort(full, axis=1).ravel()]
            if f1 < c1:
                t_lo, t_hi = self._shard(n - f1 * bs)
                parts.append(np.sort(order[f1 * bs + t_lo : f1 * bs + t_hi]))
            rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
            Xc, yc = self.Xs.gather(rows, self.Xbuf, check), self.ys.gather(rows, self.ybuf)
            chunk = self.views[: f1 - c0]
            if f1 < c1:
                start = (f1 - c0) * w
                chunk.append((Xc[start:], yc[start:], n - f1 * bs))
            yield chunk


class _Workspace:
    """What ``fit`` allocates and can reuse on its next call on the same network.

    Kept in the network's ``__dict__`` (private: never pickled or copied), used only
    by ``fit``, which holds the network's training guard meanwhile:

    - the shuffle generator of an int seed, reset to its seeded state on each call
      (the same stream as ``np.random.default_rng(seed)``, without seeding it again);
    - the rewind copy's arrays (one set; an epoch keeps its previous one too) and the
      compiled epoch's batch buffers, each while at most ``_KEEP_BYTES``.

    NOTE: a fit after other work found these cold: a small fit's set-up was ~290 us a
    call (2.3 us a step), about a third of it seeding numpy's generator (~40 us) and
    fresh megabyte allocations whose pages fault on first touch (~60 us).
    """

    def __init__(self) -> None:
        self.rng: tuple[int, np.random.Generator, Mapping[str, Any]] | None = None
        self.arrays: list[np.ndarray] | None = None
        self.kept: dict[str, np.ndarray] = {}

    @staticmethod
    def of(net: Network) -> _Workspace:
        space = net.__dict__.get("_fit_workspace")
        if type(space) is not _Workspace:
            space = net.__dict__["_fit_workspace"] = _Workspace()
        return space

    def generator(self, seed: Any) -> np.random.Generator:
        """``np.random.default_rng(seed)``, reused for an int seed."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            return np.random.default_rng(seed)  # None, sequences, generators; errors
        key = int(seed)
        if self.rng is not None and self.rng[0] == key:
            gen = self.rng[1]
            gen.bit_generator.state = self.rng[2]
            return gen
        gen = np.random.default_rng(key)
        self.rng = (key, gen, gen.bit_generator.state)
        return gen

    def snapshot(self, live: list[np.ndarray]) -> list[np.ndarray]:
        """Arrays shaped as ``live`` (the rewind copy's), the last call's when they match."""
        kept = self.arrays
        if (
            kept is not None
            and len(kept) == len(live)
            and all(
                k.shape == a.shape and k.dtype == a.dtype for k, a in zip(kept, live, strict=True)
            )
        ):
            return kept
        arrays = [np.empty_like(a) for a in live]
        self.arrays = arrays if sum(a.nbytes for a in arrays) <= _KEEP_BYTES else None
        return arrays

    def buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An aligned buffer (``_aligned_empty``) for ``name`` (the compiled epoch's
        ``"X"``, ``"y"`` and background ``"X2"`` batches): the last call's when its shape
        and dtype match."""
        kept = self.kept.get(name)
        if kept is not None and kept.shape == shape and kept.dtype == dtype:
            return kept
        buf = _aligned_empty(shape, dtype)
        if buf.nbytes <= _KEEP_BYTES:
            self.kept[name] = buf
        else:
            self.kept.pop(name, None)
        return buf


@dataclass
class _Snapshot:
    arrays: list[np.ndarray]  # copies of the parameters and buffers
    optimizer: Any  # the optimizer's state_dict(), or None
    order: np.ndarray  # the epoch's row order


class _Rewind:
    """Puts the network and optimizer back to the state that gave the last finite loss.

    At the start of each epoch the parameters, buffers and optimizer state are
    copied (this epoch's copy and the previous one's are kept, with their row
    orders). After a non-finite loss at batch ``b`` the state before batch
    ``b - 1`` is rebuilt: the epoch's copy is restored and its first ``b - 1``
    steps are replayed (for ``b == 0``: the previous epoch's copy, and all but
    its last step). An optimizer without ``state_dict``/``load_state_dict``
    cannot be replayed: the epoch's copy is restored as it is.
    """

    def __init__(self, net: Network, optimizer: Any, space: _Workspace) -> None:
        self.net = net
        self.live = list(net.params().values()) + list(net.buffers().values())
        self.optimizer = optimizer
        self.space = space
        self.replayable = self.can_replay(optimizer)
        self.current: _Snapshot | None = None
        self.previous: _Snapshot | None = None  # an epoch that ran all its steps
        self.what = ""

    def epoch_start(self, order: np.ndarray) -> None:
        recycled = self.previous.arrays if self.previous is not None else None
        self.previous = self.current
        if recycled is None and self.current is None:
            recycled = self.space.snapshot(self.live)  # the last fit's, when it matches
        arrays = recycled or [np.empty_like(a) for a in self.live]
        for dst, src in zip(arrays, self.live, strict=True):
            np.copyto(dst, src)
        opt = self.optimizer.state_dict() if self.replayable else None
        self.current = _Snapshot(arrays, opt, order)

    @staticmethod
    def can_replay(optimizer: Any) -> bool:
        """The optimizer's state can be saved and loaded (``state_dict``/``load_state_dict``)."""
        return callable(getattr(optimizer, "state_dict", None)) and callable(
            getattr(optimizer, "load_state_dict", None)
        )

    def reset(self) -> None:
        """Back to the state at the start of the current epoch (no replay)."""
        snap = self.current
        assert snap is not None and self.replayable
        with state_lock(self.net):
            for dst, src in zip(self.live, snap.arrays, strict=True):
                np.copyto(dst, src)
            self.optimizer.load_state_dict(snap.optimizer)

    def restore(self, step: TrainStep, batches: _Batches, epoch: int, b: int) -> None:
        with state_lock(step.net):  # another thread's predict sees before or after
            self._restore(step, batches, epoch, b)

    def _restore(self, step: TrainStep, batches: _Batches, epoch: int, b: int) -> None:
        back = b == 0 and self.previous is not None
        snap = self.previous if back else self.current
        assert snap is not None
        for dst, src in zip(self.live, snap.arrays, strict=True):
            np.copyto(dst, src)
        if not self.replayable:
            self.what = f"the network is back to its weights at the start of epoch {epoch - back}"
            return
        self.optimizer.load_state_dict(snap.optimizer)
        replay = (batches.steps if back else b) - 1
        if replay < 0:
            self.what = "no loss was finite: the network keeps its initial weights"
            return
        with np.errstate(all="ignore"):
            for args in itertools.islice(batches.epoch(snap.order), replay):
                step(*args)
        self.what = "the network keeps the weights that gave the last finite loss"


def _validation_data(
    net: Network,
    Xs: _Rows,
    ys: _Rows,
    validation: tuple[Any, Any] | None,
    validation_split: float | None,
) -> tuple[_Rows | None, _Rows | None]:
    if validation is not None and validation_split is not None:
        raise ValueError("fit: pass validation=(X, y) or validation_split=, not both")
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("fit: validation must be a pair (X_val, y_val)")
        Xv = _Rows(validation[0], net, "fit: validation X")
        yv = _Rows(validation[1], net, "fit: validation y", targets=Xv.n)
        Xv.check_finite()
        yv.check_finite()
        return Xv, yv
    if validation_split is None:
        return None, None
    vs = float(validation_split)
    if not 0.0 < vs < 1.0:
        raise ValueError(f"fit: validation_split must be in (0, 1), got {validation_split!r}")
    # the last fraction of the rows, taken before any shuffling (as Keras)
    n_val = int(math.floor(Xs.n * vs))
    if n_val < 1 or n_val >= Xs.n:
        raise ValueError(
            f"fit: validation_split={vs} of {Xs.n} samples leaves {n_val} validation and "
            f"{Xs.n - n_val} training samples; both must be >= 1"
        )
    return Xs.tail(n_val), ys.tail(n_val)


def _check_optimizer(net: Network, optimizer: Any) -> Any:
    """``optimizer`` itself, or the registered one of that name (default ``"adam"``)."""
    try:
        opt = registry.resolve_optimizer(optimizer, net)
    except TypeError as exc:
        raise TypeError(f"fit: {exc}") from exc
    check_trains(opt, net, "fit")  # another network's, or stale arrays: before any batch
    return opt


def _check_callbacks(callbacks: Iterable[Callback] | None, progress: bool | None) -> list[Callback]:
    cbs = list(callbacks or [])
    for cb in cbs:
        if not isinstance(cb, Callback):
            raise TypeError(f"fit: callbacks must be nnrt Callback instances, got {cb!r}")
    if progress is None:
        try:
            progress = sys.stderr is not None and sys.stderr.isatty()
        except (AttributeError, ValueError):
            progress = False
    if progress and not any(isinstance(cb, ProgressBar) for cb in cbs):
        cbs.append(ProgressBar())
    return cbs


# ---------------------------------------------------------------- inference
def predict(net: Network, X: Any, batch_size: int | None = None) -> np.ndarray:
    """Scores (samples, out_features) of ``net`` in eval mode, computed in batches.

    Returns a new array of the network's dtype (never an internal buffer).
    """
    bs = DEFAULT_PREDICT_BATCH if batch_size is None else _check_batch_size(batch_size, "predict")
    Xs = _Rows(X, net, "predict: X")
    out: np.ndarray | None = None
    with state_lock(net):
        for start in range(0, Xs.n, bs):
            Y = net.forward(Xs.rows(start, start + bs), training=False)
            if out is None:
                out = np.empty((Xs.n, Y.shape[1]), dtype=Y.dtype)
            out[start : start + Y.shape[0]] = Y
    assert out is not None
    return out


def predict_classes(net: Network, X: Any, batch_size: int | None = None) -> np.ndarray:
    """Predicted class labels (int64): argmax of the scores, or ``score > 0`` for one output."""
    scores = predict(net, X, batch_size)
    if scores.shape[1] == 1:
        return (scores[:, 0] > 0).astype(np.int64)
    return scores.argmax(axis=1).astype(np.int64)


def evaluate(
    net: Network,
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
    Xs = _Rows(X, net, "evaluate: X")
    ys = _Rows(y, net, "evaluate: y", targets=Xs.n)
    if loss is None:
        loss = getattr(net, "_fit_loss", None) or (
            "softmax_cross_entropy" if ys.class_labels else "mse"
        )
    name, fn = _resolve_loss(loss)
    return _evaluate(net, Xs, ys, fn, name, bs)


def _evaluate(
    net: Network, Xs: _Rows, ys: _Rows, fn: LossFn, name: str, bs: int
) -> dict[str, float]:
    total = 0.0
    correct = 0
    with state_lock(net):
        for start in range(0, Xs.n, bs):
            Y = net.forward(Xs.rows(start, start + bs), training=False)
            yb = ys.rows(start, start + bs)
            value, _ = _call_loss(fn, Y, yb, name)
            total += value * Y.shape[0]
            if ys.class_labels:
                correct += n_correct(Y, yb)
    result = {"loss": total / Xs.n}
    if ys.class_labels:
        result["accuracy"] = correct / Xs.n
    return result


# ---------------------------------------------------------------- data in
class _Rows:
    """Samples of X or y, read by rows and cast to the network's dtype batch by batch.

    Holds numpy arrays that are views of the caller's data (a memory map stays
    one; a pandas DataFrame is one view of its values when its columns share a
    dtype, else one view per column), so nothing is copied whole. Features are
    2-D with the network's input width; targets have ``targets`` rows, and keep
    an integer dtype (class labels) or are cast to the network's dtype.
    """

    def __init__(self, data: Any, net: Network, what: str, targets: int | None = None) -> None:
        self.what = what
        self.columns = _columns(data, what)
        if self.columns is not None:  # a pandas DataFrame of mixed dtypes: one array per column
            first = self.columns[0]
            shape: tuple[int, ...] = (first.shape[0], len(self.columns))
            kinds = {c.dtype.kind for c in self.columns}
            src_dtype = np.result_type(*self.columns)
            self.arr = first  # only for messages
        else:
            self.arr = _as_array(data)
            shape, kinds, src_dtype = self.arr.shape, {self.arr.dtype.kind}, self.arr.dtype
        desc = _Desc(shape, src_dtype)  # formatted only for an error message
        if not kinds <= set("fiub"):
            raise TypeError(
                f"{what}: must be a real numeric array (float, int or bool), got {desc}"
            )
        if targets is None:
            if len(shape) != 2:
                raise ValueError(f"{what}: must be 2-D (samples, features), got {desc}")
            if shape[0] == 0:
                raise ValueError(f"{what}: is empty: {desc}")
            n_in = net.in_features
            if n_in is not None and shape[1] != n_in:
                raise ValueError(
                    f"{what}: has {shape[1]} features ({desc}), the network's first layer "
                    f"{net.layers[0]!r} expects {n_in}"
                )
            self.dtype = net.dtype
        else:
            if len(shape) == 0 or shape[0] != targets:
                raise ValueError(
                    f"{what}: has shape {shape}, expected {targets} rows to match the inputs"
                )
            self.dtype = src_dtype if src_dtype.kind in "iu" else net.dtype
        self.shape = shape
        self.n = int(shape[0])
        self.class_labels = targets is not None and len(shape) == 1 and src_dtype.kind in "iu"
        self.direct = self.columns is None and self.arr.dtype == self.dtype

    def _parts(self) -> list[np.ndarray]:
        return self.columns if self.columns is not None else [self.arr]

    def head(self, n: int) -> _Rows:
        return self._sliced(slice(0, n))

    def tail(self, n: int) -> _Rows:
        return self._sliced(slice(self.n - n, self.n))

    def _sliced(self, s: slice) -> _Rows:
        new = object.__new__(_Rows)
        new.__dict__.update(self.__dict__)
        if self.columns is not None:
            new.columns = [c[s] for c in self.columns]
        new.arr = self.arr[s]
        new.n = len(range(*s.indices(self.n)))
        new.shape = (new.n, *self.shape[1:])
        return new

    @property
    def fused_scan(self) -> bool:
        """Whether :meth:`gather` can scan for NaN/Inf as it copies (one float array, no cast)."""
        return self.direct and self.arr.dtype.kind == "f"

    def all_finite(self, rows: np.ndarray | None = None) -> bool:
        """No NaN/Inf in the rows ``rows`` (all of them if None), read in chunks."""
        for part in self._parts():
            if part.dtype.kind != "f":
                continue
            if rows is not None:
                if not np.isfinite(part[rows]).all():
                    return False
                continue
            for start in range(0, self.n, _SCAN_ROWS):
                if not np.isfinite(part[start : start + _SCAN_ROWS]).all():
                    return False
        return True

    def check_finite(self) -> None:
        """Raise ValueError naming the first NaN/Inf (read in chunks: no full-size temporaries)."""
        for j, part in enumerate(self._parts()):
            if part.dtype.kind != "f":
                continue
            for start in range(0, self.n, _SCAN_ROWS):
                chunk = part[start : start + _SCAN_ROWS]
                if np.isfinite(chunk).all():
                    continue
                bad = ~np.isfinite(chunk)
                first = [int(i) for i in np.argwhere(bad)[0]]
                first[0] += start
                if self.columns is not None:
                    first = [first[0], j]
                n_bad = sum(int((~np.isfinite(part[s : s + _SCAN_ROWS])).sum())
                            for s in range(start, self.n, _SCAN_ROWS))  # fmt: skip
                raise ValueError(
                    f"{self.what}: contains {n_bad} non-finite value(s) (NaN/Inf) from index "
                    f"{tuple(first)} on (shape {self.shape} dtype {part.dtype}); clean or "
                    f"impute them before fit"
                )

    def buffer(self, rows: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Batch buffer of the target dtype, and a scratch of the source dtype if they differ."""
        rows = min(rows, self.n)
        out = _aligned_empty((rows, *self.shape[1:]), self.dtype)
        if self.direct:
            return out, None
        if self.columns is not None:
            return out, None
        return out, np.empty((rows, *self.shape[1:]), dtype=self.arr.dtype)

    def gather(
        self, idx: np.ndarray, buf: tuple[np.ndarray, np.ndarray | None], check: bool = False
    ) -> np.ndarray:
        """Rows ``idx`` in the network's dtype, in ``buf`` (from :meth:`buffer`).

        ``check=True`` (only where :attr:`fused_scan`) raises ``NonFinite`` if a
        gathered row holds a NaN/Inf: the scan rides along with the copy.
        """
        m = idx.shape[0]
        out, scratch = buf[0][:m], buf[1]
        if self.columns is not None:  # column by column, each cast into place
            for j, col in enumerate(self.columns):
                out[:, j] = col[idx]
            return out
        dst = out if scratch is None else scratch[:m]
        # NOTE: take_rows (prefetching memcpy) for a C-contiguous source, np.take otherwise
        if not take_rows(self.arr, idx, dst, check):
            np.take(self.arr, idx, axis=0, out=dst)
            if check and not np.isfinite(dst).all():
                raise NonFinite(int(idx[np.argmax(~np.isfinite(dst).reshape(m, -1).all(1))]))
        if scratch is not None:
            np.copyto(out, dst, casting="unsafe")
        return out

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` in the network's dtype (a view where no cast is needed)."""
        if self.columns is None:
            return np.ascontiguousarray(self.arr[start:stop], dtype=self.dtype)
        return np.stack([c[start:stop] for c in self.columns], axis=1).astype(
            self.dtype, copy=False
        )


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` starting on a 64-byte (cache line) boundary, in memory
    numpy refuses to resize (``_PINNED``).

    NOTE: numpy's large allocations start 16 bytes past a page boundary, so every
    row of a gathered batch (256 bytes on tiny) straddled cache lines and the first
    layer's vector loads split: ~1% of a tiny fit step.
    """
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    key = id(raw)
    _PINNED[key] = weakref.ref(raw, functools.partial(_unpin, key))
    start = -raw.ctypes.data % 64
    return raw[start : start + nbytes].view(dt).reshape(shape)


# NOTE: the batch buffers fit hands to the first layer as trusted batches are read by
# GEMMs that release the GIL, and a user can reach them (a layer's cached input); numpy
# refuses to resize an array something holds a weak reference to, even with
# refcheck=False, so their memory never moves while it is read (an entry leaves this
# dict as its array dies)
_PINNED: dict[int, weakref.ref[np.ndarray]] = {}


def _unpin(key: int, _: object) -> None:
    _PINNED.pop(key, None)


class _Desc:
    def __init__(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = shape, dtype

    def __str__(self) -> str:
        return f"shape {self.shape} dtype {self.dtype}"


def _columns(data: Any, what: str) -> list[np.ndarray] | None:
    """A pandas DataFrame whose columns do not share one dtype: a view of each column."""
    mod = type(data).__module__ or ""
    if not mod.startswith("pandas") or not hasattr(data, "dtypes") or data.ndim != 2:
        return None
    dtypes = list(data.dtypes)
    if len(set(dtypes)) <= 1:
        return None
    cols = []
    for name in data.columns:
        arr = data[name].to_numpy(copy=False)
        if arr.dtype.kind not in "fiub":
            raise TypeError(
                f"{what}: column {name!r} has dtype {data[name].dtype}, not a real numeric one "
                f"(float, int or bool; convert or drop it, and fill missing values)"
            )
        cols.append(arr)
    return cols


def _as_array(data: Any) -> np.ndarray:
    """An ndarray view of ``data``: pandas objects through ``to_numpy`` (a view of one block)."""
    if isinstance(data, np.ndarray):
        return data
    to_numpy = getattr(data, "to_numpy", None)
    if callable(to_numpy) and (type(data).__module__ or "").startswith("pandas"):
        return np.asarray(to_numpy(copy=False))
    return np.asarray(data)


# ---------------------------------------------------------------- helpers
def has_batch_statistics(net: Network) -> bool:
    """True if some layer's class sets ``uses_batch_statistics = True`` (normalisation over the batch)."""
    return any(getattr(type(layer), "uses_batch_statistics", False) for layer in net.layers)


def _resolve_loss(loss: str | LossFn) -> tuple[str, LossFn]:
    fn = registry.resolve_loss(loss)
    name = loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__)
    return name, fn


def _call_loss(fn: LossFn, Y: np.ndarray, target: np.ndarray, name: str) -> tuple[float, Any]:
    result = fn(Y, target)
    if not isinstance(result, tuple) or len(result) != 2:
        raise TypeError(f"loss {name!r} must return (loss, dY), got {type(result).__name__}")
    value, dY = result
    return float(value), dY


def _writeable(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.flags.writeable


def _check_batch_size(batch_size: Any, what: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"{what}: batch_size must be a positive int, got {batch_size!r}")
    if batch_size <= 0:
        raise ValueError(f"{what}: batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)
