"""Plugins are type-checked: statically with mypy, and at registration at run time.

* mypy passes (``--strict``) on the example pure-Python plugin package
  docs/examples/nnrt-tanh-dropout, and flags a plugin whose layer overrides
  ``forward`` with an incompatible signature or registers a non-Layer class;
* at run time, registration rejects a wrong hook signature, a misspelled hook
  name, a non-Layer class, a Layer without forward/backward and a hook that
  returns something, each with an error naming the plugin.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import nnrt
from nnrt.registry import PluginError, Registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "nnrt-tanh-dropout"

MYPY_INI = """\
[mypy]
strict = True
warn_unused_ignores = False
# nnrt's own modules are checked by its own CI; here they are a library
[mypy-nnrt,nnrt.*]
ignore_errors = True
"""


def _mypy(paths: list[Path], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    cfg = cache / "mypy.ini"
    cfg.write_text(MYPY_INI)
    env = dict(os.environ)
    # An editable nnrt is found through an import hook mypy cannot follow: point
    # mypy at its source directory (a regular install is found in site-packages).
    nnrt_root = Path(nnrt.__file__).resolve().parents[1]
    if not any(part in ("site-packages", "dist-packages") for part in nnrt_root.parts):
        env["MYPYPATH"] = str(nnrt_root)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(cfg),
            "--cache-dir",
            str(cache / "mypy_cache"),
            "--no-error-summary",
            "--hide-error-context",
            *map(str, paths),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy")


def test_mypy_passes_on_the_python_example(mypy_cache: Path) -> None:
    result = _mypy([EXAMPLE / "src" / "nnrt_tanh_dropout", EXAMPLE / "tests"], EXAMPLE, mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr


BAD_PLUGIN = """\
from __future__ import annotations

from typing import Any

import numpy as np

import nnrt
from nnrt.hookspecs import RegisterLayer


class WrongForward(nnrt.Layer):
    def forward(self, X: Any) -> np.ndarray:  # training argument missing
        return self.prepare_input(X)

    def backward(self, dY: Any) -> np.ndarray:
        return self.prepare_input(dY)


class NotALayer:
    pass


@nnrt.hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("wrong_forward", WrongForward)
    register("not_a_layer", NotALayer)
    register(3, WrongForward)
"""


def test_mypy_flags_a_broken_plugin(tmp_path: Path, mypy_cache: Path) -> None:
    plugin = tmp_path / "bad_plugin.py"
    plugin.write_text(BAD_PLUGIN)
    result = _mypy([plugin], tmp_path, mypy_cache)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    lines = out.splitlines()
    src = BAD_PLUGIN.splitlines()

    def line_of(text: str) -> str:
        return f":{src.index(text) + 1}:"

    # the override of forward is incompatible with nnrt.Layer.forward
    at = line_of("    def forward(self, X: Any) -> np.ndarray:  # training argument missing")
    assert any(
        at in line and "forward" in line and "incompatible with supertype" in line for line in lines
    ), out
    # register() wants (str, type[Layer])
    at = line_of('    register("not_a_layer", NotALayer)')
    assert any(at in line and "NotALayer" in line and "Layer" in line for line in lines), out
    at = line_of("    register(3, WrongForward)")
    assert any(at in line and '"int"' in line and '"str"' in line for line in lines), out
    assert len(lines) >= 3


# ------------------------------------------------------ run-time registration
class Good(nnrt.Layer):
    def __init__(self) -> None:
        super().__init__()

    def forward(self, X: object, training: bool = False) -> np.ndarray:
        return self.prepare_input(X)

    def backward(self, dY: object) -> np.ndarray:
        return np.asarray(dY)


def _plugin(name: str, body: str) -> object:
    """A module-like plugin object built from source (its functions are hookimpls)."""
    import types

    mod = types.ModuleType(name)
    mod.__dict__.update({"nnrt": nnrt, "np": np, "Good": Good})
    exec(textwrap.dedent(body), mod.__dict__)
    return mod


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.ensure_loaded()
    return r


def test_good_plugin_registers(reg: Registry) -> None:
    p = _plugin(
        "typing_good",
        """
        @nnrt.hookimpl
        def nnrt_register_layers(register):
            register("typing_good_layer", Good)
        """,
    )
    assert reg.register_plugin(p) == "typing_good"
    assert reg.get("typing_good_layer").cls is Good
    assert reg.plugins()["typing_good"].layers == ["typing_good_layer"]


@pytest.mark.parametrize(
    ("body", "exc", "words"),
    [
        (
            """
            @nnrt.hookimpl
            def nnrt_register_layers(register, extra):
                register("x1", Good)
            """,
            PluginError,
            ["extra", "nnrt_register_layers"],
        ),
        (
            """
            @nnrt.hookimpl
            def nnrt_register_layer(register):
                register("x2", Good)
            """,
            PluginError,
            ["unknown hook", "nnrt_register_layer"],
        ),
        (
            """
            class NotALayer:
                def forward(self, X, training=False): return X
                def backward(self, dY): return dY
            @nnrt.hookimpl
            def nnrt_register_layers(register):
                register("x3", NotALayer)
            """,
            TypeError,
            ["'x3'", "NotALayer", "not a subclass of nnrt.Layer"],
        ),
        (
            """
            @nnrt.hookimpl
            def nnrt_register_layers(register):
                register("x4", Good())
            """,
            TypeError,
            ["'x4'", "needs a class"],
        ),
        (
            """
            class NoBackward(nnrt.Layer):
                def forward(self, X, training=False): return X
            @nnrt.hookimpl
            def nnrt_register_layers(register):
                register("x5", NoBackward)
            """,
            TypeError,
            ["'x5'", "NoBackward", "does not implement backward"],
        ),
        (
            """
            @nnrt.hookimpl
            def nnrt_register_layers(register):
                return {"x6": Good}
            """,
            PluginError,
            ["must return None", "register(name, cls)"],
        ),
        (
            """
            @nnrt.hookimpl
            def nnrt_register_layers(register):
                register("has space", Good)
            """,
            ValueError,
            ["'has space'"],
        ),
        (
            """
            @nnrt.hookimpl
            def nnrt_register_layers(register):
                register("dense", Good)
            """,
            ValueError,
            ["'dense'", "'nnrt'", "already registered"],
        ),
    ],
    ids=[
        "extra-hook-arg",
        "misspelled-hook",
        "non-layer-class",
        "instance-not-class",
        "no-backward",
        "returns-value",
        "bad-name",
        "name-clash",
    ],
)
def test_bad_plugin_rejected_at_registration(
    reg: Registry, body: str, exc: type[Exception], words: list[str]
) -> None:
    p = _plugin("typing_bad_plugin", body)
    with pytest.raises(exc) as info:
        reg.register_plugin(p)
    msg = str(info.value)
    assert "typing_bad_plugin" in msg, msg
    for word in words:
        assert word in msg, msg
    # nothing of the failed plugin stays registered
    assert "typing_bad_plugin" not in reg.plugins()
    assert not any(n.startswith("x") and n[1:].isdigit() for n in reg.layers())
    assert not reg.pm.is_registered(p)
