"""scikit-learn estimators on nnrt networks: ``MLPClassifier`` and ``MLPRegressor``.

Needs the optional extra ``nnrt[sklearn]`` (scikit-learn >= 1.3). Both are
ordinary scikit-learn estimators (``get_params``/``set_params``, ``clone``,
``Pipeline``, ``GridSearchCV``, pickling) and pass
``sklearn.utils.estimator_checks.check_estimator``.

The network is ``hidden`` blocks followed by one ``dense`` output layer. An
int ``w`` in ``hidden`` is the default hidden block of width ``w``, whose layers the
plugins choose (hook ``nnrt_default_block``; with nnrt's own plugins
``dense_nobias(·, w)``, a normalisation of width ``w``, ``sigmoid``); a str ``"name"`` or a tuple
``("name", *args)`` inserts that registered layer as is (``("dense", 64,
32)``, ``"tanh"``), so any plugin layer can be used. ``hidden=()`` is a
linear model.

Training is ``nnrt.engine.fit`` (the loop behind ``Sequential.fit``):
mini-batches of ``batch_size``, reshuffled every epoch (each ``fit`` /
``partial_fit`` call seeds the shuffling from ``random_state``'s stream), with
``optimizer`` any registered optimizer name (``nnrt.available_optimizers()``:
``"adam"`` (default), ``"adamw"``, ``"sgd"`` (``momentum``) or a plugin's; it
gets those of ``lr``, ``momentum``, ``weight_decay`` its constructor takes); as
in ``Sequential.fit``, a last mini-batch of one sample is skipped with a
``nnrt.TrainingWarning`` when a layer has ``uses_batch_statistics``, and a non-finite loss
raises ``FloatingPointError``. ``fit`` starts from new weights; ``partial_fit``
runs one epoch and keeps the weights and the optimizer state between calls.

The classifier minimises softmax cross-entropy over ``len(classes_)``
outputs; the regressor minimises the mean squared error of standardised
targets (``y`` is centred and scaled by its training mean and standard
deviation inside ``fit``; ``predict`` undoes it), so that the default
learning rate suits targets of any scale. ``dtype`` is the network's dtype
(default ``"float64"``; ``"float32"`` is faster); predictions are float64.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import expit

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, check_random_state
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nnrt.sklearn needs scikit-learn >= 1.3: pip install 'nnrt[sklearn]'"
    ) from exc

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _sk_validate_data
except ImportError:  # pragma: no cover - older scikit-learn

    def _sk_validate_data(estimator: Any, *args: Any, **kwargs: Any) -> Any:
        return estimator._validate_data(*args, **kwargs)


import nnrt
from nnrt import engine
from nnrt.network import Sequential
from nnrt.optim import Optimizer
from nnrt.registry import registry

__all__ = ["MLPClassifier", "MLPRegressor"]

_PREDICT_BATCH = 4096


def _check_int(name: str, value: Any, owner: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, value: Any, owner: str, positive: bool) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{owner}: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


class _BaseMLP(BaseEstimator):
    """Shared parameters, network building and the training loop."""

    def __init__(
        self,
        hidden: Sequence[Any] = (64,),
        *,
        epochs: int = 100,
        batch_size: int = 32,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        dtype: str = "float64",
        random_state: Any = 0,
    ) -> None:
        # NOTE: no validation here (scikit-learn convention): fit validates.
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.dtype = dtype
        self.random_state = random_state

    # --------------------------------------------------------------- building
    def _check_params(self) -> None:
        owner = type(self).__name__
        _check_int("epochs", self.epochs, owner, 0)
        _check_int("batch_size", self.batch_size, owner, 1)
        _check_float("lr", self.lr, owner, positive=True)
        _check_float("weight_decay", self.weight_decay, owner, positive=False)
        _check_float("momentum", self.momentum, owner, positive=False)
        known = registry.optimizers()
        if not isinstance(self.optimizer, str) or self.optimizer not in known:
            raise ValueError(
                f"{owner}: optimizer must be a registered optimizer name "
                f"({', '.join(sorted(known))}), got {self.optimizer!r}"
            )
        if str(self.dtype) not in ("float32", "float64"):
            raise ValueError(f"{owner}: dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if isinstance(self.hidden, (str, bytes)) or not isinstance(self.hidden, Sequence):
            raise TypeError(
                f"{owner}: hidden must be a tuple/list of block widths (int) or layer specs "
                f"('name' or ('name', *args)), got {self.hidden!r}"
            )

    def _seeds(self) -> tuple[int, np.random.Generator]:
        """(network seed, shuffling generator), both drawn from ``random_state``."""
        rs = check_random_state(self.random_state)
        seed = int(rs.randint(0, 2**31 - 1))
        return seed, np.random.default_rng(int(rs.randint(0, 2**31 - 1)))

    def _build(self, n_in: int, n_out: int, seed: int) -> Sequential:
        from nnrt._hooks import default_block_spec
        from nnrt.cli import build_layers

        owner = type(self).__name__
        layers: list[nnrt.Layer] = []
        width = n_in
        for k, item in enumerate(self.hidden):
            if isinstance(item, numbers.Integral) and not isinstance(item, (bool, np.bool_)):
                w = _check_int(f"hidden[{k}]", item, owner, 1)
                layers += build_layers(default_block_spec(w), width)
                width = w
                continue
            if isinstance(item, str):
                name, args = item, ()
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], str):
                name, args = item[0], tuple(item[1:])
            else:
                raise TypeError(
                    f"{owner}: hidden[{k}] must be an int (block width), a layer name or a "
                    f"tuple ('name', *args), got {item!r}"
                )
            layer = nnrt.layer(name, *args)
            if layer.out_features is not None:
                width = int(layer.out_features)
            layers.append(layer)
        layers.append(nnrt.layer("dense", width, n_out))
        return Sequential(layers, seed=seed, dtype=str(self.dtype))

    def _make_optimizer(self, net: Sequential) -> Optimizer:
        opt: Optimizer = registry.make_optimizer_from(
            self.optimizer, net, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        return opt

    def _initialize(self, n_in: int, n_out: int) -> None:
        self._check_params()
        seed, self._rng = self._seeds()
        self.net_ = self._build(n_in, n_out, seed)
        self._optim = self._make_optimizer(self.net_)
        self.loss_curve_: list[float] = []
        self.n_iter_ = 0

    # --------------------------------------------------------------- training
    _loss_name = ""

    def _run_epochs(self, X: np.ndarray, T: np.ndarray, epochs: int) -> None:
        # NOTE: each call shuffles with a new seed drawn from random_state's stream, so
        # successive partial_fit calls do not repeat one permutation
        hist = engine.fit(
            self.net_,
            X,
            T,
            loss=self._loss_name,
            optimizer=self._optim,
            epochs=epochs,
            batch_size=int(self.batch_size),
            seed=int(self._rng.integers(2**63 - 1)),
            progress=False,
        )
        self.loss_curve_ += hist.history.get("loss", [])
        self.n_iter_ += len(hist.epoch)

    def _forward(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(engine.predict(self.net_, X, _PREDICT_BATCH), dtype=np.float64)

    # ---------------------------------------------------------------- pickling
    # The fitted network is pickled as (layer names, configs, arrays) and rebuilt
    # on load: the arrays are copied into freshly allocated, writable layers. A
    # layer pickled as is would carry its cached work buffers, and a read-only
    # unpickle (joblib's mmap_mode="r", used by check_estimator) would then hand
    # read-only memory to the kernels.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        net = state.pop("net_", None)
        opt = state.pop("_optim", None)
        if net is not None:
            state["_net_spec"] = {
                "layers": [(registry.name_of(type(layer)), layer.config()) for layer in net],
                "dtype": net.dtype.name,
                "seed": net.seed,
                "arrays": net.state_dict(),
                "optimizer": opt.state_dict() if opt is not None else None,
            }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        spec = state.pop("_net_spec", None)
        super().__setstate__(state)
        if spec is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # network checks already warned at fit time
            layers = [nnrt.layer(name, **cfg) for name, cfg in spec["layers"]]
            net = Sequential(layers, seed=spec["seed"], dtype=spec["dtype"])
        net.load_state_dict(spec["arrays"])
        self.net_ = net
        self._optim = self._make_optimizer(net)
        if spec["optimizer"] is not None:
            self._optim.load_state_dict(spec["optimizer"])


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multi-layer perceptron classifier on nnrt (softmax cross-entropy).

    Parameters
    ----------
    hidden : tuple, default (64,)
        Block widths (int: the default hidden block, see ``nnrt.sklearn``) or layer
        specs (``"name"`` / ``("name", *args)``); see ``nnrt.sklearn``.
    epochs : int, default 100
        Passes over the data in ``fit`` (``partial_fit`` always runs one).
    batch_size : int, default 32
    lr : float, default 1e-3
    optimizer : str, default "adam"
        A registered optimizer name: "adam", "adamw", "sgd" or a plugin's.
    weight_decay : float, default 0.0
        L2 (adam, sgd) or decoupled (adamw) weight decay.
    momentum : float, default 0.9
        SGD momentum (ignored by adam/adamw).
    dtype : {"float64", "float32"}, default "float64"
        The network's dtype.
    random_state : int, RandomState instance or None, default 0
        Seeds the weights and the shuffling.

    Attributes
    ----------
    classes_ : ndarray
        The class labels, sorted.
    n_features_in_ : int
    net_ : nnrt.Sequential
        The trained network (its outputs are the logits of ``classes_``).
    loss_curve_ : list of float
        Mean training loss of each epoch.
    n_iter_ : int
        Epochs run so far.
    """

    _loss_name = "softmax_cross_entropy"

    def _encode(self, y: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.classes_, y)
        idx = np.clip(idx, 0, len(self.classes_) - 1)
        bad = self.classes_[idx] != y
        if np.any(bad):
            raise ValueError(
                f"{type(self).__name__}: y holds labels not in classes_ {self.classes_.tolist()}: "
                f"{np.unique(y[bad]).tolist()[:10]}"
            )
        return idx.astype(np.int64)

    def fit(self, X: Any, y: Any) -> MLPClassifier:
        """Train a new network for ``epochs`` epochs; returns self."""
        X, y = _sk_validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__}: needs samples of at least 2 classes in the data, "
                f"but the data contains only one class: {classes.tolist()}"
            )
        self.classes_ = classes
        self._initialize(X.shape[1], len(classes))
        self._run_epochs(X, self._encode(y), int(self.epochs))
        return self

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> MLPClassifier:
        """One epoch over (X, y), continuing from the current weights.

        ``classes`` (all labels that will ever appear) is required on the first
        call, as for scikit-learn's incremental classifiers; later calls may
        omit it but must pass the same set if they give it.
        """
        first = not hasattr(self, "net_")
        X, y = _sk_validate_data(self, X, y, dtype=[np.float64, np.float32], reset=first)
        check_classification_targets(y)
        if first:
            if classes is None:
                raise ValueError(
                    f"{type(self).__name__}: classes must be passed on the first call to "
                    f"partial_fit"
                )
            classes = np.unique(np.asarray(classes))
            if len(classes) < 2:
                raise ValueError(
                    f"{type(self).__name__}: needs at least 2 classes, got {classes.tolist()}"
                )
            self.classes_ = classes
            self._initialize(X.shape[1], len(classes))
        elif classes is not None and not np.array_equal(np.unique(classes), self.classes_):
            raise ValueError(
                f"{type(self).__name__}: classes {np.unique(classes).tolist()} differ from "
                f"those of the first partial_fit call {self.classes_.tolist()}"
            )
        self._run_epochs(X, self._encode(y), 1)
        return self

    def _logits(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = _sk_validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self._forward(X)

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores, float64: the logits (n_samples, n_classes); for two classes, as
        scikit-learn's convention, one score per sample, ``logit[1] - logit[0]``
        (> 0 means ``classes_[1]``)."""
        z = self._logits(X)
        if len(self.classes_) == 2:
            return z[:, 1] - z[:, 0]
        return z

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the logits, shape (n_samples, n_classes); rows sum to 1."""
        z = self._logits(X)
        if len(self.classes_) == 2:
            d = z[:, 1] - z[:, 0]
            return np.column_stack([expit(-d), expit(d)])
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log of ``predict_proba``, computed stably from the logits."""
        z = self._logits(X)
        z -= z.max(axis=1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
        return z

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class label of each sample."""
        idx = np.argmax(self._logits(X), axis=1)
        return self.classes_[idx]


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multi-layer perceptron regressor on nnrt (mean squared error).

    Same parameters as ``MLPClassifier``. ``y`` may be 1-D or 2-D (several
    targets); it is standardised for training (``y_mean_``, ``y_scale_``) and
    ``predict`` returns the original units, with the shape ``y`` had.

    Attributes: ``n_features_in_``, ``net_``, ``loss_curve_`` (mean squared
    error of the standardised targets), ``n_iter_``, ``y_mean_``, ``y_scale_``.
    """

    _loss_name = "mse"

    def __sklearn_tags__(self) -> Any:  # scikit-learn >= 1.6
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self) -> dict[str, Any]:  # scikit-learn < 1.6
        return {"multioutput": True}

    def _targets(self, y: np.ndarray) -> np.ndarray:
        Y = y.reshape(len(y), -1) if y.ndim == 1 else y
        return np.ascontiguousarray((Y - self.y_mean_) / self.y_scale_, dtype=str(self.dtype))

    def _start(self, X: np.ndarray, y: np.ndarray) -> None:
        Y = y.reshape(len(y), -1) if y.ndim == 1 else y
        self._y_1d = y.ndim == 1
        self.y_mean_ = Y.mean(axis=0)
        scale = Y.std(axis=0)
        self.y_scale_ = np.where(scale > 0, scale, 1.0)
        self._initialize(X.shape[1], Y.shape[1])

    def fit(self, X: Any, y: Any) -> MLPRegressor:
        """Train a new network for ``epochs`` epochs; returns self."""
        X, y = _sk_validate_data(
            self, X, y, dtype=[np.float64, np.float32], multi_output=True, y_numeric=True
        )
        y = np.asarray(y, dtype=np.float64)
        self._start(X, y)
        self._run_epochs(X, self._targets(y), int(self.epochs))
        return self

    def partial_fit(self, X: Any, y: Any) -> MLPRegressor:
        """One epoch over (X, y), continuing from the current weights.

        The target standardisation is fixed by the first call's ``y``.
        """
        first = not hasattr(self, "net_")
        X, y = _sk_validate_data(
            self,
            X,
            y,
            dtype=[np.float64, np.float32],
            multi_output=True,
            y_numeric=True,
            reset=first,
        )
        y = np.asarray(y, dtype=np.float64)
        if first:
            self._start(X, y)
        else:
            n_out = len(self.y_mean_)
            got = 1 if y.ndim == 1 else y.shape[1]
            if got != n_out:
                raise ValueError(
                    f"{type(self).__name__}: y has {got} target(s), but the model was "
                    f"started with {n_out}"
                )
        self._run_epochs(X, self._targets(y), 1)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predictions in the units of ``y``: (n_samples,) or (n_samples, n_targets), float64."""
        check_is_fitted(self)
        X = _sk_validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        out = self._forward(X) * self.y_scale_ + self.y_mean_
        return out.ravel() if self._y_1d else out
