"""What to paste into a bug report: ``nnrt.show_config()`` / ``nnrt info``.

``config_info()`` returns the facts as a JSON-able dict, ``show_config()``
prints them:

- nnrt's version and the C ABI version compiled plugins are checked against;
- Python, the platform and the versions of nnrt's dependencies (and of the
  optional extras, when installed; read from package metadata, not imported);
- the BLAS libraries loaded in the process and their thread counts, via
  ``threadpoolctl`` (nnrt's kernels call the BLAS of ``scipy.linalg``, so
  scipy's is loaded first) and the thread-related environment variables;
- how the extensions were compiled: ``setup.py`` records its compiler, flags,
  macros and Cython/numpy versions in ``nnrt/_build_info.py`` at build time;
  without that file the interpreter's sysconfig defaults are shown instead,
  marked as such;
- every plugin the registry knows, with its status, distribution and layers.
"""

from __future__ import annotations

import importlib.metadata as ilm
import json
import os
import platform
import sys
import sysconfig
from typing import IO, Any

__all__ = ["config_info", "main", "show_config"]

_DEPENDENCIES = ("numpy", "scipy", "pluggy", "threadpoolctl", "tqdm")
_OPTIONAL = ("torch", "scikit-learn", "onnx", "onnxruntime", "matplotlib")
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NNRT_DISABLE_PLUGINS",
)


def _version(dist: str) -> str | None:
    try:
        return ilm.version(dist)
    except ilm.PackageNotFoundError:
        return None


def _build() -> dict[str, Any]:
    try:
        from nnrt import _build_info  # type: ignore[attr-defined]
    except ImportError:
        return {
            "recorded": False,
            "note": "nnrt/_build_info.py missing (not built by setup.py); "
            "showing the interpreter's sysconfig defaults",
            "compiler": sysconfig.get_config_var("CC"),
            "cflags": sysconfig.get_config_var("CFLAGS"),
        }
    info = dict(getattr(_build_info, "BUILD_INFO", {}))
    info["recorded"] = True
    return info


def _blas() -> list[dict[str, Any]]:
    try:
        import scipy.linalg  # noqa: F401  (loads the BLAS nnrt's kernels call)
        from threadpoolctl import threadpool_info
    except ImportError as exc:  # pragma: no cover - both are dependencies
        return [{"error": f"{type(exc).__name__}: {exc}"}]
    keys = ("user_api", "internal_api", "num_threads", "version", "threading_layer", "filepath")
    return [{k: lib.get(k) for k in keys if k in lib} for lib in threadpool_info()]


def _nnrt_threads() -> int | None:
    """Threads of the BLAS nnrt's GEMMs run on (``nnrt.get_num_threads()``)."""
    try:
        from nnrt.perf import get_num_threads
    except ImportError:  # pragma: no cover - perf controls not built in
        return None
    try:
        return int(get_num_threads())
    except Exception:  # pragma: no cover - threadpoolctl could not inspect the process
        return None


def _plugins() -> list[dict[str, Any]]:
    from nnrt.registry import registry

    return [
        {
            "name": p.name,
            "status": p.status,
            "source": p.source,
            "dist": p.dist,
            "version": p.version,
            "layers": list(p.layers),
        }
        for p in registry.plugins().values()
    ]


def config_info() -> dict[str, Any]:
    """Everything ``show_config`` prints, as a JSON-able dict."""
    import nnrt

    return {
        "nnrt": {
            "version": nnrt.__version__,
            "abi_version": int(nnrt.ABI_VERSION),
            "location": os.path.dirname(nnrt.__file__),
            "blas_threads": _nnrt_threads(),
        },
        "python": {
            "version": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "dependencies": {name: _version(name) for name in _DEPENDENCIES},
        "optional": {name: _version(name) for name in _OPTIONAL},
        "blas": _blas(),
        "environment": {k: os.environ[k] for k in _THREAD_ENV if k in os.environ},
        "build": _build(),
        "plugins": _plugins(),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) if value else "-"
    return str(value)


def show_config(file: IO[str] | None = None, *, as_json: bool = False) -> None:
    """Print nnrt's version, ABI, BLAS and threads, build flags and plugins.

    Writes to ``file`` (default ``sys.stdout``); ``as_json=True`` prints
    ``config_info()`` as JSON instead of the readable listing.
    """
    out = sys.stdout if file is None else file
    info = config_info()
    if as_json:
        print(json.dumps(info, indent=2, default=str), file=out)
        return
    lines: list[str] = []

    def section(title: str, items: dict[str, Any]) -> None:
        lines.append(f"{title}:")
        width = max((len(k) for k in items), default=0)
        for key, value in items.items():
            lines.append(f"  {key:<{width}}  {_fmt(value)}")

    section("nnrt", info["nnrt"])
    section("python", info["python"])
    section("platform", info["platform"])
    section("dependencies", info["dependencies"])
    section("optional extras", {k: v or "not installed" for k, v in info["optional"].items()})
    lines.append("blas / threads (threadpoolctl):")
    if not info["blas"]:
        lines.append("  (no BLAS or OpenMP library found in this process)")
    for lib in info["blas"]:
        head = f"{lib.get('internal_api', '?')} {lib.get('version') or ''}".rstrip()
        lines.append(
            f"  {lib.get('user_api', '?')}: {head}, {lib.get('num_threads')} threads"
            + (f", {lib['threading_layer']} threading" if lib.get("threading_layer") else "")
        )
        if lib.get("filepath"):
            lines.append(f"    {lib['filepath']}")
    env = info["environment"]
    lines.append("environment:" + ("" if env else " (no thread-related variables set)"))
    for key, value in env.items():
        lines.append(f"  {key}={value}")
    build = dict(info["build"])
    recorded = build.pop("recorded")
    lines.append("build" + ("" if recorded else " (not recorded)") + ":")
    width = max((len(k) for k in build), default=0)
    for key, value in build.items():
        lines.append(f"  {key:<{width}}  {_fmt(value)}")
    lines.append("plugins:")
    for p in info["plugins"]:
        dist = f" [{p['dist']} {p['version']}]" if p["dist"] else ""
        layers = ", ".join(p["layers"]) or "no layers"
        lines.append(f"  {p['name']}{dist}: {p['status']} ({layers}; {p['source']})")
    print("\n".join(lines), file=out)


def main(argv: list[str] | None = None) -> int:
    """``python -m nnrt.config [--json]``; what ``nnrt info`` prints."""
    args = sys.argv[1:] if argv is None else argv
    show_config(as_json="--json" in args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
