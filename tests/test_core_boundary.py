"""The core (nnrt/) never imports a plugin module: the built-in plugins reach it
through hooks only, so they could be removed and installed from elsewhere."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "nnrt"


def _plugin_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [f"{path.name}:{node.lineno} {n}" for n in names if n.startswith("nnrt_plugins")]
    return found


def test_no_core_module_imports_a_plugin() -> None:
    offenders = [hit for path in sorted(CORE.glob("*.py")) for hit in _plugin_imports(path)]
    assert not offenders, f"the core imports plugin modules: {offenders}"


@pytest.mark.filterwarnings("ignore")
def test_the_core_works_with_the_built_in_plugins_disabled() -> None:
    """Train, fold, export and convert a dense-only network with no built-in plugin
    loaded; no module of nnrt_plugins gets imported on the way."""
    code = """
import sys, numpy as np, nnrt, nnrt.fold, nnrt.interop, nnrt.distributed, nnrt.onnx
net = nnrt.Sequential([nnrt.layer("dense", 3, 4), nnrt.layer("dense", 4, 2)], seed=0)
X = np.random.default_rng(0).normal(size=(16, 3))
net.fit(X, (X[:, 0] > 0).astype(np.int64), epochs=1, batch_size=4, progress=False)
assert len(net.fold()) == 2
builtin = {"dense_nobias", "sigmoid", "batchnorm", "sync_batchnorm"}
assert "dense" in nnrt.available_layers() and not builtin & set(nnrt.available_layers())
nnrt.NetworkWarning
try:
    nnrt.BiasBeforeBatchNormWarning
except AttributeError as exc:
    assert "nor does a loaded plugin register a warning" in str(exc), exc
else:
    raise AssertionError("the warning class needs its plugin")
loaded = sorted(m for m in sys.modules if m.startswith("nnrt_plugins"))
assert not loaded, loaded
"""
    env = dict(os.environ, NNRT_DISABLE_PLUGINS="dense_nobias,sigmoid,batchnorm,sync_batchnorm")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]


_SOURCES = ("*.py", "*.pyx", "*.pxd", "*.pyi", "*.h")


def _core_sources() -> list[Path]:
    return sorted({p for pattern in _SOURCES for p in CORE.glob(pattern)})


def test_the_core_names_no_layer_type_but_dense() -> None:
    """``grep -il batchnorm nnrt/*`` finds at most two files (the issue's bound: e.g. a
    hookspec docstring); the kernels, folding, fusion, export, the default block and
    the warning live in plugins/."""
    naming = [p.name for p in _core_sources() if "batchnorm" in p.read_text("utf-8").lower()]
    assert len(naming) <= 2, naming


def test_no_compiled_core_module_cimports_a_plugin() -> None:
    pattern = re.compile(r"^\s*(?:from\s+nnrt_plugins|c?import\s+nnrt_plugins)", re.M)
    offenders = [
        p.name
        for p in _core_sources()
        if p.suffix in (".pyx", ".pxd", ".h") and pattern.search(p.read_text("utf-8"))
    ]
    assert not offenders, offenders


def _run(code: str, disabled: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("NNRT_DISABLE_PLUGINS", None)
    if disabled:
        env["NNRT_DISABLE_PLUGINS"] = disabled
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )


_BUILTIN = "dense_nobias,sigmoid,batchnorm,sync_batchnorm"


def test_importing_nnrt_loads_no_plugin() -> None:
    out = _run(
        "import sys, nnrt, nnrt.fold, nnrt.cli, nnrt.onnx, nnrt.interop\n"
        "from nnrt import losses, optim\n"
        "hasattr(nnrt, 'something_else')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('nnrt_plugins'))\n"
        "assert not loaded, loaded\n"
    )
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.filterwarnings("ignore")
def test_without_the_built_in_plugins_the_defaults_fall_back_to_dense() -> None:
    """The default hidden block (CLI demo, scikit-learn) comes from a plugin; without
    one it is a plain ``dense``, and no network gets a fusion plan."""
    code = """
import sys, numpy as np, nnrt
from nnrt._hooks import default_block, default_block_spec
from nnrt.cli import demo_layers
assert default_block() == ("dense",), default_block()
assert demo_layers() == "dense:64,dense:10", demo_layers()
net = nnrt.Sequential([nnrt.layer("dense", 3, 4), nnrt.layer("dense", 4, 2)])
assert net._fuse_plan() is None
loaded = sorted(m for m in sys.modules if m.startswith("nnrt_plugins"))
assert not loaded, loaded
"""
    out = _run(code, disabled=_BUILTIN)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.filterwarnings("ignore")
def test_the_built_in_plugins_work_when_registered_from_outside() -> None:
    """With their entry points disabled and the modules registered at run time under
    other names (as an outside distribution would), everything the built-in plugins
    offer still works: the core has no special case for them."""
    code = """
import warnings, numpy as np, nnrt, nnrt.fold
import nnrt_plugins.batchnorm as bn, nnrt_plugins.sigmoid as sg
import nnrt_plugins.dense_nobias as dn, nnrt_plugins.sync_batchnorm as sb
assert not {"batchnorm", "sigmoid"} & set(nnrt.available_layers())
for mod, name in ((dn, "outside-dn"), (sg, "outside-sg"), (bn, "outside-bn"), (sb, "outside-sb")):
    nnrt.register_plugin(mod, name=name)
assert nnrt.available_layers()["batchnorm"] == "outside-bn"
from nnrt._hooks import default_block
assert default_block() == ("dense_nobias", "batchnorm", "sigmoid")
assert nnrt.BiasBeforeBatchNormWarning is bn.BiasBeforeBatchNormWarning
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    net = nnrt.Sequential([nnrt.layer("dense", 3, 4), nnrt.layer("batchnorm", 4),
                           nnrt.layer("sigmoid"), nnrt.layer("dense", 4, 2)], dtype="float64")
assert any(w.category is nnrt.BiasBeforeBatchNormWarning for w in caught)
assert net._fuse_plan() == bytes([0, 1, 0, 0])
X = np.random.default_rng(0).normal(size=(32, 3))
net.fit(X, (X[:, 0] > 0).astype(np.int64), loss="softmax_cross_entropy", optimizer="adam",
        epochs=2, batch_size=8, progress=False)
folded = nnrt.fold.fold(net)
assert [type(l).__name__ for l in folded.layers] == ["Dense", "Sigmoid", "Dense"]
np.testing.assert_allclose(folded(X), net(X), rtol=1e-10, atol=1e-12)
"""
    out = _run(code, disabled=_BUILTIN)
    assert out.returncode == 0, out.stderr[-3000:]
