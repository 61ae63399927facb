"""The nnrt_check_network hook and the batchnorm plugin's bias-before-BatchNorm check."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest

import nnrt
from nnrt import hookspecs


def test_dense_with_bias_before_batchnorm_warns_at_the_callers_line() -> None:
    with pytest.warns(nnrt.BiasBeforeBatchNormWarning) as record:
        nnrt.Sequential([nnrt.layer("dense", 4, 3), nnrt.layer("batchnorm", 3)])
    assert len(record) == 1
    w = record[0]
    assert issubclass(w.category, nnrt.NetworkWarning)
    assert issubclass(w.category, UserWarning)
    msg = str(w.message)
    assert "dense_nobias" in msg and "mean" in msg and "beta" in msg
    assert "layer 0" in msg and "layer 1" in msg
    assert w.filename == __file__  # points at the user's code, not nnrt or pluggy


def test_every_dense_batchnorm_pair_is_reported() -> None:
    with pytest.warns(nnrt.BiasBeforeBatchNormWarning) as record:
        nnrt.Sequential(
            [
                nnrt.layer("dense", 4, 3),
                nnrt.layer("batchnorm", 3),
                nnrt.layer("sigmoid"),
                nnrt.layer("dense", 3, 3),
                nnrt.layer("batchnorm", 3),
            ]
        )
    assert len(record) == 2


@pytest.mark.parametrize(
    "layers",
    [
        lambda: [nnrt.layer("dense_nobias", 4, 3), nnrt.layer("batchnorm", 3)],
        lambda: [nnrt.layer("dense", 4, 3), nnrt.layer("sigmoid"), nnrt.layer("batchnorm", 3)],
        lambda: [nnrt.layer("batchnorm", 4), nnrt.layer("dense", 4, 3)],
    ],
    ids=["dense_nobias", "sigmoid-between", "bn-first"],
)
def test_no_warning_otherwise(layers: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nnrt.Sequential(layers())


def test_warning_class_documents_the_reasoning() -> None:
    doc = inspect.getdoc(nnrt.BiasBeforeBatchNormWarning) or ""
    assert "mean" in doc and "beta" in doc and "dense_nobias" in doc
    assert "Ioffe" in doc  # the BatchNorm paper


def test_hookspec_is_typed_and_documented() -> None:
    spec = hookspecs.nnrt_check_network
    assert spec.__doc__ and "warn" in spec.__doc__
    sig = inspect.signature(spec)
    assert list(sig.parameters) == ["net"]
    # a structural type (hookspecs does not import nnrt.network, which imports the registry)
    assert sig.parameters["net"].annotation in ("Network", hookspecs.Network)
    for member in ("layers", "dtype", "__len__", "__getitem__"):
        assert hasattr(nnrt.Sequential([nnrt.layer("dense", 2, 2)]), member)
    assert sig.return_annotation in ("None", None)


def test_a_runtime_plugin_sees_each_new_network() -> None:
    seen: list[Any] = []
    active = [True]

    class Inspector:
        @nnrt.hookimpl
        def nnrt_check_network(self, net: Any) -> None:
            if active[0]:
                seen.append(net)

    plugin = Inspector()
    nnrt.register_plugin(plugin, name="test_network_inspector")
    try:
        net = nnrt.Sequential([nnrt.layer("dense", 2, 2)])
        assert seen and seen[-1] is net
    finally:
        # the registry has no public unregister: make the hook inert for later tests
        active[0] = False


def test_the_warning_class_is_the_batchnorm_plugins() -> None:
    """The core defines no batchnorm warning: ``nnrt.BiasBeforeBatchNormWarning`` is the
    plugin's class, reached through the registry."""
    from nnrt_plugins import batchnorm

    assert nnrt.BiasBeforeBatchNormWarning is batchnorm.BiasBeforeBatchNormWarning
    assert issubclass(nnrt.BiasBeforeBatchNormWarning, nnrt.NetworkWarning)
    assert "BiasBeforeBatchNormWarning" in dir(nnrt)
    assert not hasattr(nnrt.warnings, "BiasBeforeBatchNormWarning")
    with pytest.raises(AttributeError, match="no attribute 'NoSuchWarning'"):
        nnrt.NoSuchWarning  # noqa: B018
