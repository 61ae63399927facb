"""Losses and optimizers as plugins: registration, validation, lookup by name, use in fit,
the CLI and the scikit-learn estimators.

References are written here in float64 numpy (a single dense layer trained by hand).
The global registry is process-global, so every plugin registered here uses names
unique to the test (``_uid``).
"""

from __future__ import annotations

import itertools
import types
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.registry import PluginError

_counter = itertools.count()


def _uid(prefix: str) -> str:
    return f"{prefix}_{next(_counter)}_{id(object()) % 100000}"


def huber(Y: Any, target: Any) -> tuple[float, np.ndarray]:
    """Mean Huber loss (delta 1) over all elements."""
    Y = np.asarray(Y)
    d = Y - np.asarray(target, dtype=Y.dtype).reshape(Y.shape)
    a = np.abs(d)
    loss = np.where(a <= 1.0, 0.5 * d * d, a - 0.5)
    dY = np.clip(d, -1.0, 1.0) / d.size
    return float(loss.mean()), dY.astype(Y.dtype)


class SignSGD(nnrt.optim.Optimizer):
    """p -= lr * sign(g), written on the public Optimizer base."""

    def __init__(self, net: Any, lr: float = 0.01) -> None:
        super().__init__(net)
        self.lr = lr

    def hyperparams(self) -> dict[str, Any]:
        return {"lr": self.lr}

    def _update(self, i: int, p: np.ndarray, g: np.ndarray) -> None:
        p -= self.lr * np.sign(g)


def _plugin(loss_name: str, opt_name: str) -> types.SimpleNamespace:
    @nnrt.hookimpl
    def nnrt_register_losses(register: Any) -> None:
        register(loss_name, huber)

    @nnrt.hookimpl
    def nnrt_register_optimizers(register: Any) -> None:
        register(opt_name, SignSGD)

    return types.SimpleNamespace(
        nnrt_register_losses=nnrt_register_losses,
        nnrt_register_optimizers=nnrt_register_optimizers,
    )


@pytest.fixture(scope="module")
def names() -> tuple[str, str, str]:
    loss_name, opt_name = _uid("huber"), _uid("signsgd")
    pname = nnrt.register_plugin(_plugin(loss_name, opt_name), name=_uid("components"))
    return loss_name, opt_name, pname


def test_builtins_register_through_the_hooks() -> None:
    assert nnrt.available_optimizers()["sgd"] == "nnrt"
    assert nnrt.available_optimizers()["adam"] == "nnrt"
    assert nnrt.available_optimizers()["adamw"] == "nnrt"
    assert set(nnrt.available_losses()) >= {"softmax_cross_entropy", "mse", "bce_with_logits"}
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0)
    opt = nnrt.optimizer("sgd", net, lr=0.5, momentum=0.9)
    assert isinstance(opt, nnrt.optim.SGD) and opt.lr == 0.5 and opt.momentum == 0.9
    assert type(nnrt.optimizer("adamw", net)) is nnrt.optim.AdamW


def test_unknown_names_list_the_registered_ones() -> None:
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0)
    with pytest.raises(KeyError, match="unknown optimizer 'adagrad'.*adam, adamw"):
        nnrt.optimizer("adagrad", net)
    with pytest.raises(KeyError, match="unknown loss 'hinge'.*bce_with_logits, "):
        nnrt.loss("hinge")
    with pytest.raises(TypeError, match="str"):
        nnrt.loss(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'sgd'.*lr"):
        nnrt.optimizer("sgd", net)  # SGD's lr has no default


def test_plugin_loss_and_optimizer_are_listed(names: tuple[str, str, str]) -> None:
    loss_name, opt_name, pname = names
    assert nnrt.available_losses()[loss_name] == pname
    assert nnrt.available_optimizers()[opt_name] == pname
    assert nnrt.loss(loss_name) is huber
    info = nnrt.registry.plugins()[pname]
    assert info.losses == [loss_name] and info.optimizers == [opt_name]


def test_plugin_loss_and_optimizer_train_by_name_in_fit(names: tuple[str, str, str]) -> None:
    loss_name, opt_name, _ = names
    rng = np.random.default_rng(1)
    X = rng.normal(size=(16, 3))
    y = rng.normal(size=(16, 2)) * 3
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0, dtype="float64")
    W = net.params()["0.weight"].copy()
    b = net.params()["0.bias"].copy()
    hist = net.fit(X, y, loss=loss_name, optimizer=opt_name, epochs=3, batch_size=16)
    # reference: full-batch gradient descent by hand, float64
    for _ in range(3):
        d = X @ W + b - y
        dY = np.clip(d, -1.0, 1.0) / d.size
        gW, gb = X.T @ dY, dY.sum(axis=0)
        W -= 0.01 * np.sign(gW)
        b -= 0.01 * np.sign(gb)
    np.testing.assert_allclose(net.params()["0.weight"], W, rtol=0, atol=1e-12)
    np.testing.assert_allclose(net.params()["0.bias"], b, rtol=0, atol=1e-12)
    assert len(hist.history["loss"]) == 3


