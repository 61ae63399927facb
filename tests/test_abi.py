"""ABI versioning of compiled plugins.

A Cython plugin compiles ``NNRT_ABI_VERSION`` from ``nnrt/layer.pxd`` into
itself and calls ``nnrt.layer.check_abi(NNRT_ABI_VERSION, __name__)`` at
import; a mismatch must raise ImportError naming the plugin and both versions,
and an installed plugin that fails this way is reported without breaking the
others.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import nnrt
import nnrt.layer


def test_check_abi_accepts_the_running_version() -> None:
    assert isinstance(nnrt.ABI_VERSION, int) and nnrt.ABI_VERSION >= 1
    assert nnrt.check_abi(nnrt.ABI_VERSION, "some_plugin") is True
    assert nnrt.layer.check_abi is nnrt.check_abi


@pytest.mark.parametrize("delta", [1, -1, 1000])
def test_check_abi_mismatch_names_plugin_and_both_versions(delta: int) -> None:
    built = nnrt.ABI_VERSION + delta
    with pytest.raises(ImportError) as info:
        nnrt.check_abi(built, "acme_layers._kernels")
    msg = str(info.value)
    assert "acme_layers._kernels" in msg
    assert re.search(rf"\b{built}\b", msg), msg
    assert re.search(rf"\b{nnrt.ABI_VERSION}\b", msg), msg
    assert "rebuild" in msg  # says what to do


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


_FAKE_MISMATCH = """
    import warnings
    import nnrt.layer as L

    real = L.check_abi
    calls = []

    def fake(version, plugin):
        # pretend {target} was compiled against the next ABI version
        calls.append((version, plugin))
        if plugin.startswith("{target}"):
            return real(version + 1, plugin)
        return real(version, plugin)

    L.check_abi = fake
"""


def test_example_cython_plugin_checks_the_abi_at_import() -> None:
    if importlib.util.find_spec("nnrt_relu_cython") is None:
        pytest.skip("docs/examples/nnrt-relu-cython is not installed")
    code = (
        _FAKE_MISMATCH.format(target="nnrt_relu_cython")
        + """
    try:
        import nnrt_relu_cython._relu
    except ImportError as exc:
        print("IMPORT ERROR:", exc)
    print("CALLS:", calls)
    """
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    v = nnrt.ABI_VERSION
    # the compiled module called check_abi with the version in its .pxd, and its name
    assert f"CALLS: [({v}, 'nnrt_relu_cython._relu')]" in out, out
    assert "IMPORT ERROR:" in out and "'nnrt_relu_cython._relu'" in out, out
    assert f"ABI version {v + 1}" in out and f"ABI version {v}" in out, out


def test_abi_mismatch_of_an_installed_plugin_is_reported_and_others_work() -> None:
    if importlib.util.find_spec("nnrt_relu_cython") is None:
        pytest.skip("docs/examples/nnrt-relu-cython is not installed")
    code = (
        _FAKE_MISMATCH.format(target="nnrt_relu_cython")
        + """
    import nnrt
    from nnrt.registry import Registry
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = Registry()
        reg.ensure_loaded()
    info = reg.plugins()["relu_cython"]
    print("STATUS:", info.status)
    print("DIST:", info.dist)
    print("WARNINGS:", [str(w.message) for w in caught if issubclass(w.category, nnrt.PluginWarning)])
    print("LAYERS:", sorted(reg.layers()))
    """
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    status = next(line for line in out.splitlines() if line.startswith("STATUS:"))
    assert status.startswith("STATUS: failed") and "ABI version" in status, out
    assert "DIST: nnrt-relu-cython" in out
    warn = next(line for line in out.splitlines() if line.startswith("WARNINGS:"))
    assert "relu_cython" in warn and "ABI version" in warn, out
    layers = next(line for line in out.splitlines() if line.startswith("LAYERS:"))
    assert "'relu'" not in layers and "'dense'" in layers and "'sigmoid'" in layers, out


# A real compiled module built against a copy of layer.pxd with another ABI number.
_PYX = """
# cython: language_level=3
from nnrt.layer cimport Layer, NNRT_ABI_VERSION
from nnrt.layer import check_abi

check_abi(NNRT_ABI_VERSION, __name__)


cdef class Identity(Layer):
    cpdef object forward(self, object X, bint training=False):
        return self.prepare_input(X)
"""


@pytest.mark.slow
def test_module_compiled_against_another_abi_fails_to_import(tmp_path: Path) -> None:
    pytest.importorskip("Cython")
    if (
        shutil.which(
            sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc"
        )
        is None
    ):
        pytest.skip("no C compiler")
    import numpy as np

    pxd = Path(nnrt.layer.__file__).with_name("layer.pxd")
    if not pxd.exists():
        pytest.skip("nnrt/layer.pxd is not installed")
    fake = nnrt.ABI_VERSION + 41
    inc = tmp_path / "inc" / "nnrt"
    inc.mkdir(parents=True)
    (inc / "__init__.pxd").write_text("")
    text, n = re.subn(r"NNRT_ABI_VERSION = \d+", f"NNRT_ABI_VERSION = {fake}", pxd.read_text())
    assert n == 1, "layer.pxd no longer declares NNRT_ABI_VERSION = <int>"
    (inc / "layer.pxd").write_text(text)
    src = tmp_path / "abi_probe.pyx"
    src.write_text(_PYX)
    setup = tmp_path / "setup.py"
    setup.write_text(
        textwrap.dedent(
            f"""
            from Cython.Build import cythonize
            from setuptools import Extension, setup
            setup(
                ext_modules=cythonize(
                    [Extension("abi_probe", ["abi_probe.pyx"], include_dirs=[{np.get_include()!r}])],
                    include_path=[{str(tmp_path / "inc")!r}],
                    quiet=True,
                ),
                script_args=["build_ext", "--inplace", "-q"],
            )
            """
        )
    )
    build = subprocess.run(
        [sys.executable, str(setup)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", "import abi_probe"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    err = result.stderr
    assert "ImportError" in err and "'abi_probe'" in err, err
    assert f"ABI version {fake}" in err and f"ABI version {nnrt.ABI_VERSION}" in err, err
