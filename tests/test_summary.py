"""``net.summary()`` / ``nnrt.summary`` and ``nnrt info model.npz``.

Expected numbers are written out here from the layer shapes (parameter counts),
from the documented FLOP convention (a multiply-add is 2 FLOPs: dense
``2*in*out + out``, dense_nobias ``2*in*out``, batchnorm eval ``2*f``, sigmoid
``4*f``) and from running the layers (activation widths).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.registry import PluginError
from nnrt.summary import ModelSummary, escape, summary


def _net(dtype: str = "float32") -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 20, 32),
            nnrt.layer("batchnorm", 32),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 32, 3),
        ],
        seed=0,
        dtype=dtype,
    )


def test_rows_and_totals() -> None:
    net = _net()
    s = net.summary(batch_size=16)
    assert isinstance(s, ModelSummary)
    rows = s.layers
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert [r["name"] for r in rows] == ["dense_nobias", "batchnorm", "sigmoid", "dense"]
    assert [r["plugin"] for r in rows] == [nnrt.available_layers()[r["name"]] for r in rows]
    assert [r["in_features"] for r in rows] == [20, 32, 32, 32]
    assert [r["out_features"] for r in rows] == [32, 32, 32, 3]
    assert [r["params"] for r in rows] == [20 * 32, 32 + 32, 0, 32 * 3 + 3]
    assert [r["buffers"] for r in rows] == [0, 32 + 32, 0, 0]
    assert rows[1]["param_shapes"] == {"gamma": [32], "beta": [32]}
    assert rows[1]["buffer_shapes"] == {"running_mean": [32], "running_var": [32]}
    flops = [2 * 20 * 32, 2 * 32, 4 * 32, 2 * 32 * 3 + 3]
    assert [r["flops"] for r in rows] == flops
    assert not any(r["flops_estimated"] for r in rows)

    t = s.totals
    n_params = sum(a.size for a in net.params().values())
    n_buffers = sum(a.size for a in net.buffers().values())
    assert t["params"] == n_params == 640 + 64 + 99
    assert t["buffers"] == n_buffers == 64
    assert t["flops"] == sum(flops)
    assert t["flops_estimated"] is False
    # activations: the output of every layer for one batch, measured by running them
    X = np.random.default_rng(0).standard_normal((16, 20)).astype(np.float32)
    total = 0
    for layer in net.layers:
        X = np.array(layer.forward(X, True))
        total += X.size
    assert t["activations"] == total == 16 * (32 + 32 + 32 + 3)
    assert t["bytes"]["params"] == {"float32": 4 * n_params, "float64": 8 * n_params}
    assert t["bytes"]["buffers"] == {"float32": 4 * n_buffers, "float64": 8 * n_buffers}
    assert t["bytes"]["activations"] == {"float32": 4 * total, "float64": 8 * total}
    assert net.summary(batch_size=1).totals["activations"] == total // 16


def test_table_text() -> None:
    s = _net("float64").summary(batch_size=32)
    text = str(s)
    assert repr(s) == text
    lines = text.splitlines()
    assert lines[0].startswith("Sequential: 4 layers, float64, input width 20")
    header = next(line for line in lines if line.startswith("#"))
    for col in ("layer", "plugin", "out", "params", "buffers", "FLOPs/sample"):
        assert col in header
    row = next(line for line in lines if line.split()[:2] == ["0", "dense_nobias"])
    assert row.split()[-4:] == ["32", "640", "0", "1,280"]
    row = next(line for line in lines if line.split()[:2] == ["3", "dense"])
    assert row.split()[-4:] == ["3", "99", "0", "195"]
    # 803 params: 3,212 B float32 = 3.1 KiB; 6,424 B float64 = 6.3 KiB
    assert "parameters:  803 (3.1 KiB float32 / 6.3 KiB float64)" in text
    assert "buffers:     64 (256 B float32 / 512 B float64)" in text
    acts = 32 * 99
    assert f"activations: {acts:,} values at batch size 32" in text
    assert f"({4 * acts / 1024:.1f} KiB float32 / {8 * acts / 1024:.1f} KiB float64)" in text
    assert f"forward FLOPs per sample: {1280 + 64 + 128 + 195:,}" in text
    assert "~" not in text


def test_print_fn_and_dict() -> None:
    got: list[str] = []
    s = summary(_net(), 8, print_fn=got.append)
    assert got == str(s).splitlines() and len(got) > 8
    d = json.loads(json.dumps(s.to_dict()))
    assert d["batch_size"] == 8 and d["dtype"] == "float32" and d["in_features"] == 20
    assert [r["name"] for r in d["layers"]] == ["dense_nobias", "batchnorm", "sigmoid", "dense"]
    assert d["totals"]["params"] == 803


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True])
def test_bad_batch_size(bad: Any) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        _net().summary(batch_size=bad)


# ------------------------------------------------------------ plugin layers
class Square(nnrt.Layer):
    """A Python plugin layer that keeps the width: y = x**2."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features = self.out_features = None

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        X = self.prepare_input(X)
        if training:
            self._X = X
        return X * X

    def backward(self, dY: Any) -> np.ndarray:
        return 2 * self._X * dY


class Project(nnrt.Layer):
    """A Python plugin layer with a parameter and a buffer, width 4 -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 4, 2
        self.w = np.ones((4, 2))
        self.dw = np.zeros((4, 2))
        self.count = np.zeros(3)

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        self._X = self.prepare_input(X)
        return self._X @ self.w

    def backward(self, dY: Any) -> np.ndarray:
        self.dw[...] = self._X.T @ dY
        return np.ascontiguousarray(dY @ self.w.T)

    def params(self) -> dict[str, np.ndarray]:
        return {"w": self.w}

    def grads(self) -> dict[str, np.ndarray]:
        return {"w": self.dw}

    def buffers(self) -> dict[str, np.ndarray]:
        return {"count": self.count}


class SquarePlugin:
    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register("summary_square", Square)
        register("summary_project", Project)


class ProjectFlops:
    """A second plugin that knows Project's FLOPs (and passes on everything else)."""

    @nnrt.hookimpl
    def nnrt_layer_flops(self, layer: Any, in_features: int) -> int | None:
        if type(layer) is not Project:
            return None
        return 2 * in_features * 2


