"""ONNX export, checked by onnx.checker and run in onnxruntime.

References: a float64 numpy forward pass written here from the exported
network's own arrays (eval-mode formulas of DESIGN.md), and ``net(X)``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.registry import registry

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import nnrt.onnx as nnrt_onnx  # noqa: E402  (after the importorskip above)

TOL = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "float64": {"rtol": 1e-12, "atol": 1e-12}}


def _net(dtype: str, seed: int = 3) -> nnrt.Sequential:
    """[dense_nobias → batchnorm → sigmoid → dense] with non-trivial BN state."""
    net = nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 6, 16),
            nnrt.layer("batchnorm", 16, momentum=0.3, eps=1e-3),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 16, 4),
        ],
        seed=seed,
        dtype=dtype,
    )
    rng = np.random.default_rng(seed)
    p = net.params()
    p["1.gamma"][...] = rng.uniform(0.5, 2.0, size=16)
    p["1.beta"][...] = rng.normal(size=16)
    for _ in range(4):  # running statistics away from (0, 1)
        net.forward(rng.normal(2.0, 3.0, size=(32, 6)), training=True)
    return net


def _reference(net: nnrt.Sequential, X: np.ndarray) -> np.ndarray:
    s = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
    eps = net[1].config()["eps"]
    h = X.astype(np.float64) @ s["0.weight"]
    h = (h - s["1.running_mean"]) / np.sqrt(s["1.running_var"] + eps) * s["1.gamma"] + s["1.beta"]
    h = 1.0 / (1.0 + np.exp(-h))
    return h @ s["3.weight"] + s["3.bias"]  # type: ignore[no-any-return]


def _session(path: pathlib.Path) -> Any:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_export_matches_predict_and_reference(tmp_path: pathlib.Path, dtype: str) -> None:
    net = _net(dtype)
    path = tmp_path / "net.onnx"
    model = nnrt_onnx.export(net, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert [n.op_type for n in model.graph.node] == [
        "MatMul",
        "BatchNormalization",
        "Sigmoid",
        "Gemm",
    ]
    X = np.random.default_rng(0).normal(2.0, 3.0, size=(50, 6)).astype(dtype)
    (Y,) = _session(path).run(None, {"X": X})
    assert Y.dtype == np.dtype(dtype) and Y.shape == (50, 4)
    np.testing.assert_allclose(Y, net(X), **TOL[dtype])
    np.testing.assert_allclose(Y, _reference(net, X), **TOL[dtype])


def test_dynamic_and_fixed_batch_dim(tmp_path: pathlib.Path) -> None:
    net = _net("float32")
    path = tmp_path / "dyn.onnx"
    model = nnrt_onnx.export(net, path, batch_dim="batch")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 6
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "batch" and out_dims[1].dim_value == 4
    sess = _session(path)
    rng = np.random.default_rng(1)
    for n in (1, 7, 64):
        X = rng.normal(size=(n, 6)).astype(np.float32)
        np.testing.assert_allclose(sess.run(None, {"X": X})[0], net(X), **TOL["float32"])

    fixed = tmp_path / "fixed.onnx"
    model = nnrt_onnx.export(net, fixed, batch_dim=5)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 5
    X = rng.normal(size=(5, 6)).astype(np.float32)
    np.testing.assert_allclose(_session(fixed).run(None, {"X": X})[0], net(X), **TOL["float32"])


def test_names_and_file_written_exactly(tmp_path: pathlib.Path) -> None:
    net = _net("float64")
    path = tmp_path / "custom"
    nnrt_onnx.export(net, path, input_name="features", output_name="scores")
    assert path.exists() and not list(tmp_path.glob("*.tmp*"))
    sess = _session(path)
    assert [i.name for i in sess.get_inputs()] == ["features"]
    assert [o.name for o in sess.get_outputs()] == ["scores"]
    X = np.random.default_rng(2).normal(size=(3, 6))
    np.testing.assert_allclose(sess.run(None, {"features": X})[0], net(X), **TOL["float64"])


def test_export_is_eval_mode_not_last_training_batch(tmp_path: pathlib.Path) -> None:
    # after a training forward the BN layer caches batch statistics; the export
    # must use the running statistics (as net(X) does)
    net = _net("float64")
    X = np.random.default_rng(3).normal(size=(10, 6))
    train_out = net.forward(X, training=True).copy()
    path = tmp_path / "m.onnx"
    nnrt_onnx.export(net, path)
    Y = _session(path).run(None, {"X": X})[0]
    np.testing.assert_allclose(Y, _reference(net, X), **TOL["float64"])
    assert not np.allclose(Y, train_out)


# --------------------------------------------------------- plugin layers
class _Scale(nnrt.Layer):
    """y = factor * x (a third-party Python layer)."""

    def __init__(self, factor: float = 2.0) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        return np.ascontiguousarray(X, dtype=self.dtype) * self.factor

    def backward(self, dY: Any) -> np.ndarray:
        return np.ascontiguousarray(dY) * self.factor

    def config(self) -> dict[str, Any]:
        return {"factor": self.factor}


class _NoExport(_Scale):
    """The same layer from a plugin without an export hook."""


class _ScalePlugin:
    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register("onnx_test_scale", _Scale)

    @nnrt.hookimpl
    def nnrt_onnx_export(self, layer: Any, input: str, ctx: Any) -> str | None:
        if type(layer) is not _Scale:
            return None
        factor = ctx.add_initializer("factor", np.array(layer.factor))
        return ctx.add_node("Mul", [input, factor])[0]  # type: ignore[no-any-return]


class _NoExportPlugin:
    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register("onnx_test_noexport", _NoExport)


class _BadExportPlugin:
    @nnrt.hookimpl
    def nnrt_register_layers(self, register: Any) -> None:
        register("onnx_test_badexport", _BadExport)

    @nnrt.hookimpl
    def nnrt_onnx_export(self, layer: Any, input: str, ctx: Any) -> str | None:
        return "no_such_tensor" if type(layer) is _BadExport else None


class _BadExport(_Scale):
    pass


@pytest.fixture(scope="module", autouse=True)
def _plugins() -> None:
    for plugin, name in [
        (_ScalePlugin(), "onnx_test_scale_plugin"),
        (_NoExportPlugin(), "onnx_test_noexport_plugin"),
        (_BadExportPlugin(), "onnx_test_badexport_plugin"),
    ]:
        if name not in registry.plugins():
            nnrt.register_plugin(plugin, name=name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_third_party_layer_exports_through_the_hook(tmp_path: pathlib.Path, dtype: str) -> None:
    net = nnrt.Sequential(
        [nnrt.layer("dense", 3, 5), nnrt.layer("onnx_test_scale", -1.5), nnrt.layer("sigmoid")],
        seed=1,
        dtype=dtype,
    )
    path = tmp_path / "p.onnx"
    model = nnrt_onnx.export(net, path)
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Mul", "Sigmoid"]
    X = np.random.default_rng(4).normal(size=(9, 3)).astype(dtype)
    s = net.state_dict()
    ref = 1.0 / (1.0 + np.exp(1.5 * (X.astype(np.float64) @ s["0.weight"] + s["0.bias"])))
    Y = _session(path).run(None, {"X": X})[0]
    np.testing.assert_allclose(Y, ref, **TOL[dtype])
    np.testing.assert_allclose(Y, net(X), **TOL[dtype])


def test_layer_without_export_names_layer_and_plugin(tmp_path: pathlib.Path) -> None:
    net = nnrt.Sequential([nnrt.layer("dense", 3, 5), nnrt.layer("onnx_test_noexport", 2.0)])
    path = tmp_path / "x.onnx"
    with pytest.raises(NotImplementedError) as info:
        nnrt_onnx.export(net, path)
    msg = str(info.value)
    assert "layer 1" in msg and "'onnx_test_noexport'" in msg
    assert "'onnx_test_noexport_plugin'" in msg and "nnrt_onnx_export" in msg
    assert not path.exists()


def test_hook_returning_unknown_tensor_is_an_error(tmp_path: pathlib.Path) -> None:
    net = nnrt.Sequential([nnrt.layer("dense", 3, 5), nnrt.layer("onnx_test_badexport")])
    with pytest.raises(TypeError, match="onnx_test_badexport_plugin.*no_such_tensor"):
        nnrt_onnx.export(net, tmp_path / "x.onnx")


def test_width_keeping_only_network_needs_in_features(tmp_path: pathlib.Path) -> None:
    net = nnrt.Sequential([nnrt.layer("sigmoid")], dtype="float64")
    with pytest.raises(ValueError, match="in_features"):
        nnrt_onnx.export(net, tmp_path / "s.onnx")
    path = tmp_path / "s.onnx"
    nnrt_onnx.export(net, path, in_features=3)
    X = np.array([[-800.0, 0.0, 3.0]])
    Y = _session(path).run(None, {"X": X})[0]
    np.testing.assert_allclose(Y, [[0.0, 0.5, 1.0 / (1.0 + np.exp(-3.0))]], rtol=1e-12, atol=0)


def test_bad_arguments(tmp_path: pathlib.Path) -> None:
    net = _net("float32")
    with pytest.raises(ValueError, match="batch_dim"):
        nnrt_onnx.export(net, tmp_path / "a.onnx", batch_dim=0)
    with pytest.raises(TypeError, match="batch_dim"):
        nnrt_onnx.export(net, tmp_path / "a.onnx", batch_dim=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_name"):
        nnrt_onnx.export(net, tmp_path / "a.onnx", input_name="Z", output_name="Z")
