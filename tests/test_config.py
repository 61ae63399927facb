"""``nnrt.show_config()`` / ``config_info()``: the bug-report summary.

Cross-checked against independent sources: threadpoolctl's own view of the
process, package metadata, the registry's plugin table and the sysconfig of
the interpreter.
"""

from __future__ import annotations

import importlib.metadata as ilm
import io
import json
import subprocess
import sys

import pytest

import nnrt
from nnrt.config import config_info, main, show_config
from nnrt.registry import registry


def test_info_is_json_and_names_versions() -> None:
    info = config_info()
    json.dumps(info)  # JSON-able as documented
    assert info["nnrt"]["version"] == nnrt.__version__ == ilm.version("nnrt")
    assert info["nnrt"]["abi_version"] == int(nnrt.ABI_VERSION)
    assert info["python"]["version"] == sys.version.split()[0]
    assert info["dependencies"]["numpy"] == ilm.version("numpy")
    for name, version in info["optional"].items():
        try:
            assert version == ilm.version(name)
        except ilm.PackageNotFoundError:
            assert version is None


def test_blas_threads_follow_threadpoolctl() -> None:
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import scipy.linalg  # noqa: F401  (nnrt's kernels use scipy's BLAS)

    expected = {
        (lib["filepath"], lib["num_threads"])
        for lib in threadpoolctl.threadpool_info()
        if lib["user_api"] == "blas"
    }
    got = {(lib["filepath"], lib["num_threads"]) for lib in config_info()["blas"]}
    assert expected and expected <= got
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        blas = [lib for lib in config_info()["blas"] if lib["user_api"] == "blas"]
        assert blas and all(lib["num_threads"] == 1 for lib in blas)
        out = io.StringIO()
        show_config(file=out)
        assert "1 threads" in out.getvalue()


def test_build_flags() -> None:
    build = config_info()["build"]
    if build["recorded"]:  # built by setup.py (pip install -e . / build_ext)
        assert isinstance(build["compile_args"], list) and build["compile_args"]
        assert isinstance(build["compiler"], str) and build["compiler"]
        assert build["debug_build"] in (True, False)
        assert any("NPY_NO_DEPRECATED_API" in m for m in build["define_macros"])
    else:
        import sysconfig

        assert build["compiler"] == sysconfig.get_config_var("CC")


def test_plugins_match_registry() -> None:
    info = config_info()
    assert {p["name"]: p["status"] for p in info["plugins"]} == {
        name: p.status for name, p in registry.plugins().items()
    }
    layers = {layer for p in info["plugins"] for layer in p["layers"]}
    assert {"dense", "dense_nobias", "batchnorm", "sigmoid"} <= layers


def test_show_config_text() -> None:
    out = io.StringIO()
    nnrt.show_config(file=out)
    text = out.getvalue()
    assert f"version       {nnrt.__version__}" in text
    assert f"abi_version   {int(nnrt.ABI_VERSION)}" in text
    for section in ("blas / threads", "build", "plugins:", "dependencies:"):
        assert section in text
    for name in registry.plugins():
        assert f"  {name}" in text


def test_env_vars_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert config_info()["environment"]["OMP_NUM_THREADS"] == "3"
    out = io.StringIO()
    show_config(file=out)
    assert "OMP_NUM_THREADS=3" in out.getvalue()


def test_main_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["nnrt"]["version"] == nnrt.__version__


def test_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "nnrt.config"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    assert "abi_version" in proc.stdout and "plugins:" in proc.stdout