@pytest.fixture(scope="module")
def square_plugin() -> str:
    if "summary_square" not in nnrt.available_layers():
        nnrt.register_plugin(SquarePlugin(), name="summary_square_plugin\x1b[31m")
    return "summary_square_plugin\x1b[31m"


def test_plugin_layer_without_flops_is_estimated(square_plugin: str) -> None:
    net = nnrt.Sequential(
        [nnrt.layer("dense", 3, 4), nnrt.layer("summary_square"), nnrt.layer("summary_project")],
        dtype="float64",
    )
    s = net.summary(batch_size=2)
    sq, proj = s.layers[1], s.layers[2]
    assert sq["name"] == "summary_square" and sq["plugin"] == square_plugin
    assert (sq["in_features"], sq["out_features"]) == (4, 4)
    # no plugin knows Square: one FLOP per output element, marked as an estimate
    assert sq["flops"] == 4 and sq["flops_estimated"] is True
    assert (proj["params"], proj["buffers"]) == (8, 3)
    assert s.totals["flops_estimated"] is True
    text = str(s)
    assert "~4" in text and "~: estimated" in text
    # the plugin name came with an escape sequence: shown escaped, kept in the data
    assert "\x1b" not in text and "\\x1b[31m" in text
    assert s.totals["activations"] == 2 * (4 + 4 + 2)


def test_flops_hook_of_a_plugin_is_used(square_plugin: str) -> None:
    name = nnrt.register_plugin(ProjectFlops(), name="summary_project_flops")
    try:
        net = nnrt.Sequential([nnrt.layer("summary_project")], dtype="float64")
        row = net.summary().layers[0]
        assert row["flops"] == 2 * 4 * 2 and row["flops_estimated"] is False
    finally:
        nnrt.registry.pm.unregister(name=name)


class BadFlops:
    @nnrt.hookimpl
    def nnrt_layer_flops(self, layer: Any, in_features: int) -> Any:
        return -3 if type(layer) is Project else None


def test_bad_flops_hook_result_names_the_layer(square_plugin: str) -> None:
    name = nnrt.register_plugin(BadFlops(), name="summary_bad_flops")
    try:
        net = nnrt.Sequential([nnrt.layer("summary_project")], dtype="float64")
        with pytest.raises(PluginError, match=r"nnrt_layer_flops returned -3.*summary_project"):
            net.summary()
    finally:
        nnrt.registry.pm.unregister(name=name)


def test_unregistered_layer_and_unknown_width(square_plugin: str) -> None:
    class Local(Square):
        pass

    # the first layer keeps the width: the input width comes from the next one
    net = nnrt.Sequential([Local(), nnrt.layer("dense", 5, 2)], dtype="float64")
    s = net.summary()
    row = s.layers[0]
    assert row["name"] == "<test_unregistered_layer_and_unknown_width.<locals>.Local>"
    assert row["plugin"] is None
    assert (row["in_features"], row["out_features"], row["flops"]) == (5, 5, 5)
    assert s.totals["activations"] == 32 * (5 + 2)
    # no layer fixes a width: unknown until in_features is given
    net = nnrt.Sequential([Local(), nnrt.layer("sigmoid")], dtype="float64")
    s = net.summary()
    assert [r["out_features"] for r in s.layers] == [None, None]
    assert [r["flops"] for r in s.layers] == [None, None]
    assert "input width ?" in str(s) and "summary(in_features=...)" in str(s)
    s = net.summary(in_features=6)
    assert [r["flops"] for r in s.layers] == [6, 4 * 6]
    assert s.totals["activations"] == 32 * (6 + 6)
    with pytest.raises(ValueError, match="in_features"):
        nnrt.Sequential([nnrt.layer("dense", 5, 2)]).summary(in_features=6)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("dense", "dense"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("line\nbreak\r", "line\\x0abreak\\x0d"),
        ("rtl\u202eevil", "rtl\\u202eevil"),
        ("bell\x07\x7f", "bell\\x07\\x7f"),
        ("café ünï", "café ünï"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_escape_limit() -> None:
    assert escape("x" * 50, 10) == "x" * 9 + "…"
    assert escape("short", 10) == "short"


# ---------------------------------------------------------------- nnrt info
def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nnrt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(os.environ, MPLBACKEND="Agg"),
        timeout=120,
    )


def test_nnrt_info_shows_the_summary(tmp_path: Path) -> None:
    net = _net()
    path = tmp_path / "model.npz"
    net.save(path)
    proc = _run("info", str(path), "--batch-size", "10", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "summary:" in out and "FLOPs/sample" in out
    assert "parameters:  803 (3.1 KiB float32 / 6.3 KiB float64)" in out
    assert f"activations: {10 * 99:,} values at batch size 10" in out
    assert re.search(r"^\s*1\s+batchnorm\s+batchnorm\s+32\s+64\s+64\s+64$", out, re.M), out
    # a file whose layer type is not installed: the architecture, then a note
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arch = json.loads(str(arrays["architecture"]))
    arch["layers"][2]["name"] = "not_installed_layer"
    arch["layers"][2]["plugin"] = "gone"
    arrays["architecture"] = np.array(json.dumps(arch))
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    proc = _run("info", str(broken), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no summary:" in proc.stdout and "not_installed_layer" in proc.stdout
