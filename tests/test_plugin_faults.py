"""Faulty plugins: each fault gives an error naming the plugin (and the layer), and the
other plugins keep working.

Faults: an entry-point plugin whose import raises; a hook that raises (layer
registration, network check); a layer whose forward or backward returns the
wrong shape, the wrong dtype, or something that is not an array.
"""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.registry import PluginError, PluginWarning, Registry

# ------------------------------------------------------------ entry points


def _fake_dist(root: Path, name: str, modules: dict[str, str]) -> None:
    """A minimal installed distribution: dist-info with nnrt entry points + modules."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    eps = "".join(f"{ep} = {mod}\n" for ep, mod in ((m, m) for m in modules))
    (info / "entry_points.txt").write_text("[nnrt]\n" + eps)
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _fake_dist(
        tmp_path,
        "nnrt-faulty",
        {
            "nnrt_fault_import": "raise ImportError('no module named lib_that_is_missing')\n",
            "nnrt_fault_hook": """
                import nnrt

                @nnrt.hookimpl
                def nnrt_register_layers(register):
                    raise RuntimeError("hook exploded")
            """,
            "nnrt_fault_notalayer": """
                import nnrt

                @nnrt.hookimpl
                def nnrt_register_layers(register):
                    register("fault_notalayer", dict)
            """,
            "nnrt_fault_good": """
                import numpy as np
                import nnrt

                class Double(nnrt.Layer):
                    def __init__(self):
                        super().__init__()
                    def forward(self, X, training=False):
                        return 2 * self.prepare_input(X)
                    def backward(self, dY):
                        return 2 * np.asarray(dY)

                @nnrt.hookimpl
                def nnrt_register_layers(register):
                    register("fault_double", Double)
            """,
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m.startswith("nnrt_fault_")]:
        del sys.modules[mod]


def test_entry_point_faults_are_reported_by_name_and_the_rest_loads(fake_plugins: Path) -> None:
    reg = Registry()  # a fresh registry: reads the entry points on sys.path now
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = reg.layers()
    messages = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    for plugin, why in [
        ("nnrt_fault_import", "lib_that_is_missing"),
        ("nnrt_fault_hook", "hook exploded"),
        ("nnrt_fault_notalayer", "not a subclass of nnrt.Layer"),
    ]:
        hits = [m for m in messages if plugin in m]
        assert hits, f"no warning names {plugin}: {messages}"
        assert why in hits[0] and "nnrt-faulty" in hits[0], hits[0]
        assert reg.plugins()[plugin].status.startswith("failed"), reg.plugins()[plugin]
    # the healthy plugins, built-in and third-party, still work
    for name in ("dense", "sigmoid", "batchnorm", "dense_nobias", "fault_double"):
        assert name in layers, sorted(layers)
    assert "fault_notalayer" not in layers
    X = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(layers["fault_double"].cls().forward(X), 2 * X)
    net = nnrt.Sequential([layers["dense"].cls(3, 2), layers["sigmoid"].cls()], dtype="float64")
    assert net.predict(X).shape == (2, 2)


# ------------------------------------------------------------ run-time hooks
class _RaisingRegister:
    __name__ = "raising_register_plugin"

    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        raise KeyError("boom in register")


def test_register_hook_raising_names_the_plugin_and_leaves_nothing_behind() -> None:
    before = nnrt.available_layers()
    with pytest.raises(PluginError, match="raising_register_plugin.*boom in register"):
        nnrt.register_plugin(_RaisingRegister())
    assert nnrt.available_layers() == before
    assert "raising_register_plugin" not in nnrt.registry.plugins()


class _RaisingCheck:
    __name__ = "raising_check_plugin"

    @nnrt.hookimpl
    def nnrt_check_network(self, net: Any) -> None:
        raise ZeroDivisionError("check exploded")


def test_network_check_hook_raising_names_the_plugin() -> None:
    plugin = _RaisingCheck()
    nnrt.register_plugin(plugin)
    try:
        with pytest.raises(PluginError, match="raising_check_plugin.*check exploded"):
            nnrt.Sequential([nnrt.layer("dense", 3, 2)])
    finally:
        nnrt.registry.registry.pm.unregister(plugin)
    net = nnrt.Sequential([nnrt.layer("dense", 3, 2)])  # fine again once it is gone
    assert net.predict(np.ones((1, 3))).shape == (1, 2)


# ------------------------------------------------------------ faulty layers
class Faulty(nnrt.Layer):
    """Keeps the width; ``mode`` picks what forward/backward return."""

    def __init__(self, mode: str = "ok", where: str = "forward") -> None:
        super().__init__()
        self.mode = mode
        self.where = where

    def config(self) -> dict[str, Any]:
        return {"mode": self.mode, "where": self.where}

    def _bad(self, good: np.ndarray) -> Any:
        return {
            "ok": good,
            "wrong_width": np.ones((good.shape[0], good.shape[1] + 1), good.dtype),
            "wrong_batch": np.ones((good.shape[0] + 2, good.shape[1]), good.dtype),
            "rank1": good.reshape(-1),
            "float16": good.astype(np.float16),
            "int": good.astype(np.int64),
            "complex": good.astype(np.complex128),
            "none": None,
            "list": good.tolist(),
            "scalar": 1.0,
            "string": "not an array",
        }[self.mode]

    def forward(self, X: Any, training: bool = False) -> Any:
        Xa = self.prepare_input(X)
        return self._bad(Xa.copy()) if self.where == "forward" else Xa.copy()

    def backward(self, dY: Any) -> Any:
        d = np.array(dY, dtype=self.dtype)
        return self._bad(d) if self.where == "backward" else d


class _FaultyPlugin:
    __name__ = "faulty_layer_plugin"

    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register("faulty", Faulty)


@pytest.fixture(scope="module", autouse=True)
def _faulty_registered() -> Any:
    plugin = _FaultyPlugin()
    nnrt.register_plugin(plugin)
    yield
    nnrt.registry.registry.pm.unregister(plugin)
    nnrt.registry.registry._layers.pop("faulty", None)
    nnrt.registry.registry._plugins.pop("faulty_layer_plugin", None)


MODES = [
    "wrong_width",
    "wrong_batch",
    "rank1",
    "float16",
    "int",
    "complex",
    "none",
    "list",
    "scalar",
    "string",
]


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("mode", MODES)
def test_layer_returning_garbage_is_named_with_its_plugin(
    mode: str, where: str, position: str
) -> None:
    bad = nnrt.layer("faulty", mode, where)
    stack: list[Any] = [nnrt.layer("dense", 4, 5), nnrt.layer("sigmoid"), nnrt.layer("dense", 5, 3)]
    index = {"first": 0, "middle": 2, "last": 3}[position]
    stack.insert(index, bad)
    net = nnrt.Sequential(stack, dtype="float32")
    X = np.random.default_rng(0).normal(size=(6, 4))
    with pytest.raises((PluginError, TypeError, ValueError)) as info:
        Y = net.forward(X, training=True)
        net.backward(np.ones_like(Y))
    msg = str(info.value)
    assert "faulty_layer_plugin" in msg, msg
    assert "Faulty(" in msg and f"layer {index}" in msg, msg
    assert where in msg, msg
    # the healthy layers of other plugins keep working, in a fresh network
    good = nnrt.Sequential(
        [nnrt.layer("dense", 4, 5), nnrt.layer("sigmoid"), nnrt.layer("dense", 5, 3)],
        dtype="float32",
    )
    assert np.isfinite(good.predict(X)).all()


@pytest.mark.parametrize("position", [0, 2, 3])
def test_a_well_behaved_python_layer_passes_the_checks(position: int) -> None:
    stack: list[Any] = [nnrt.layer("dense", 4, 5), nnrt.layer("sigmoid"), nnrt.layer("dense", 5, 3)]
    stack.insert(position, nnrt.layer("faulty", "ok"))
    net = nnrt.Sequential(stack, dtype="float64", seed=3)
    ref = nnrt.Sequential(
        [layer for layer in stack if not isinstance(layer, Faulty)], dtype="float64", seed=3
    )
    X = np.random.default_rng(1).normal(size=(6, 4))
    Y = net.forward(X, training=True).copy()
    np.testing.assert_array_equal(Y, ref.forward(X, training=True))
    dY = np.random.default_rng(2).normal(size=Y.shape)
    np.testing.assert_array_equal(net.backward(dY), ref.backward(dY))
    assert net.backward(dY, input_grad=False) is None