def test_fit_builds_a_named_builtin_optimizer_with_its_defaults() -> None:
    rng = np.random.default_rng(2)
    X = rng.normal(size=(8, 3))
    y = rng.normal(size=(8, 2))
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)], seed=0, dtype="float64")
    W = net.params()["0.weight"].copy()
    b = net.params()["0.bias"].copy()
    net.fit(X, y, loss="mse", optimizer="adamw", epochs=1, batch_size=8, shuffle=False)
    # AdamW's defaults (lr 1e-3, weight_decay 1e-2, eps 1e-8); at t = 1 the bias-corrected
    # moments are g and g*g, so the step is lr * g / (|g| + eps) after p *= 1 - lr wd
    dY = 2.0 * (X @ W + b - y) / y.size
    for p, g, key in ((W, X.T @ dY, "0.weight"), (b, dY.sum(axis=0), "0.bias")):
        ref = p * (1 - 1e-3 * 1e-2) - 1e-3 * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(net.params()[key], ref, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="fit:.*'sgd'.*nnrt.optimizer"):
        net.fit(X, y, loss="mse", optimizer="sgd", epochs=1)


def test_a_builtin_name_is_never_displaced() -> None:
    @nnrt.hookimpl
    def nnrt_register_losses(register: Any) -> None:
        register("mse", huber)

    plugin = types.SimpleNamespace(nnrt_register_losses=nnrt_register_losses)
    pname = _uid("displacer")
    with pytest.raises(ValueError, match=rf"{pname}.*'mse'.*'nnrt'"):
        nnrt.register_plugin(plugin, name=pname)
    assert nnrt.loss("mse") is nnrt.losses.mse
    assert pname not in nnrt.registry.plugins()

    @nnrt.hookimpl
    def nnrt_register_optimizers(register: Any) -> None:
        register("adam", SignSGD)

    plugin2 = types.SimpleNamespace(nnrt_register_optimizers=nnrt_register_optimizers)
    with pytest.raises(ValueError, match=r"'adam'.*'nnrt'"):
        nnrt.register_plugin(plugin2, name=_uid("displacer"))
    assert nnrt.registry.get_optimizer("adam").cls is nnrt.optim.Adam


@pytest.mark.parametrize(
    "hook, value, match",
    [
        ("losses", 42, "must be a function"),
        ("losses", lambda Y: (0.0, Y), "must be a function"),
        ("optimizers", huber, "needs an optimizer class"),
        ("optimizers", type("NoStep", (), {"__init__": lambda self, net: None}), "lacks step"),
        ("optimizers", type("NoNet", (nnrt.optim.SGD,), {"__init__": lambda self: None}), "cls"),
    ],
)
def test_bad_registrations_are_refused_and_leave_nothing(hook: str, value: Any, match: str) -> None:
    name = _uid("bad")

    def register_it(register: Any) -> None:
        register(name, value)

    register_it.__name__ = f"nnrt_register_{hook}"
    impl = nnrt.hookimpl(register_it)
    plugin = types.SimpleNamespace(**{f"nnrt_register_{hook}": impl})
    pname = _uid("badplugin")
    with pytest.raises(TypeError, match=match):
        nnrt.register_plugin(plugin, name=pname)
    assert name not in nnrt.available_losses() and name not in nnrt.available_optimizers()
    assert pname not in nnrt.registry.plugins()


def test_hook_returning_a_value_is_a_plugin_error() -> None:
    @nnrt.hookimpl
    def nnrt_register_losses(register: Any) -> Any:
        return {"x": huber}

    with pytest.raises(PluginError, match="must return None"):
        nnrt.register_plugin(
            types.SimpleNamespace(nnrt_register_losses=nnrt_register_losses), name=_uid("ret")
        )


def test_sklearn_estimator_takes_a_plugin_optimizer_name(names: tuple[str, str, str]) -> None:
    pytest.importorskip("sklearn")
    from nnrt.sklearn import MLPRegressor

    _, opt_name, _ = names
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 3))
    y = X @ np.array([1.0, -2.0, 0.5])
    est = MLPRegressor(hidden=(), optimizer=opt_name, lr=0.05, epochs=5, random_state=0)
    est.fit(X, y)
    assert type(est._optim) is SignSGD and est._optim.lr == 0.05
    with pytest.raises(ValueError, match="registered optimizer name"):
        MLPRegressor(optimizer="nope").fit(X, y)


