"""What ``pip install .`` installs, and how it builds (issue 15).

The compiled test modules (``tests/cython``, import name ``nnrt_cytests``) are
built for the test suite by ``tests/_cytests.py`` and never installed; the
package build compiles in parallel.
"""

from __future__ import annotations

import importlib.metadata as ilm
import os
import subprocess
import sys
from pathlib import Path

import nnrt

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_test_modules_are_not_installed(tmp_path: Path) -> None:
    # a fresh interpreter outside the checkout finds nnrt but not the test package
    code = (
        "import importlib.util as u, nnrt_plugins, nnrt; "
        "print(u.find_spec('nnrt') is not None, u.find_spec('nnrt_cytests') is None)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"], proc.stdout
    # nor does the distribution's file list (a wheel's RECORD) carry it
    files = [str(f) for f in ilm.files("nnrt") or []]
    assert not [f for f in files if f.startswith("nnrt_cytests") or "_cy_layer_tests.cpython" in f]


def test_installed_package_has_what_cython_plugins_need() -> None:
    # the .pxd files a third-party Cython plugin (or tests/_cytests.py) cimports
    pkg = Path(nnrt.__file__).parent
    for name in ("layer.pxd", "dense.pxd", "blas.pxd"):
        assert (pkg / name).exists(), name


def test_build_runs_in_parallel(tmp_path: Path) -> None:
    """setup.py's build_ext uses one job per CPU unless -j or NNRT_BUILD_JOBS says otherwise."""
    code = f"""
import os, sys
sys.argv = ["setup.py", "--name"]
os.chdir({str(ROOT)!r})
import setuptools
captured = {{}}
def fake_setup(**kw):
    captured.update(kw)
setuptools.setup = fake_setup
ns = {{"__name__": "__main__", "__file__": "setup.py"}}
exec(compile(open("setup.py").read(), "setup.py", "exec"), ns)
from setuptools.dist import Distribution
dist = Distribution({{"ext_modules": captured["ext_modules"]}})
cmd = captured["cmdclass"]["build_ext"](dist)
cmd.initialize_options()
cmd.finalize_options()
names = sorted(e.name for e in captured["ext_modules"])
print(cmd.parallel, os.cpu_count(), ",".join(names), ",".join(captured["packages"]))
"""
    env = _clean_env()
    for jobs in (None, "3"):
        if jobs is None:
            env.pop("NNRT_BUILD_JOBS", None)
        else:
            env["NNRT_BUILD_JOBS"] = jobs
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        parallel, cpus, names, packages = proc.stdout.split()[-4:]
        assert int(parallel) == (int(cpus) if jobs is None else 3)
        assert "nnrt_cytests" not in names and "nnrt_cytests" not in packages
        assert "nnrt.layer" in names.split(",") and "nnrt_plugins._batchnorm" in names.split(",")
