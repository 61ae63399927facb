"""The ``nnrt`` command, run as a subprocess (``python -m nnrt``)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import nnrt


def run(*args: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, "-m", "nnrt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("nnrt: error:")
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def blobs_npz(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=4.0, size=(3, 5))
    y = rng.integers(0, 3, size=300)
    X = centers[y] + rng.normal(size=(300, 5))
    path = tmp_path_factory.mktemp("data") / "blobs.npz"
    np.savez(path, X=X, y=y)
    return path


@pytest.fixture(scope="module")
def model(blobs_npz: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("model") / "model.npz"
    proc = run(
        "train", "--data", str(blobs_npz), "--layers", "dense_nobias:16,batchnorm,sigmoid,dense:3",
        "--epochs", "8", "--lr", "0.01", "--seed", "1", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "model written to" in proc.stdout and out.exists()
    return out


def test_demo_prints_accuracy_progress_and_plot(tmp_path: pathlib.Path) -> None:
    proc = run("demo", "--progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"test accuracy: ([0-9.]+)%", proc.stdout)
    assert m is not None, proc.stdout
    assert float(m.group(1)) >= 95.0
    assert "batch/s" in proc.stderr or "it/s" in proc.stderr  # the tqdm bar
    png = tmp_path / "nnrt-demo.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert f"training curve written to {png}" in proc.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in proc.stdout and not png.exists()


def test_train_predict_round_trip(model: pathlib.Path, blobs_npz: pathlib.Path) -> None:
    proc = run("predict", str(model), str(blobs_npz))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert len(lines) == 300
    pred = np.array([int(v) for v in lines])
    # the same predictions as the model loaded in this process
    with np.load(blobs_npz) as d:
        X, y = d["X"], d["y"]
    assert np.array_equal(pred, nnrt.load(model).predict(X).argmax(axis=1))
    acc = float(np.mean(pred == y))
    assert acc > 0.9
    assert f"{100 * acc:.2f}%" in proc.stderr


def test_predict_scores_to_files(
    model: pathlib.Path, blobs_npz: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with np.load(blobs_npz) as d:
        X = d["X"]
    expected = nnrt.load(model).predict(X)
    npy = tmp_path / "scores.npy"
    proc = run("predict", str(model), str(blobs_npz), "--scores", "--out", str(npy))
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.load(npy), expected)
    csv_in = tmp_path / "features.csv"
    np.savetxt(csv_in, X, delimiter=",", header="a,b,c,d,e", comments="")
    csv_out = tmp_path / "classes.csv"
    proc = run("predict", str(model), str(csv_in), "--out", str(csv_out))
    assert proc.returncode == 0, proc.stderr
    got = np.loadtxt(csv_out, dtype=np.int64)
    # CSV text round-trips float64 exactly; the model computes in float32
    assert np.mean(got == expected.argmax(axis=1)) > 0.99


def test_train_from_csv_with_options(tmp_path: pathlib.Path) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 3))
    y = (X[:, 0] - X[:, 2] > 0).astype(int)
    csv = tmp_path / "d.csv"
    np.savetxt(csv, np.column_stack([X, y]), delimiter=",", fmt="%.10g")
    out = tmp_path / "m.bin"
    proc = run(
        "train", "--data", str(csv), "--layers", "dense:8,sigmoid,dense:2", "--epochs", "3",
        "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--dtype", "float64",
        "--validation-split", "0.25", "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "val_accuracy" in proc.stdout
    net = nnrt.load(out)
    assert net.dtype == np.float64 and len(net) == 3


def test_info_on_a_model(model: pathlib.Path) -> None:
    proc = run("info", str(model))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("dense_nobias", "batchnorm", "sigmoid", "dense"):
        assert name in out
    # parameter count from the layer shapes: 5*16 + (16 + 16) + (16*3 + 3)
    assert re.search(r"total trainable parameters: 163\b", out), out
    assert f"nnrt {nnrt.__version__}" in out and f"ABI {nnrt.ABI_VERSION}" in out


def test_info_without_model_and_plugins() -> None:
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    assert nnrt.__version__ in proc.stdout and "abi_version" in proc.stdout
    assert "blas" in proc.stdout and "batchnorm" in proc.stdout
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["nnrt"]["version"] == nnrt.__version__
    assert info["nnrt"]["abi_version"] == nnrt.ABI_VERSION
    assert any(lib["user_api"] == "blas" for lib in info["blas"])
    assert {"nnrt", "batchnorm", "sigmoid", "dense_nobias"} <= {p["name"] for p in info["plugins"]}
    proc = run("plugins")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line.strip()}
    for plugin, layer in [("batchnorm", "batchnorm"), ("sigmoid", "sigmoid"),
                          ("dense_nobias", "dense_nobias"), ("nnrt", "dense")]:  # fmt: skip
        assert plugin in rows and layer in rows[plugin] and "ok" in rows[plugin]
    assert "nnrt 0" in rows["batchnorm"] or f"nnrt {nnrt.__version__}" in rows["batchnorm"]


def test_errors_are_one_line_without_traceback(
    tmp_path: pathlib.Path, model: pathlib.Path, blobs_npz: pathlib.Path
) -> None:
    _assert_one_line_error(run("train", "--data", str(tmp_path / "nope.npz")), "nope.npz")
    _assert_one_line_error(
        run("train", "--data", str(blobs_npz), "--layers", "dense:4,warp_drive"), "warp_drive"
    )
    bad = tmp_path / "bad.npz"
    bad.write_bytes(model.read_bytes()[:500])
    _assert_one_line_error(run("predict", str(bad), str(blobs_npz)), "bad.npz")
    _assert_one_line_error(run("info", str(bad)), "bad.npz")
    _assert_one_line_error(
        run("train", "--data", str(blobs_npz), "--optimizer", "rmsprop", "--no-progress",
            "--out", str(tmp_path / "x.npz")),
        "rmsprop",
    )  # fmt: skip
    with_debug = run("--debug", "predict", str(bad), str(blobs_npz))
    assert with_debug.returncode != 0 and "Traceback" in with_debug.stderr
    with_debug = run("info", str(bad), "--debug")
    assert with_debug.returncode != 0 and "Traceback" in with_debug.stderr
    usage = run("frobnicate")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr


def test_console_script_is_installed() -> None:
    script = pathlib.Path(sys.executable).parent / "nnrt"
    if not script.exists():
        pytest.skip("nnrt console script not installed next to this interpreter")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"nnrt {nnrt.__version__}"


def test_demo_can_save_its_model(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "digits.npz"
    proc = run("demo", "--epochs", "2", "--no-plot", "--no-progress", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    arch = json.loads(str(np.load(out, allow_pickle=False)["architecture"]))
    assert [s["name"] for s in arch["layers"]] == ["dense_nobias", "batchnorm", "sigmoid", "dense"]
