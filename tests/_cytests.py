"""The compiled part of the test suite, built for the tests only (never installed).

``tests/cython/*.pyx`` cimport nnrt's ``.pxd`` files as a third-party Cython plugin
would; they are compiled in place into ``tests/cython/`` and imported as the package
``nnrt_cytests``:

* ``load()`` (used by the test modules) builds them on first use, and again whenever
  they are older than their source or than the nnrt they were compiled against, then
  imports ``nnrt_cytests._cy_layer_tests``;
* ``python tests/_cytests.py [--force]`` builds them by hand (``tests/debug_build.sh``
  does, with its sanitizer flags in ``CFLAGS``/``LDFLAGS``).

They are compiled with the flags recorded in the nnrt they test (``nnrt/_build_info.py``:
``-O3``, or ``NNRT_DEBUG_BUILD``'s ``-O0 -g`` with Cython's bounds checks on), against
the ``.pxd`` files of the nnrt that ``import nnrt`` finds. Building needs Cython,
setuptools and a C compiler (the ``test`` extra has the first two).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent / "cython"
if __name__ == "__main__":
    # run as a script, tests/ is sys.path[0], where tests/cython would shadow `cython`
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
PACKAGE = "nnrt_cytests"
MODULES = ("_cy_layer_tests",)


def _nnrt_dir() -> Path:
    """The nnrt package directory ``import nnrt`` would use (found without importing it:
    an AddressSanitizer build cannot be imported without its runtime preloaded)."""
    if os.environ.get("NNRT_CYTESTS_NNRT"):  # set by load(): the nnrt the tests import
        return Path(os.environ["NNRT_CYTESTS_NNRT"]).resolve()
    spec = importlib.util.find_spec("nnrt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nnrt is not importable: install it first (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _built(name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def _inputs(nnrt_dir: Path, name: str) -> list[Path]:
    files = [HERE / f"{name}.pyx", *nnrt_dir.glob("*.pxd"), nnrt_dir / "_build_info.py"]
    files += [p for p in nnrt_dir.iterdir() if p.name.startswith("layer.") and p.suffix == ".so"]
    return [p for p in files if p.exists()]


def stale(nnrt_dir: Path | None = None) -> list[str]:
    """Names of the test modules that are missing or older than what they depend on."""
    nnrt_dir = nnrt_dir or _nnrt_dir()
    out = []
    for name in MODULES:
        built = _built(name)
        if built is None or any(
            p.stat().st_mtime > built.stat().st_mtime for p in _inputs(nnrt_dir, name)
        ):
            out.append(name)
    return out


def _register_package() -> None:
    """Make ``nnrt_cytests`` the package in ``tests/cython`` (whatever else is on sys.path)."""
    pkg = sys.modules.get(PACKAGE)
    if pkg is not None and Path(getattr(pkg, "__file__", "") or "").resolve().parent == HERE:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE, HERE / "__init__.py", submodule_search_locations=[str(HERE)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


def load(name: str = "_cy_layer_tests") -> ModuleType:
    """``nnrt_cytests.<name>``, built first if it is missing or stale."""
    full = f"{PACKAGE}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if stale():
        env = dict(os.environ, NNRT_CYTESTS_NNRT=str(_nnrt_dir()))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve())],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            raise ImportError(
                f"building the compiled test modules (python tests/_cytests.py) failed:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    _register_package()
    return importlib.import_module(full)


def _read_build_info(nnrt_dir: Path) -> dict[str, Any]:
    path = nnrt_dir / "_build_info.py"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: nnrt was not built (pip install -e .)")
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    info: dict[str, Any] = namespace["BUILD_INFO"]
    return info


def build(force: bool = False) -> list[str]:
    """Compile the test modules in place (under a file lock); returns the names built."""
    import fcntl

    nnrt_dir = _nnrt_dir()
    with open(HERE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        names = list(MODULES) if force else stale(nnrt_dir)
        if names:
            _compile(nnrt_dir, names)
    return names


def _compile(nnrt_dir: Path, names: list[str]) -> None:
    import numpy as np
    from Cython.Build import cythonize
    from setuptools import Extension, setup

    info = _read_build_info(nnrt_dir)
    debug = bool(info.get("debug_build"))
    directives = {
        "language_level": "3",
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": True,
        "embedsignature": True,
        "binding": True,
    }
    macros = [tuple(m.split("=", 1)) for m in info.get("define_macros", [])]
    root = nnrt_dir.parent  # where `cimport nnrt.layer` finds nnrt/layer.pxd
    extensions = [
        Extension(
            f"{PACKAGE}.{name}",
            [str(HERE / f"{name}.pyx")],
            include_dirs=[np.get_include(), str(root)],
            define_macros=macros,  # type: ignore[arg-type]
            extra_compile_args=list(info.get("compile_args", [])),
        )
        for name in names
    ]
    with tempfile.TemporaryDirectory(prefix="nnrt-cytests-") as tmp:
        cwd = os.getcwd()
        # package_dir is relative; tests/ (not the project root) so that setuptools does not
        # pick up nnrt's own pyproject.toml
        os.chdir(HERE.parent)
        try:
            setup(
                name="nnrt-cytests",
                packages=[PACKAGE],
                package_dir={PACKAGE: HERE.name},
                ext_modules=cythonize(
                    extensions,
                    compiler_directives=directives,
                    include_path=[str(root)],
                    build_dir=tmp,
                    quiet=True,
                ),
                script_args=["-q", "build_ext", "--inplace", "--build-temp", tmp],
            )
        finally:
            os.chdir(cwd)


if __name__ == "__main__":
    built = build(force="--force" in sys.argv[1:])
    print(f"built {', '.join(built)}" if built else "compiled test modules are up to date")
