"""A real third-party distribution, installed with pip, that registers the built-in
name ``batchnorm`` and one layer of its own: the built-in keeps serving (whatever order
the file system lists the distributions in), a saved model still loads, the plugin's
own layer works, and ``nnrt plugins`` shows what was refused."""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import nnrt

PLUGIN_SRC = '''
import numpy as np
import nnrt


class FakeBatchNorm(nnrt.Layer):
    """Pretends to be batchnorm: doubles its input."""

    def __init__(self, num_features, momentum=0.1, eps=1e-5):
        super().__init__()
        self.in_features = self.out_features = num_features

    def forward(self, X, training=False):
        return 2 * self.prepare_input(X)

    def backward(self, dY):
        return 2 * np.asarray(dY)


class Triple(nnrt.Layer):
    def __init__(self):
        super().__init__()

    def forward(self, X, training=False):
        return 3 * self.prepare_input(X)

    def backward(self, dY):
        return 3 * np.asarray(dY)


@nnrt.hookimpl
def nnrt_register_layers(register):
    register("batchnorm", FakeBatchNorm)
    register("evil_triple", Triple)
'''


def _wheel(out: pathlib.Path) -> pathlib.Path:
    """A real wheel of distribution ``aaa-nnrt-evil-bn`` (written by hand: no build
    backend needed), whose entry point ``aaa_evil_bn`` sorts before nnrt's own."""
    files = {
        "nnrt_evil_bn/__init__.py": PLUGIN_SRC,
        "aaa_nnrt_evil_bn-0.1.dist-info/METADATA": (
            "Metadata-Version: 2.1\nName: aaa-nnrt-evil-bn\nVersion: 0.1\n"
        ),
        "aaa_nnrt_evil_bn-0.1.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: nnrt-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
        "aaa_nnrt_evil_bn-0.1.dist-info/entry_points.txt": "[nnrt]\naaa_evil_bn = nnrt_evil_bn\n",
    }
    record = []
    for name, text in files.items():
        digest = hashlib.sha256(text.encode()).digest()
        b64 = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        record.append(f"{name},sha256={b64},{len(text.encode())}")
    record.append("aaa_nnrt_evil_bn-0.1.dist-info/RECORD,,")
    files["aaa_nnrt_evil_bn-0.1.dist-info/RECORD"] = "\n".join(record) + "\n"
    whl = out / "aaa_nnrt_evil_bn-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return whl


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    whl = _wheel(tmp_path_factory.mktemp("wheel"))
    target = tmp_path_factory.mktemp("target")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--target", str(target), str(whl)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (target / "aaa_nnrt_evil_bn-0.1.dist-info" / "entry_points.txt").is_file()
    assert (target / "nnrt_evil_bn" / "__init__.py").is_file()
    return target


@pytest.fixture(scope="module")
def bn_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, np.ndarray]:
    net = nnrt.Sequential(
        [nnrt.layer("dense_nobias", 3, 4), nnrt.layer("batchnorm", 4), nnrt.layer("dense", 4, 2)],
        seed=3,
        dtype="float64",
    )
    X = np.random.default_rng(0).standard_normal((16, 3))
    net.fit(X, np.arange(16) % 2, epochs=2, batch_size=8, progress=False)
    path = tmp_path_factory.mktemp("model") / "bn.npz"
    net.save(path)
    return path, net.predict(X[:5])


CHILD = """
import sys, warnings
import numpy as np
import nnrt
from nnrt_plugins.batchnorm import BatchNorm

with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    layers = nnrt.available_layers()
hits = [str(w.message) for w in rec if issubclass(w.category, nnrt.PluginWarning)]
assert len(hits) == 1, hits
assert "'aaa_evil_bn'" in hits[0] and "'batchnorm'" in hits[0], hits
assert rec[0].filename == "<string>", rec[0].filename  # points at this script's line
assert layers["batchnorm"] == "batchnorm", layers
assert type(nnrt.layer("batchnorm", 4)) is BatchNorm
assert layers["evil_triple"] == "aaa_evil_bn"
assert np.array_equal(nnrt.layer("evil_triple").forward(np.ones((2, 2))), 3 * np.ones((2, 2)))
X = np.random.default_rng(0).standard_normal((16, 3))[:5]
net = nnrt.load(sys.argv[1])
np.testing.assert_array_equal(net.predict(X), np.load(sys.argv[2]))
print("OK")
"""


def _env(target: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NNRT_DISABLE_PLUGINS", None)
    # PYTHONPATH comes before site-packages: the third party is listed first
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), env.get("PYTHONPATH")) if p)
    return env


def test_installed_plugin_cannot_displace_batchnorm(
    installed: pathlib.Path, bn_model: tuple[pathlib.Path, np.ndarray], tmp_path: pathlib.Path
) -> None:
    path, want = bn_model
    np.save(tmp_path / "want.npy", want)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(tmp_path / "want.npy")],
        capture_output=True, text=True, env=_env(installed), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_nnrt_plugins_and_predict_with_the_clashing_plugin_installed(
    installed: pathlib.Path, bn_model: tuple[pathlib.Path, np.ndarray], tmp_path: pathlib.Path
) -> None:
    env = _env(installed)
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::UserWarning", "-m", "nnrt", "plugins"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()}
    assert "batchnorm" in rows["batchnorm"] and "nnrt " in rows["batchnorm"]
    evil = rows["aaa_evil_bn"]
    assert "aaa-nnrt-evil-bn 0.1" in evil and "evil_triple" in evil
    assert "refused" in evil and "'batchnorm'" in evil
    path, want = bn_model
    data = tmp_path / "x.npz"
    np.savez(data, X=np.random.default_rng(0).standard_normal((16, 3))[:5])
    proc = subprocess.run(
        [sys.executable, "-W", "ignore::UserWarning", "-m", "nnrt", "predict", str(path),
         str(data), "--scores"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = np.array([[float(v) for v in line.split(",")] for line in proc.stdout.split()])
    np.testing.assert_allclose(got, want, rtol=1e-5)
