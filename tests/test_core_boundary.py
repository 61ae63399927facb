"""The core (nnrt/) never imports a plugin module: the built-in plugins reach it
through hooks only, so they could be removed and installed from elsewhere."""

from __future__ import annotations

import ast
import os
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