def test_cli_train_takes_registered_names(tmp_path: Any) -> None:
    from nnrt import cli

    rng = np.random.default_rng(4)
    X = rng.normal(size=(32, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    data = tmp_path / "d.npz"
    np.savez(data, X=X, y=y)
    out = tmp_path / "m.npz"
    rc = cli.main(
        ["train", "--data", str(data), "--layers", "dense:8,sigmoid", "--epochs", "1",
         "--optimizer", "adamw", "--loss", "softmax_cross_entropy", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0 and out.exists()
    rc = cli.main(
        [
            "train",
            "--data",
            str(data),
            "--layers",
            "dense:8",
            "--optimizer",
            "adagrad",
            "--out",
            str(out),
        ]
    )
    assert rc != 0


def test_optimizer_refuses_parameters_the_kernel_cannot_update() -> None:
    class Strided(nnrt.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.w = np.zeros((4, 4))[:, ::2]
            self.g = np.zeros((4, 2))

        def forward(self, X: Any, training: bool = False) -> Any:
            return X

        def backward(self, dY: Any) -> Any:
            return dY

        def params(self) -> dict[str, np.ndarray]:
            return {"w": self.w}

        def grads(self) -> dict[str, np.ndarray]:
            return {"w": self.g}

    with pytest.raises(ValueError, match="'w' must be a C-contiguous"):
        nnrt.optim.SGD(Strided(), lr=0.1)
    with pytest.raises(ValueError, match="'w' must be a C-contiguous"):
        nnrt.optim.Adam(Strided())
    layer = nnrt.layer("dense", 3, 2)
    opt = nnrt.optim.SGD(layer, lr=0.1)
    layer.params()["weight"].flags.writeable = False
    with pytest.raises(ValueError, match="'weight' must be a C-contiguous, aligned, writeable"):
        opt.step()


def test_nnrt_registry_is_the_module_and_its_functions_act_on_the_registry() -> None:
    import nnrt.registry as registry_module

    assert isinstance(nnrt.registry, types.ModuleType) and nnrt.registry is registry_module
    # the spelling hookspecs.py gives plugin authors
    assert nnrt.registry.registry.name_of(nnrt.Dense) == "dense"
    assert nnrt.registry.name_of(nnrt.Dense) == "dense"
    assert nnrt.registry.get("dense").cls is nnrt.Dense
    assert "nnrt" in nnrt.registry.plugins()
    assert nnrt.registry.get_optimizer("sgd").cls is nnrt.optim.SGD


def test_installed_plugin_cannot_displace_a_builtin_loss_or_optimizer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata as ilm
    import sys

    from nnrt.registry import ENTRY_POINT_GROUP, PluginWarning, Registry

    modname = _uid("nnrt_test_displacing_plugin")
    mod = types.ModuleType(modname)
    fresh_loss, fresh_opt = _uid("fresh_loss"), _uid("fresh_opt")

    @nnrt.hookimpl
    def nnrt_register_losses(register: Any) -> None:
        register("mse", huber)  # a built-in name: refused
        register(fresh_loss, huber)

    @nnrt.hookimpl
    def nnrt_register_optimizers(register: Any) -> None:
        register("sgd", SignSGD)  # a built-in name: refused
        register(fresh_opt, SignSGD)

    mod.nnrt_register_losses = nnrt_register_losses  # type: ignore[attr-defined]
    mod.nnrt_register_optimizers = nnrt_register_optimizers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, modname, mod)
    ep = ilm.EntryPoint(name=modname, value=modname, group=ENTRY_POINT_GROUP)
    # listed first: the outcome must not depend on the order entry points are found in
    eps = [ep, *ilm.entry_points(group=ENTRY_POINT_GROUP)]
    monkeypatch.setattr(sys.modules["nnrt.registry"].ilm, "entry_points", lambda **kw: eps)
    monkeypatch.delenv("NNRT_DISABLE_PLUGINS", raising=False)
    reg = Registry()
    with pytest.warns(PluginWarning) as record:
        reg.ensure_loaded()
    msgs = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert any("'mse'" in m and modname in m and "'nnrt'" in m for m in msgs), msgs
    assert any("'sgd'" in m and modname in m and "'nnrt'" in m for m in msgs), msgs
    assert reg.get_loss("mse").fn is nnrt.losses.mse
    assert reg.get_optimizer("sgd").cls is nnrt.optim.SGD
    # the rest of the plugin still loads
    assert reg.get_loss(fresh_loss).fn is huber and reg.get_loss(fresh_loss).plugin == modname
    assert reg.get_optimizer(fresh_opt).cls is SignSGD
    assert "refused" in reg.plugins()[modname].status
