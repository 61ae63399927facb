"""Training curves: ``History.plot`` / ``nnrt.plotting.plot_history`` and ``nnrt train --plot``.

Images are checked from the file itself: the PNG signature, the IHDR chunk's
width and height (panels x PANEL_SIZE x dpi, as documented), and the pixels
(not blank, the curves' colours present).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.engine import History
from nnrt.plotting import PANEL_SIZE, plot_history


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG file's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def test_png_size_reader(tmp_path: Path) -> None:
    # a minimal PNG header written by hand: 300 x 7
    ihdr = struct.pack(">IIBBBBB", 300, 7, 8, 2, 0, 0, 0)
    p = tmp_path / "h.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0" * 4)
    assert png_size(p) == (300, 7)


def _history(val: bool = True) -> History:
    h = History()
    for e in range(5):
        logs = {"loss": 1.0 / (e + 1), "accuracy": 0.5 + 0.1 * e}
        if val:
            logs.update({"val_loss": 1.2 / (e + 1), "val_accuracy": 0.45 + 0.1 * e})
        h.append(e, logs)
    return h


@pytest.fixture
def mpl() -> Any:
    return pytest.importorskip("matplotlib")


def _pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return np.asarray(matplotlib.image.imread(str(path)))


@pytest.mark.parametrize("dpi", [50, 100])
def test_history_plot_writes_png_of_expected_size(mpl: Any, tmp_path: Path, dpi: int) -> None:
    path = tmp_path / "curve.png"
    fig = _history().plot(path, dpi=dpi)
    assert path.stat().st_size > 1000
    # two panels (loss, accuracy), each PANEL_SIZE inches at dpi
    want = (round(2 * PANEL_SIZE[0] * dpi), round(PANEL_SIZE[1] * dpi))
    assert png_size(path) == want
    px = _pixels(path)
    assert px.shape[:2] == (want[1], want[0])
    rgb = px[..., :3]
    assert rgb.std() > 0.05  # not a blank image
    # the train curve (matplotlib's first colour, #1f77b4) and the validation curve
    # (#ff7f0e) are drawn
    for colour in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        target = np.array(colour) / 255.0
        assert (np.abs(rgb - target).max(axis=-1) < 0.05).sum() > 20, colour
    assert fig is not None


def test_curves_hold_the_history_values(mpl: Any, tmp_path: Path) -> None:
    h = _history()
    fig = plot_history(h, tmp_path / "c.svg", title="run 1")
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["loss", "accuracy"]
    assert fig._suptitle is not None and fig._suptitle.get_text() == "run 1"
    for ax, key in zip(axes, ["loss", "accuracy"], strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"train", "validation"}
        np.testing.assert_array_equal(lines["train"].get_xdata(), [1, 2, 3, 4, 5])
        np.testing.assert_allclose(lines["train"].get_ydata(), h.history[key])
        np.testing.assert_allclose(lines["validation"].get_ydata(), h.history[f"val_{key}"])


def test_without_validation_and_extra_metrics(mpl: Any, tmp_path: Path) -> None:
    h = History()
    for e in range(3):
        h.append(e, {"mae": 3.0 - e, "loss": 2.0 - e, "val_r2": 0.1 * e})
    fig = plot_history(h.history, tmp_path / "c.png")  # a plain dict works too
    # loss first, then the metrics in recorded order; one panel for a val-only metric
    assert [ax.get_title() for ax in fig.axes] == ["loss", "mae", "r2"]
    assert [len(ax.get_lines()) for ax in fig.axes] == [1, 1, 1]
    assert [ax.get_lines()[0].get_label() for ax in fig.axes] == ["train", "train", "validation"]
    assert png_size(tmp_path / "c.png") == (
        round(3 * PANEL_SIZE[0] * 100),
        round(PANEL_SIZE[1] * 100),
    )


def test_val_label(mpl: Any, tmp_path: Path) -> None:
    fig = plot_history(_history(), tmp_path / "c.png", val_label="test")
    assert {line.get_label() for line in fig.axes[0].get_lines()} == {"train", "test"}


def test_plot_from_fit(mpl: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = (X[:, 0] > 0).astype(np.int64)
    net = nnrt.Sequential([nnrt.layer("dense", 4, 8), nnrt.layer("sigmoid"),
                           nnrt.layer("dense", 8, 2)], seed=0)  # fmt: skip
    hist = net.fit(X, y, epochs=3, validation_split=0.25, progress=False)
    fig = hist.plot(tmp_path / "fit.png")
    assert png_size(tmp_path / "fit.png") == (round(2 * PANEL_SIZE[0] * 100), 300)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy"]


def test_without_path_returns_a_pyplot_figure(mpl: Any) -> None:
    import matplotlib.pyplot as plt

    fig = _history().plot()
    try:
        assert plt.fignum_exists(fig.number)
        assert len(fig.axes) == 2
    finally:
        plt.close(fig)


def test_empty_history_and_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        plot_history(History())
    with pytest.raises(TypeError, match="History"):
        plot_history([1.0, 2.0])


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # simulate an environment without matplotlib: importing it raises ImportError
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    for path in (None, "x.png"):
        with pytest.raises(ImportError, match=r'pip install "nnrt\[plot\]"'):
            _history().plot(path)


# ------------------------------------------------------------ nnrt train --plot
def _run(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nnrt", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or dict(os.environ, MPLBACKEND="Agg"),
        timeout=180,
    )


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 5))
    y = (X[:, :2].sum(axis=1) > 0).astype(np.int64)
    path = tmp_path / "d.npz"
    np.savez(path, X=X, y=y)
    return path


def test_cli_train_plot(mpl: Any, tmp_path: Path, data: Path) -> None:
    curve = tmp_path / "curve.png"
    proc = _run("train", "--data", str(data), "--layers", "dense:8,sigmoid,dense:2",
                "--epochs", "4", "--validation-split", "0.2", "--no-progress",
                "--out", str(tmp_path / "m.npz"), "--plot", str(curve), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"training curve written to {curve}" in proc.stdout
    assert png_size(curve) == (round(2 * PANEL_SIZE[0] * 100), round(PANEL_SIZE[1] * 100))
    assert _pixels(curve)[..., :3].std() > 0.05


def test_cli_train_plot_without_matplotlib(tmp_path: Path, data: Path) -> None:
    # a sitecustomize-free way to hide matplotlib from the child: a shadowing module
    # that raises ImportError, first on its path
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])
    )
    out = tmp_path / "m.npz"
    proc = _run("train", "--data", str(data), "--layers", "dense:2", "--epochs", "1",
                "--no-progress", "--out", str(out), "--plot", str(tmp_path / "c.png"),
                cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and 'pip install "nnrt[plot]"' in err, err
    assert not out.exists()  # refused before training
