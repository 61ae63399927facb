"""scikit-learn estimators: the full estimator check suite, Pipeline, GridSearchCV,
and the trained network checked against independent references (a numpy
forward pass, torch for one training step)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_iris, make_regression  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import nnrt  # noqa: E402
from nnrt.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# No check is expected to fail: this dict is empty on purpose (docs/ecosystem.md).
EXPECTED_FAILED_CHECKS: dict[str, str] = {}


def _expected_failed(estimator: Any) -> dict[str, str]:
    return EXPECTED_FAILED_CHECKS


def _parametrize_checks() -> Any:
    estimators = [MLPClassifier(), MLPRegressor()]
    try:  # scikit-learn >= 1.6
        return parametrize_with_checks(estimators, expected_failed_checks=_expected_failed)
    except TypeError:  # pragma: no cover - older scikit-learn
        return parametrize_with_checks(estimators)


@_parametrize_checks()
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)


# ------------------------------------------------------------ references
def _numpy_logits(est: Any, X: np.ndarray) -> np.ndarray:
    """Eval forward of the default [dense_nobias → batchnorm → sigmoid]* → dense, float64."""
    s = {k: v.astype(np.float64) for k, v in est.net_.state_dict().items()}
    h = np.asarray(X, dtype=np.float64)
    n_blocks = (len(est.net_) - 1) // 3
    for b in range(n_blocks):
        i = 3 * b
        eps = est.net_[i + 1].config()["eps"]
        h = h @ s[f"{i}.weight"]
        h = (h - s[f"{i + 1}.running_mean"]) / np.sqrt(s[f"{i + 1}.running_var"] + eps)
        h = h * s[f"{i + 1}.gamma"] + s[f"{i + 1}.beta"]
        h = 1.0 / (1.0 + np.exp(-h))
    last = len(est.net_) - 1
    return h @ s[f"{last}.weight"] + s[f"{last}.bias"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, ...]:
    X, y = load_iris(return_X_y=True)
    return tuple(train_test_split(X, y, test_size=0.3, random_state=0, stratify=y))


def test_classifier_learns(iris: tuple[np.ndarray, ...]) -> None:
    Xtr, Xte, ytr, yte = iris
    names = np.array(["setosa", "versicolor", "virginica"])
    clf = MLPClassifier(hidden=(32,), epochs=60, lr=1e-2, random_state=0).fit(Xtr, names[ytr])
    assert list(clf.classes_) == list(names)
    assert clf.n_features_in_ == 4 and clf.n_iter_ == 60 and len(clf.loss_curve_) == 60
    assert clf.loss_curve_[-1] < 0.3 * clf.loss_curve_[0]
    assert clf.score(Xte, names[yte]) > 0.9
    assert set(clf.predict(Xte)) <= set(names)


def test_classifier_predictions_match_numpy(iris: tuple[np.ndarray, ...]) -> None:
    Xtr, Xte, ytr, yte = iris
    clf = MLPClassifier(hidden=(32, 8), epochs=20, lr=1e-2, random_state=0).fit(Xtr, ytr + 10)
    # predictions against a numpy forward pass of the trained weights (two blocks)
    z = _numpy_logits(clf, Xte)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(clf.decision_function(Xte), z, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(clf.predict_proba(Xte), p, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(Xte)), p, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(clf.predict(Xte), np.argmax(z, axis=1) + 10)


def test_binary_decision_function_convention() -> None:
    X, y = load_iris(return_X_y=True)
    X, y = X[y < 2], y[y < 2]
    clf = MLPClassifier(hidden=(4,), epochs=20).fit(X, y)
    z = _numpy_logits(clf, X)
    d = clf.decision_function(X)
    assert d.shape == (len(X),)
    np.testing.assert_allclose(d, z[:, 1] - z[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(clf.predict_proba(X)[:, 1], 1 / (1 + np.exp(-d)), rtol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), (d > 0).astype(int))


def test_one_training_step_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    X, y = load_iris(return_X_y=True)
    n = len(X)
    params: dict[str, Any] = dict(
        hidden=(5,), optimizer="sgd", lr=0.3, momentum=0.0, batch_size=n, random_state=4
    )
    start = MLPClassifier(epochs=0, **params).fit(X, y)  # initial weights, no step
    model = start.net_.to_torch()
    model.train()
    logits = model(torch.from_numpy(X))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.3 * p.grad
    stepped = MLPClassifier(epochs=1, **params).fit(X, y)  # one full-batch step
    expected = nnrt.from_torch(model).state_dict()
    got = stepped.net_.state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_partial_fit_continues_like_fit() -> None:
    X, y = load_iris(return_X_y=True)
    full: dict[str, Any] = dict(hidden=(6,), batch_size=len(X), random_state=2)
    fitted = MLPClassifier(epochs=3, **full).fit(X, y)
    inc = MLPClassifier(**full)
    with pytest.raises(ValueError, match="classes must be passed"):
        inc.partial_fit(X, y)
    inc.partial_fit(X, y, classes=[0, 1, 2])
    inc.partial_fit(X, y)
    inc.partial_fit(X, y, classes=[2, 1, 0])
    assert inc.n_iter_ == 3
    # one full-batch epoch per call, Adam state carried over: the same weights
    for k, v in fitted.net_.state_dict().items():
        np.testing.assert_allclose(inc.net_.state_dict()[k], v, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="classes"):
        inc.partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="not in classes_"):
        inc.partial_fit(X, y + 5)


def test_pickle_mid_training_keeps_optimizer_state(tmp_path: Any) -> None:
    joblib = pytest.importorskip("joblib")
    X, y = load_iris(return_X_y=True)
    a = MLPClassifier(hidden=(6,), random_state=1).partial_fit(X, y, classes=[0, 1, 2])
    b = pickle.loads(pickle.dumps(a))
    a.partial_fit(X, y)
    b.partial_fit(X, y)
    for k, v in a.net_.state_dict().items():
        np.testing.assert_array_equal(b.net_.state_dict()[k], v)
    # read-only memory-mapped load (as joblib/check_estimator do) stays usable
    path = tmp_path / "clf.joblib"
    joblib.dump(a, path)
    c = joblib.load(path, mmap_mode="r")
    np.testing.assert_array_equal(c.predict_proba(X), a.predict_proba(X))
    c.partial_fit(X, y)  # trains: its arrays are writable copies


def test_regressor_learns_scaled_targets_and_matches_numpy() -> None:
    X, y = make_regression(n_samples=300, n_features=6, noise=5.0, random_state=0)
    y = 1000.0 * y + 5e4  # far from unit scale: standardised internally
    Xtr, Xte, ytr, yte = train_test_split(X, y, random_state=0)
    reg = MLPRegressor(hidden=(32,), epochs=150, lr=3e-3, random_state=0).fit(Xtr, ytr)
    assert reg.score(Xte, yte) > 0.95
    pred = reg.predict(Xte)
    assert pred.shape == (len(Xte),) and pred.dtype == np.float64
    ref = _numpy_logits(reg, Xte)[:, 0] * reg.y_scale_[0] + reg.y_mean_[0]
    np.testing.assert_allclose(pred, ref, rtol=1e-10)
    np.testing.assert_allclose(reg.y_mean_, [ytr.mean()])
    np.testing.assert_allclose(reg.y_scale_, [ytr.std()])


def test_regressor_multi_output_and_partial_fit() -> None:
    X, Y = make_regression(n_samples=200, n_features=5, n_targets=3, random_state=1)
    reg = MLPRegressor(hidden=(16,), epochs=5).fit(X, Y)
    assert reg.predict(X).shape == (200, 3)
    inc = MLPRegressor(hidden=(16,)).partial_fit(X, Y)
    inc.partial_fit(X, Y)
    assert inc.n_iter_ == 2 and inc.predict(X[:7]).shape == (7, 3)
    with pytest.raises(ValueError, match="3"):
        inc.partial_fit(X, Y[:, 0])


def test_pipeline_and_grid_search(iris: tuple[np.ndarray, ...]) -> None:
    Xtr, Xte, ytr, yte = iris
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden=(16,), epochs=40, lr=1e-2))
    assert pipe.fit(Xtr, ytr).score(Xte, yte) > 0.9
    grid = GridSearchCV(
        pipe,
        {"mlpclassifier__hidden": [(4,), (8,)], "mlpclassifier__lr": [3e-3, 1e-2]},
        cv=3,
    )
    grid.fit(Xtr, ytr)
    assert len(grid.cv_results_["params"]) == 4
    assert grid.best_params_["mlpclassifier__hidden"] in [(4,), (8,)]
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    assert grid.score(Xte, yte) > 0.9
    best = grid.best_estimator_[-1]
    assert best.hidden == grid.best_params_["mlpclassifier__hidden"]


def test_hidden_spec_with_layer_names_and_float32() -> None:
    X, y = load_iris(return_X_y=True)
    clf = MLPClassifier(hidden=(8, ("dense", 8, 6), "sigmoid"), dtype="float32", epochs=5)
    clf.fit(X, y)
    names = [nnrt.registry.name_of(type(layer)) for layer in clf.net_]
    assert names == ["dense_nobias", "batchnorm", "sigmoid", "dense", "sigmoid", "dense"]
    assert clf.net_.dtype == np.float32 and clf.predict_proba(X).dtype == np.float64
    linear = MLPRegressor(hidden=()).fit(X, X[:, 0])
    assert len(linear.net_) == 1


def test_bad_parameters_raise_at_fit() -> None:
    X, y = load_iris(return_X_y=True)
    cases: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"optimizer": "lbfgs"}, ValueError),
        ({"epochs": -1}, ValueError),
        ({"batch_size": 0}, ValueError),
        ({"lr": 0.0}, ValueError),
        ({"dtype": "float16"}, ValueError),
        ({"hidden": 8}, TypeError),
        ({"hidden": (8.5,)}, TypeError),
        ({"hidden": ("no_such_layer",)}, KeyError),
    ]
    for params, exc in cases:
        est = MLPClassifier(**params)  # construction never validates
        with pytest.raises(exc):
            clone(est).fit(X, y)


def test_sgd_and_adamw_train() -> None:
    X, y = load_iris(return_X_y=True)
    for opt in ("sgd", "adamw"):
        clf = MLPClassifier(hidden=(8,), optimizer=opt, lr=0.05, epochs=30).fit(X, y)
        assert clf.score(X, y) > 0.9, opt
