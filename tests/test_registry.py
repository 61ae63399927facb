"""The layer registry: entry-point loading, run-time plugins, validation, error reporting.

The global registry is process-global, so tests that register into it use
names unique to the test (``_uid``); tests of loading behaviour build a
fresh ``Registry()`` with a patched entry-point list or environment.
"""

from __future__ import annotations

import importlib.metadata as ilm
import itertools
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.hookspecs import RegisterLayer
from nnrt.registry import ENTRY_POINT_GROUP, PluginError, PluginWarning, Registry

BUILTIN_ENTRY_POINTS = {
    "dense_nobias": "nnrt_plugins.dense_nobias",
    "sigmoid": "nnrt_plugins.sigmoid",
    "batchnorm": "nnrt_plugins.batchnorm",
}

_counter = itertools.count()


def _uid(prefix: str) -> str:
    """A name no other test (or earlier run in this process) has used."""
    return f"{prefix}_{next(_counter)}_{id(object()) % 100000}"


# ----------------------------------------------------------- Python test layers
class PyScaleShift(nnrt.Layer):
    """y = x * weight + bias per feature, written in plain Python on top of nnrt.Layer."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.in_features = num_features
        self.out_features = num_features
        self.weight = np.linspace(0.5, 1.5, num_features)
        self.bias = np.linspace(-0.2, 0.3, num_features)
        self.dweight = np.zeros(num_features)
        self.dbias = np.zeros(num_features)
        self._X: np.ndarray | None = None

    def reset_parameters(self, rng: np.random.Generator) -> None:
        self.weight[...] = rng.uniform(0.5, 1.5, size=self.weight.shape)
        self.bias[...] = rng.uniform(-0.5, 0.5, size=self.bias.shape)

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        Xa = self.prepare_input(X)
        if training:
            self._X = Xa.copy()
        return Xa * self.weight + self.bias

    def backward(self, dY: Any) -> np.ndarray:
        assert self._X is not None
        dYa = np.asarray(dY, dtype=self._X.dtype)
        self.dweight[...] = (dYa * self._X).sum(axis=0)
        self.dbias[...] = dYa.sum(axis=0)
        return dYa * self.weight

    def params(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    def grads(self) -> dict[str, np.ndarray]:
        return {"weight": self.dweight, "bias": self.dbias}

    def config(self) -> dict[str, Any]:
        return {"num_features": self.in_features}


class PyTanh(nnrt.Layer):
    """Parameter-free Python layer that keeps the width."""

    def __init__(self) -> None:
        super().__init__()
        self._T: np.ndarray | None = None

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        T = np.tanh(self.prepare_input(X))
        if training:
            self._T = T
        return T

    def backward(self, dY: Any) -> np.ndarray:
        assert self._T is not None
        return np.asarray(dY) * (1 - self._T**2)


class NotALayer:
    def forward(self, X: Any, training: bool = False) -> Any:
        return X

    def backward(self, dY: Any) -> Any:
        return dY


class LayerWithoutMembers(nnrt.Layer):
    """A Layer subclass that implements neither forward nor backward."""


class LayerWithoutBackward(nnrt.Layer):
    def forward(self, X: Any, training: bool = False) -> Any:
        return X


def _module_plugin(modname: str, **layers: type) -> types.ModuleType:
    """A module-like plugin object whose hookimpl registers ``layers``."""
    mod = types.ModuleType(modname)

    @nnrt.hookimpl
    def nnrt_register_layers(register: RegisterLayer) -> None:
        for name, cls in layers.items():
            register(name, cls)

    mod.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    return mod


def _assert_nothing_registered(pname: str, layer_names: list[str]) -> None:
    reg = nnrt.registry
    assert reg.pm.get_plugin(pname) is None, f"plugin {pname!r} stayed in the plugin manager"
    assert pname not in reg.plugins()
    available = nnrt.available_layers()
    for lname in layer_names:
        assert lname not in available, f"layer {lname!r} of failed plugin stayed registered"


# ------------------------------------------------------------ built-in layers
def test_builtin_plugins_come_through_the_entry_point_group() -> None:
    eps = {ep.name: ep for ep in ilm.entry_points(group="nnrt")}
    assert ENTRY_POINT_GROUP == "nnrt"
    for name, module in BUILTIN_ENTRY_POINTS.items():
        assert name in eps, f"entry point {name!r} missing from group 'nnrt': {sorted(eps)}"
        assert eps[name].value == module
    available = nnrt.available_layers()
    plugins = nnrt.registry.plugins()
    for name in BUILTIN_ENTRY_POINTS:
        # each built-in layer is provided by the entry point of the same name
        assert available[name] == name
        info = plugins[name]
        assert info.status == "ok", info
        assert info.source == f"entry point {BUILTIN_ENTRY_POINTS[name]}"
        assert info.dist == "nnrt"
        assert name in info.layers


def test_dense_comes_from_the_core_plugin() -> None:
    assert nnrt.available_layers()["dense"] == "nnrt"
    assert nnrt.registry.plugins()["nnrt"].layers == ["dense"]
    assert "dense" not in {ep.name for ep in ilm.entry_points(group="nnrt")}
    assert isinstance(nnrt.layer("dense", 3, 2), nnrt.Dense)


def test_builtin_layers_build_from_their_names() -> None:
    from nnrt_plugins._batchnorm import BatchNorm
    from nnrt_plugins._dense_nobias import DenseNoBias
    from nnrt_plugins._sigmoid import Sigmoid

    assert type(nnrt.layer("dense_nobias", 4, 3)) is DenseNoBias
    assert type(nnrt.layer("sigmoid")) is Sigmoid
    bn = nnrt.layer("batchnorm", 5, momentum=0.2)
    assert type(bn) is BatchNorm and bn.config()["momentum"] == 0.2
    assert nnrt.registry.name_of(BatchNorm) == "batchnorm"
    assert nnrt.registry.name_of(PyTanh) is None


def test_unknown_layer_name_lists_registered_names() -> None:
    with pytest.raises(KeyError) as info:
        nnrt.layer("nope")
    msg = str(info.value)
    assert "'nope'" in msg
    for name in ("dense", "dense_nobias", "sigmoid", "batchnorm"):
        assert name in msg


def test_available_layers_maps_name_to_plugin() -> None:
    available = nnrt.available_layers()
    assert isinstance(available, dict)
    entries = nnrt.registry.layers()
    assert set(available) == set(entries)
    for name, plugin in available.items():
        assert plugin == entries[name].plugin
        assert plugin in nnrt.registry.plugins()


def test_hookspecs_are_documented_and_typed() -> None:
    from nnrt import hookspecs

    specs = [n for n in dir(hookspecs) if n.startswith("nnrt_")]
    assert "nnrt_register_layers" in specs
    for name in specs:
        fn = getattr(hookspecs, name)
        assert fn.__doc__ and len(fn.__doc__.strip()) > 40, name
        assert "return" in fn.__annotations__, name
        assert set(fn.__code__.co_varnames[: fn.__code__.co_argcount]) <= set(fn.__annotations__)


# ------------------------------------------------------- run-time registration
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_module_plugin_layer_works_in_sequential(dtype: str) -> None:
    lname = _uid("pyscaleshift")
    modname = _uid("my_plugin_module")
    plugin = _module_plugin(modname, **{lname: PyScaleShift})
    assert nnrt.register_plugin(plugin) == modname
    assert nnrt.available_layers()[lname] == modname
    assert nnrt.registry.plugins()[modname].source == "registered at run time"

    net = nnrt.Sequential(
        [nnrt.layer("dense", 4, 6), nnrt.layer(lname, 6), nnrt.layer("dense", 6, 2)],
        seed=5,
        dtype=dtype,
    )
    assert isinstance(net[1], PyScaleShift)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 4))
    dY = rng.standard_normal((7, 2))
    p = {k: v.astype(np.float64) for k, v in net.params().items()}
    assert net.params()["1.weight"].dtype == np.dtype(dtype)
    Y = net.forward(X, training=True).copy()
    dX = net.backward(dY.astype(dtype))

    # float64 numpy reference on the same (rounded) inputs and parameters
    X64 = X.astype(dtype).astype(np.float64)
    dY64 = dY.astype(dtype).astype(np.float64)
    H = X64 @ p["0.weight"] + p["0.bias"]
    G = H * p["1.weight"] + p["1.bias"]
    Y_ref = G @ p["2.weight"] + p["2.bias"]
    dG = dY64 @ p["2.weight"].T
    dH = dG * p["1.weight"]
    ref = {
        "0.weight": X64.T @ dH,
        "0.bias": dH.sum(axis=0),
        "1.weight": (dG * H).sum(axis=0),
        "1.bias": dG.sum(axis=0),
        "2.weight": G.T @ dY64,
        "2.bias": dY64.sum(axis=0),
    }
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-12}
    assert Y.dtype == np.dtype(dtype)
    np.testing.assert_allclose(Y, Y_ref, **tol)
    np.testing.assert_allclose(dX, dH @ p["0.weight"].T, **tol)
    grads = net.grads()
    assert set(grads) == set(ref)
    for key, g in grads.items():
        np.testing.assert_allclose(g, ref[key], **tol, err_msg=key)


def test_object_plugin_gets_pluggys_default_name() -> None:
    """DESIGN.md: an object without ``__name__`` is named as pluggy names it (its id),
    so two instances of one plugin class can both be registered."""
    lname, other = _uid("pytanh"), _uid("pytanh_other")

    class TanhPluginForTest:
        def __init__(self, layer_name: str) -> None:
            self.layer_name = layer_name

        @nnrt.hookimpl
        def nnrt_register_layers(self, register: RegisterLayer) -> None:
            register(self.layer_name, PyTanh)

    first, second = TanhPluginForTest(lname), TanhPluginForTest(other)
    name = nnrt.register_plugin(first)
    assert name == str(id(first))  # pluggy's get_canonical_name for objects
    name2 = nnrt.register_plugin(second)
    assert name2 == str(id(second)) and name2 != name
    assert nnrt.available_layers()[lname] == name
    assert nnrt.available_layers()[other] == name2

    net = nnrt.Sequential([nnrt.layer("dense", 3, 4), nnrt.layer(lname)], seed=1, dtype="float64")
    X = np.random.default_rng(2).standard_normal((5, 3))
    W, b = net.params()["0.weight"], net.params()["0.bias"]
    T = np.tanh(X @ W + b)
    np.testing.assert_allclose(net.forward(X, training=True), T, rtol=1e-12, atol=1e-12)
    dY = np.random.default_rng(3).standard_normal((5, 4))
    dX = net.backward(dY)
    np.testing.assert_allclose(dX, (dY * (1 - T**2)) @ W.T, rtol=1e-12, atol=1e-12)


def test_explicit_plugin_name_and_idempotent_registration() -> None:
    lname = _uid("pytanh_named")
    pname = _uid("explicitly.named-plugin")
    plugin = _module_plugin(_uid("unused_module_name"), **{lname: PyTanh})
    assert nnrt.register_plugin(plugin, name=pname) == pname
    assert nnrt.available_layers()[lname] == pname
    # registering the same object again is a no-op that returns its name
    assert nnrt.register_plugin(plugin) == pname
    assert nnrt.available_layers()[lname] == pname


def test_plugin_may_register_several_layers() -> None:
    a, b = _uid("multi_a"), _uid("multi_b")
    pname = _uid("multi_plugin")
    nnrt.register_plugin(_module_plugin(pname, **{a: PyTanh, b: PyScaleShift}))
    assert nnrt.available_layers()[a] == pname
    assert nnrt.available_layers()[b] == pname
    assert sorted(nnrt.registry.plugins()[pname].layers) == sorted([a, b])


# --------------------------------------------------------------- validation
def test_layer_name_clash_names_both_plugins() -> None:
    pname = _uid("clashing_plugin")
    extra = _uid("extra_layer")
    plugin = _module_plugin(pname, **{extra: PyTanh, "dense": PyTanh})
    with pytest.raises(ValueError) as info:
        nnrt.register_plugin(plugin)
    msg = str(info.value)
    assert pname in msg and "'nnrt'" in msg and "'dense'" in msg
    # all or nothing: the layer staged before the clash is not registered either
    _assert_nothing_registered(pname, [extra])
    assert nnrt.available_layers()["dense"] == "nnrt"


def test_layer_name_clash_between_two_runtime_plugins() -> None:
    lname = _uid("shared_name")
    first, second = _uid("first_plugin"), _uid("second_plugin")
    nnrt.register_plugin(_module_plugin(first, **{lname: PyTanh}))
    with pytest.raises(ValueError) as info:
        nnrt.register_plugin(_module_plugin(second, **{lname: PyScaleShift}))
    msg = str(info.value)
    assert first in msg and second in msg and lname in msg
    _assert_nothing_registered(second, [])
    assert nnrt.available_layers()[lname] == first


def test_plugin_name_clash_raises_value_error() -> None:
    pname = _uid("same_plugin_name")
    nnrt.register_plugin(_module_plugin(pname, **{_uid("l1"): PyTanh}))
    other_layer = _uid("l2")
    with pytest.raises(ValueError, match=pname):
        nnrt.register_plugin(_module_plugin(pname, **{other_layer: PyTanh}))
    assert other_layer not in nnrt.available_layers()


def test_non_layer_class_raises_type_error_naming_plugin() -> None:
    pname = _uid("non_layer_plugin")
    lname = _uid("not_a_layer")
    with pytest.raises(TypeError) as info:
        nnrt.register_plugin(_module_plugin(pname, **{lname: NotALayer}))
    msg = str(info.value)
    assert pname in msg and "NotALayer" in msg and "nnrt.Layer" in msg
    _assert_nothing_registered(pname, [lname])


def test_non_class_raises_type_error_naming_plugin() -> None:
    pname = _uid("instance_plugin")
    lname = _uid("an_instance")
    plugin = types.ModuleType(pname)

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> None:
        register(lname, PyTanh())  # an instance, not the class

    plugin.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=pname):
        nnrt.register_plugin(plugin)
    _assert_nothing_registered(pname, [lname])


@pytest.mark.parametrize(
    ("cls", "missing"),
    [(LayerWithoutMembers, "forward"), (LayerWithoutBackward, "backward")],
)
def test_layer_without_forward_backward_raises_type_error(cls: type, missing: str) -> None:
    pname = _uid("incomplete_plugin")
    lname = _uid("incomplete")
    with pytest.raises(TypeError) as info:
        nnrt.register_plugin(_module_plugin(pname, **{lname: cls}))
    msg = str(info.value)
    assert pname in msg and cls.__name__ in msg and missing in msg
    _assert_nothing_registered(pname, [lname])


@pytest.mark.parametrize("bad", ["", "has space", "9starts_with_digit", 42])
def test_invalid_layer_name_raises_value_error(bad: Any) -> None:
    pname = _uid("bad_name_plugin")
    plugin = types.ModuleType(pname)

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> None:
        register(bad, PyTanh)

    plugin.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    with pytest.raises(ValueError) as info:
        nnrt.register_plugin(plugin)
    assert pname in str(info.value) and repr(bad) in str(info.value)
    _assert_nothing_registered(pname, [])


def test_hookimpl_with_unknown_argument_raises_plugin_error() -> None:
    pname = _uid("bad_signature_plugin")
    plugin = types.ModuleType(pname)

    @nnrt.hookimpl
    def nnrt_register_layers(registr: Any) -> None:  # typo in the argument name
        registr("x", PyTanh)

    plugin.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    with pytest.raises(PluginError) as info:
        nnrt.register_plugin(plugin)
    msg = str(info.value)
    assert pname in msg and "registr" in msg
    _assert_nothing_registered(pname, [])


def test_hookimpl_returning_garbage_raises_plugin_error() -> None:
    pname = _uid("returns_list_plugin")
    lname = _uid("listed")
    plugin = types.ModuleType(pname)

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> Any:
        return [(lname, PyTanh)]  # the llm-style "return a list" mistake

    plugin.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    with pytest.raises(PluginError) as info:
        nnrt.register_plugin(plugin)
    msg = str(info.value)
    assert pname in msg and "register(name, cls)" in msg and "list" in msg
    _assert_nothing_registered(pname, [lname])


def test_hook_that_raises_is_reported_and_nothing_stays() -> None:
    pname = _uid("raising_plugin")
    staged = _uid("staged_before_raise")
    plugin = types.ModuleType(pname)

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> None:
        register(staged, PyTanh)
        raise RuntimeError("database of layer names unavailable")

    plugin.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    with pytest.raises(PluginError) as info:
        nnrt.register_plugin(plugin)
    msg = str(info.value)
    assert pname in msg and "RuntimeError" in msg and "database of layer names" in msg
    assert isinstance(info.value.__cause__, RuntimeError)
    _assert_nothing_registered(pname, [staged])

    # the name is free again: a fixed plugin under the same name registers fine
    nnrt.register_plugin(_module_plugin(pname, **{staged: PyTanh}))
    assert nnrt.available_layers()[staged] == pname


def test_typo_in_hook_name_raises_plugin_error() -> None:
    pname = _uid("typo_plugin")
    plugin = types.ModuleType(pname)

    @nnrt.hookimpl
    def nnrt_register_layer(register: Any) -> None:  # missing "s"
        register("never", PyTanh)

    plugin.nnrt_register_layer = nnrt_register_layer  # type: ignore[attr-defined]
    with pytest.raises(PluginError) as info:
        nnrt.register_plugin(plugin)
    msg = str(info.value)
    assert pname in msg and "nnrt_register_layer" in msg and "nnrt_register_layers" in msg
    _assert_nothing_registered(pname, ["never"])


def test_plugin_errors_are_exported() -> None:
    assert nnrt.PluginError is PluginError
    assert nnrt.PluginWarning is PluginWarning
    assert issubclass(PluginWarning, Warning)


# ------------------------------------------------------------- loading (fresh)
def _fake_entry_points(
    monkeypatch: pytest.MonkeyPatch, extra: list[ilm.EntryPoint]
) -> list[ilm.EntryPoint]:
    """Make the registry see the real ``nnrt`` entry points plus ``extra``."""
    real = list(ilm.entry_points(group=ENTRY_POINT_GROUP))
    eps = extra + real

    def entry_points(**kwargs: Any) -> list[ilm.EntryPoint]:
        assert kwargs.get("group") == ENTRY_POINT_GROUP, kwargs
        return list(eps)

    monkeypatch.setattr(sys.modules["nnrt.registry"].ilm, "entry_points", entry_points)
    return eps


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv("NNRT_DISABLE_PLUGINS", raising=False)
    yield monkeypatch


def test_entry_point_that_fails_to_import_warns_and_others_work(
    clean_env: pytest.MonkeyPatch,
) -> None:
    broken = ilm.EntryPoint(
        name="broken_plugin_xyz",
        value="nnrt_no_such_module_xyz.plugin",
        group=ENTRY_POINT_GROUP,
    )
    _fake_entry_points(clean_env, [broken])
    reg = Registry()
    with pytest.warns(PluginWarning) as record:
        reg.ensure_loaded()
    msgs = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert len(msgs) == 1, msgs
    assert "broken_plugin_xyz" in msgs[0] and "nnrt_no_such_module_xyz" in msgs[0]
    info = reg.plugins()["broken_plugin_xyz"]
    assert info.status.startswith("failed") and "ModuleNotFoundError" in info.status
    assert info.layers == []
    # everything else still loaded and usable
    layers = reg.layers()
    for name in ("dense", *BUILTIN_ENTRY_POINTS):
        assert name in layers
    assert reg.make("sigmoid").forward(np.zeros((1, 2))).shape == (1, 2)


@pytest.mark.parametrize("ep_first", [True, False], ids=["listed-first", "listed-last"])
def test_entry_point_clashing_with_a_builtin_is_refused_whatever_the_order(
    clean_env: pytest.MonkeyPatch, ep_first: bool
) -> None:
    modname = _uid("nnrt_fake_ep_module")
    own = _uid("own_layer")
    mod = types.ModuleType(modname)

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> None:
        register("sigmoid", PyTanh)  # clashes with the built-in sigmoid
        register(own, PyTanh)

    mod.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    clean_env.setitem(sys.modules, modname, mod)
    ep = ilm.EntryPoint(name="clashing_ep", value=modname, group=ENTRY_POINT_GROUP)
    real = list(ilm.entry_points(group=ENTRY_POINT_GROUP))
    eps = [ep, *real] if ep_first else [*real, ep]
    clean_env.setattr(sys.modules["nnrt.registry"].ilm, "entry_points", lambda **kw: eps)
    reg = Registry()
    with pytest.warns(PluginWarning) as record:
        reg.ensure_loaded()
    msgs = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert len(msgs) == 1, msgs
    assert "'clashing_ep'" in msgs[0] and "'sigmoid'" in msgs[0] and own in msgs[0]
    # the built-in keeps its name; the rest of the plugin still loads
    assert reg.layers()["sigmoid"].plugin == "sigmoid"
    assert reg.layers()["sigmoid"].cls is not PyTanh
    assert reg.layers()[own].plugin == "clashing_ep"
    status = reg.plugins()["clashing_ep"].status
    assert "refused" in status and "'sigmoid'" in status
    assert reg.plugins()["clashing_ep"].layers == [own]


def test_entry_point_whose_every_layer_clashes_leaves_nothing(
    clean_env: pytest.MonkeyPatch,
) -> None:
    modname = _uid("nnrt_fake_ep_module")
    mod = types.ModuleType(modname)

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> None:
        register("batchnorm", PyTanh)

    mod.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    clean_env.setitem(sys.modules, modname, mod)
    ep = ilm.EntryPoint(name="all_clash_ep", value=modname, group=ENTRY_POINT_GROUP)
    real = list(ilm.entry_points(group=ENTRY_POINT_GROUP))
    clean_env.setattr(sys.modules["nnrt.registry"].ilm, "entry_points", lambda **kw: [ep, *real])
    reg = Registry()
    with pytest.warns(PluginWarning, match="all_clash_ep"):
        reg.ensure_loaded()
    assert reg.plugins()["all_clash_ep"].status.startswith("refused")
    assert reg.pm.get_plugin("all_clash_ep") is None
    assert not any(impl.plugin is mod for impl in reg.pm.hook.nnrt_register_layers.get_hookimpls())
    assert reg.layers()["batchnorm"].plugin == "batchnorm"


def _ep_module(clean_env: pytest.MonkeyPatch, layer_name: str, cls: type) -> str:
    modname = _uid("nnrt_fake_ep_module")
    mod = types.ModuleType(modname)

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> None:
        register(layer_name, cls)

    mod.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    clean_env.setitem(sys.modules, modname, mod)
    return modname


class _FakeDist:
    def __init__(self, name: str) -> None:
        self.metadata = {"Name": name}
        self.version = "1.0"


def _ep_from(dist: str, name: str, value: str) -> Any:
    ep = ilm.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)
    try:
        return ep._for(_FakeDist(dist))  # type: ignore[attr-defined,arg-type]
    except AttributeError:  # pragma: no cover - other importlib.metadata versions
        object.__setattr__(ep, "dist", _FakeDist(dist))
        return ep


def test_third_party_clash_does_not_depend_on_listing_order(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """Two distributions register one name: the one sorted first (by distribution
    name, then entry-point name) keeps it, whichever order the file system lists them."""
    shared = _uid("shared_layer")
    mod_a = _ep_module(clean_env, shared, PyTanh)
    mod_z = _ep_module(clean_env, shared, PyScaleShift)
    ep_a = _ep_from("Alpha-Layers", "alpha", mod_a)
    ep_z = _ep_from("zulu_layers", "zulu", mod_z)
    real = list(ilm.entry_points(group=ENTRY_POINT_GROUP))
    for order in ([ep_a, ep_z], [ep_z, ep_a]):
        eps = [*order, *real]
        clean_env.setattr(
            sys.modules["nnrt.registry"].ilm, "entry_points", lambda eps=eps, **kw: eps
        )
        reg = Registry()
        with pytest.warns(PluginWarning) as record:
            reg.ensure_loaded()
        msgs = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
        assert len(msgs) == 1 and "'zulu'" in msgs[0] and "'alpha'" in msgs[0], msgs
        assert reg.layers()[shared].plugin == "alpha"
        assert reg.layers()[shared].cls is PyTanh
        assert "refused" in reg.plugins()["zulu"].status
        names = list(reg.plugins())
        assert names[0] == "nnrt" and set(names[1:5]) == {
            "dense_nobias", "sigmoid", "batchnorm", "sync_batchnorm"
        }  # fmt: skip
        assert [n for n in names if n in ("alpha", "zulu")] == ["alpha", "zulu"]


def test_entry_point_with_a_taken_plugin_name_is_refused(
    clean_env: pytest.MonkeyPatch,
) -> None:
    lname = _uid("impostor_layer")
    modname = _ep_module(clean_env, lname, PyTanh)
    ep = _ep_from("impostor", "batchnorm", modname)
    real = list(ilm.entry_points(group=ENTRY_POINT_GROUP))
    clean_env.setattr(sys.modules["nnrt.registry"].ilm, "entry_points", lambda **kw: [ep, *real])
    reg = Registry()
    with pytest.warns(PluginWarning, match="impostor") as record:
        reg.ensure_loaded()
    assert len([w for w in record if issubclass(w.category, PluginWarning)]) == 1
    assert reg.plugins()["batchnorm"].source.startswith("entry point nnrt_plugins.")
    assert reg.layers()["batchnorm"].plugin == "batchnorm"
    assert lname not in reg.layers()
    refused = reg.refused_plugins()
    assert [(p.name, p.dist) for p in refused] == [("batchnorm", "impostor")]
    assert refused[0].status.startswith("refused")


def test_disable_plugins_env_blocks_a_plugin(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NNRT_DISABLE_PLUGINS", "sigmoid, batchnorm")
    reg = Registry()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        layers = reg.layers()
    assert "sigmoid" not in layers and "batchnorm" not in layers
    assert "dense" in layers and "dense_nobias" in layers
    plugins = reg.plugins()
    assert plugins["sigmoid"].status.startswith("disabled")
    assert plugins["batchnorm"].status.startswith("disabled")
    with pytest.raises(KeyError, match="sigmoid"):
        reg.get("sigmoid")


def test_fresh_registry_matches_global_one(clean_env: pytest.MonkeyPatch) -> None:
    reg = Registry()
    fresh = {name: e.plugin for name, e in reg.layers().items()}
    for name in ("dense", *BUILTIN_ENTRY_POINTS):
        assert fresh[name] == nnrt.available_layers()[name]


def test_fresh_registry_runtime_plugin_does_not_leak(clean_env: pytest.MonkeyPatch) -> None:
    reg = Registry()
    lname = _uid("local_only")
    reg.register_plugin(_module_plugin("local_plugin", **{lname: PyTanh}))
    assert reg.layers()[lname].plugin == "local_plugin"
    assert lname not in nnrt.available_layers()


# --------------------------------------------------------------------- ABI
def test_check_abi_accepts_current_version() -> None:
    assert nnrt.check_abi(nnrt.ABI_VERSION, "fake") is True
    from nnrt.layer import ABI_VERSION

    assert ABI_VERSION == nnrt.ABI_VERSION and isinstance(ABI_VERSION, int)


def test_check_abi_rejects_other_version() -> None:
    from nnrt.layer import ABI_VERSION

    with pytest.raises(ImportError) as info:
        nnrt.check_abi(ABI_VERSION + 1, "fake")
    msg = str(info.value)
    assert "'fake'" in msg and str(ABI_VERSION + 1) in msg and str(ABI_VERSION) in msg


def _traces_of(plugin: object) -> list[str]:
    """Every hook caller of the global plugin manager that still holds ``plugin``."""
    out = []
    for name, caller in vars(nnrt.registry.pm.hook).items():
        if any(impl.plugin is plugin for impl in getattr(caller, "get_hookimpls", list)()):
            out.append(name)
    return out


def test_plugin_rejected_by_pluggy_leaves_nothing_behind() -> None:
    """A valid hook listed before an invalid one: pluggy < 1.7 adds the first and then
    rejects the second; nothing of the plugin may stay (any pluggy version)."""
    pname = _uid("half_valid_plugin")
    plugin = types.ModuleType(pname)
    seen: list[object] = []

    @nnrt.hookimpl
    def nnrt_check_network(net: Any) -> None:  # valid, and sorts first
        seen.append(net)

    @nnrt.hookimpl
    def nnrt_register_layers(registr: Any) -> None:  # invalid argument name
        registr("x", PyTanh)

    plugin.nnrt_check_network = nnrt_check_network  # type: ignore[attr-defined]
    plugin.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=pname):
        nnrt.register_plugin(plugin)
    _assert_nothing_registered(pname, [])
    assert _traces_of(plugin) == []
    assert not nnrt.registry.pm.is_registered(plugin)
    nnrt.Sequential([nnrt.layer("dense", 2, 2)])
    assert seen == []  # its network check is not called
    # the same name is free for a correct plugin
    fixed = _module_plugin(pname, **{_uid("fixed_layer"): PyTanh})
    assert nnrt.register_plugin(fixed) == pname


def test_register_plugin_rejects_a_bad_name() -> None:
    plugin = _module_plugin(_uid("bad_name_plugin"), **{_uid("l"): PyTanh})
    for bad in ("", 3):
        with pytest.raises(TypeError, match="name"):
            nnrt.register_plugin(plugin, name=bad)  # type: ignore[arg-type]
    assert _traces_of(plugin) == []


def test_a_failed_or_disabled_entry_point_name_can_be_registered_at_run_time(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("NNRT_DISABLE_PLUGINS", "sigmoid")
    reg = Registry()
    assert reg.plugins()["sigmoid"].status.startswith("disabled")
    lname = _uid("replacement")
    assert reg.register_plugin(_module_plugin("whatever", **{lname: PyTanh}), name="sigmoid")
    assert reg.layers()[lname].plugin == "sigmoid"
    assert reg.plugins()["sigmoid"].source == "registered at run time"
    # an active plugin's name stays taken
    with pytest.raises(ValueError, match="'batchnorm' is already registered"):
        reg.register_plugin(_module_plugin("other", **{_uid("x"): PyTanh}), name="batchnorm")
