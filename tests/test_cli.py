"""The ``nnrt`` command, run as a subprocess (``python -m nnrt``)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import types
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.cli import CLIError, build_layers, parse_layers


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
    # the held-out digits are the test set, and labelled so
    assert "test_accuracy" in proc.stdout and "val_accuracy" not in proc.stdout
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


# --------------------------------------------------------------- --layers grammar
class _Slope(nnrt.Layer):
    """A width-keeping layer with one hyperparameter (like leaky_relu)."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = float(negative_slope)

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        Xa = self.prepare_input(X)
        return np.where(Xa > 0, Xa, self.negative_slope * Xa)

    def backward(self, dY: Any) -> np.ndarray:
        return np.asarray(dY)

    def config(self) -> dict[str, Any]:
        return {"negative_slope": self.negative_slope}


@pytest.fixture(scope="module")
def slope_layer() -> str:
    name = f"cli_slope_{os.getpid()}"
    mod = types.ModuleType(f"cli_slope_plugin_{os.getpid()}")

    @nnrt.hookimpl
    def nnrt_register_layers(register: Any) -> None:
        register(name, _Slope)

    mod.nnrt_register_layers = nnrt_register_layers  # type: ignore[attr-defined]
    nnrt.register_plugin(mod)
    return name


def test_a_width_never_becomes_a_hyperparameter(slope_layer: str) -> None:
    layers = build_layers(f"dense:32,{slope_layer},dense:10", 5)
    assert [(type(la).__name__, la.in_features, la.out_features) for la in layers] == [
        ("Dense", 5, 32),
        ("_Slope", None, None),
        ("Dense", 32, 10),
    ]
    assert layers[1].negative_slope == 0.01  # the default, not 32
    layers = build_layers(f"dense:3,{slope_layer}:negative_slope=0.25", 4)
    assert layers[1].negative_slope == 0.25
    with pytest.raises(CLIError, match=r"entry 2 .*takes no width argument, got 32"):
        build_layers(f"dense:32,{slope_layer}:32,dense:10", 5)
    with pytest.raises(CLIError, match=r"'0.2' is neither a width .* nor KEY=VALUE"):
        build_layers(f"dense:32,{slope_layer}:0.2", 5)


def test_layers_grammar_builds_what_it_says() -> None:
    layers = build_layers("dense_nobias:16, batchnorm:momentum=0.25:eps=1e-3 ,sigmoid,dense:3", 7)
    assert [la.config() for la in layers] == [
        {"in_features": 7, "out_features": 16},
        {"num_features": 16, "momentum": 0.25, "eps": 1e-3},
        {},
        {"in_features": 16, "out_features": 3},
    ]
    # batchnorm:N is accepted when N is the width it keeps
    assert build_layers("dense:6,batchnorm:6", 2)[1].in_features == 6
    assert parse_layers("dense:10:flag=true:name=abc:x=none") == [
        ("dense", [10], {"flag": True, "name": "abc", "x": None})
    ]


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("batchnorm:momentum=x", ["entry 1", "batchnorm", "momentum='x'"]),
        ("dense:abc", ["entry 1", "'abc'", "positive integer", "KEY=VALUE"]),
        ("dense:0", ["entry 1", "'dense:0'", "positive integer", "got 0"]),
        ("dense:-3", ["entry 1", "'-3'", "positive integer"]),
        ("dense:2.5", ["entry 1", "'2.5'"]),
        ("dense", ["entry 1", "needs an output width", "dense:10"]),
        ("dense:4,sigmoid:4", ["entry 2", "sigmoid", "no width", "got 4"]),
        ("dense:4,batchnorm:5", ["entry 2", "keeps the width", "4", "batchnorm:5"]),
        ("dense:4:8", ["entry 1", "more than one width"]),
        ("dense:4,,sigmoid", ["entry 2 is empty"]),
        ("dense:4,:3", ["entry 2", "no layer name"]),
        ("dense:4:=3", ["entry 1", "KEY=VALUE"]),
        ("batchnorm:momentum=", ["entry 1", "momentum= has no value"]),
        ("batchnorm:eps=1:eps=2", ["entry 1", "eps is given twice"]),
        ("dense:4,warp_drive", ["entry 2", "unknown layer 'warp_drive'", "available:"]),
        ("batchnorm:momentum=2", ["entry 1", "batchnorm(", "momentum=2"]),
    ],
)
def test_layers_errors_name_the_entry_value_and_expectation(spec: str, needles: list[str]) -> None:
    with pytest.raises(CLIError) as info:
        build_layers(spec, 5)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_layers_error_through_the_command(blobs_npz: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "never.npz"
    proc = run("train", "--data", str(blobs_npz), "--layers", "dense:abc", "--out", str(out))
    _assert_one_line_error(proc, "'abc'", "positive integer")
    assert not out.exists()


def test_help_documents_the_grammar_and_the_data_format() -> None:
    proc = run("train", "--help")
    assert proc.returncode == 0
    for needle in ("NAME[:WIDTH][:KEY=VALUE]", ":momentum=0.2:eps=1e-3", ".npz", "named X",
                   "named y", ".csv", "last column"):  # fmt: skip
        assert needle in proc.stdout, needle
    proc = run("predict", "--help")
    assert proc.returncode == 0 and "named X" in proc.stdout


# ------------------------------------------------------------ command-line errors
def test_bad_flag_prints_the_subcommand_usage(blobs_npz: pathlib.Path) -> None:
    proc = run("train", "--data", str(blobs_npz), "--bogus")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: nnrt train"), proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1] == "nnrt train: error: unrecognized arguments: --bogus"
    )
    proc = run("predict", "m.npz", "d.npz", "--frob")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: nnrt predict")


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--epochs", "0", "positive integer"),
        ("--epochs", "-2", "positive integer"),
        ("--epochs", "ten", "'ten'"),
        ("--batch-size", "0", "positive integer"),
        ("--lr", "0", "positive"),
        ("--lr", "nan", "positive and finite"),
        ("--validation-split", "1.5", "(0, 1)"),
        ("--momentum", "-0.1", "[0, 1)"),
    ],
)
def test_bad_numbers_are_refused_before_training(
    blobs_npz: pathlib.Path, tmp_path: pathlib.Path, flag: str, value: str, needle: str
) -> None:
    out = tmp_path / "m.npz"
    proc = run("train", "--data", str(blobs_npz), flag, value, "--out", str(out))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nnrt train: error: argument " + flag) and needle in last, last
    assert "Traceback" not in proc.stderr and not out.exists()


def test_out_is_checked_before_training(blobs_npz: pathlib.Path, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "m.npz"
    proc = run("train", "--data", str(blobs_npz), "--out", str(missing), "--epochs", "50")
    _assert_one_line_error(proc, str(missing.parent), "does not exist")
    assert "trained" not in proc.stdout
    proc = run("train", "--data", str(blobs_npz), "--out", str(tmp_path))
    _assert_one_line_error(proc, "is a directory")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        proc = run("train", "--data", str(blobs_npz), "--out", str(ro / "m.npz"))
        _assert_one_line_error(proc, "cannot write")


def test_data_file_errors_are_truthful(tmp_path: pathlib.Path, model: pathlib.Path) -> None:
    text = tmp_path / "notes.npz"
    text.write_text("just some text\n")
    proc = run("train", "--data", str(text))
    _assert_one_line_error(proc, "notes.npz", "not an .npz file")
    assert "pickle" not in proc.stderr and "unsafe" not in proc.stderr
    proc = run("info", str(text))
    _assert_one_line_error(proc, "not an nnrt model file")
    assert "pickle" not in proc.stderr
    one_d = tmp_path / "flat.npz"
    np.savez(one_d, X=np.arange(10.0), y=np.arange(10))
    _assert_one_line_error(run("train", "--data", str(one_d)), "2-D", "(10,)")
    _assert_one_line_error(run("predict", str(model), str(one_d)), "2-D", "(10,)")
    short_y = tmp_path / "short.npz"
    np.savez(short_y, X=np.ones((10, 5)), y=np.arange(3))
    _assert_one_line_error(run("train", "--data", str(short_y)), "labels", "10 samples")
    strings = tmp_path / "strings.npz"
    np.savez(strings, X=np.array([["a", "b"], ["c", "d"]]), y=np.arange(2))
    _assert_one_line_error(run("train", "--data", str(strings)), "numbers", "<U1")
    objects = tmp_path / "objects.npz"
    np.savez(objects, X=np.array([[1, None]], dtype=object), y=np.arange(1))
    proc = run("train", "--data", str(objects))
    _assert_one_line_error(proc, "objects.npz", "Python objects")
    assert "allow_pickle" not in proc.stderr and "unsafely" not in proc.stderr


@pytest.mark.parametrize("content", ["", "\n\n", "a,b,c\n"], ids=["empty", "blank", "header"])
def test_empty_csv_is_a_clean_message(tmp_path: pathlib.Path, content: str) -> None:
    csv = tmp_path / "empty.csv"
    csv.write_text(content)
    proc = run("train", "--data", str(csv))
    _assert_one_line_error(proc, "empty.csv", "no data rows")
    assert "Warning" not in proc.stderr


def test_fifo_paths_do_not_hang(tmp_path: pathlib.Path, model: pathlib.Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    _assert_one_line_error(run("train", "--data", str(fifo)), "not a regular file")
    _assert_one_line_error(run("predict", str(fifo), str(fifo)), "model file", "regular file")
    _assert_one_line_error(run("predict", str(model), str(fifo)), "data file", "regular file")
    _assert_one_line_error(run("info", str(fifo)), "not a regular file")


def test_info_names_the_source_of_each_layer(model: pathlib.Path) -> None:
    proc = run("info", str(model))
    assert proc.returncode == 0, proc.stderr
    assert "(nnrt )" not in proc.stdout and "[nnrt (nnrt" not in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if re.match(r"\s+\d+\s", line)]
    assert rows[3].split()[1] == "dense" and rows[3].endswith("[nnrt]"), rows
    assert rows[1].endswith(f"[batchnorm (nnrt {nnrt.__version__})]"), rows


def _forged_model(model: pathlib.Path, path: pathlib.Path, **changes: Any) -> pathlib.Path:
    with np.load(model, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arch = json.loads(str(arrays["architecture"]))
    for key, value in changes.items():
        if key.startswith("layer_"):
            arch["layers"][1][key[len("layer_") :]] = value
        else:
            arch[key] = value
    arrays["architecture"] = np.array(json.dumps(arch))
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


EVIL = "\x1b[2J\x1b]0;pwned\x07\n  9  dense   123456  forged row\r\u202eevil\x9b"


def _no_controls(text: str) -> None:
    for ch in ("\x1b", "\x07", "\r", "\u202e", "\x9b"):
        assert ch not in text, repr(text)


def test_info_escapes_control_characters_from_the_file(
    model: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    forged = _forged_model(
        model, tmp_path / "forged.npz",
        nnrt_version=EVIL, layer_plugin=EVIL, layer_distribution=EVIL, layer_version=EVIL,
    )  # fmt: skip
    proc = run("info", str(forged))
    assert proc.returncode == 0, proc.stderr
    _no_controls(proc.stdout)
    assert "forged row" in proc.stdout  # shown, escaped, on the line it belongs to
    assert not any(line.lstrip().startswith("9  dense") for line in proc.stdout.splitlines())
    assert "\\x1b[2J" in proc.stdout and "\\n" in proc.stdout and "\\u202e" in proc.stdout


def test_errors_quoting_the_file_are_escaped(
    model: pathlib.Path, tmp_path: pathlib.Path, blobs_npz: pathlib.Path
) -> None:
    forged = _forged_model(model, tmp_path / "forged.npz", layer_name="bn" + EVIL)
    for proc in (run("predict", str(forged), str(blobs_npz)), run("info", str(forged))):
        if proc.returncode == 0:  # a reader that accepts the name must show it escaped
            _no_controls(proc.stdout)
            continue
        _assert_one_line_error(proc)
        _no_controls(proc.stderr)
    weird = tmp_path / ("data\x1b[31m\x07.npz")
    proc = run("train", "--data", str(weird))
    _assert_one_line_error(proc, "does not exist")
    _no_controls(proc.stderr)
    weird.write_bytes(blobs_npz.read_bytes())  # a real data file under that name
    proc = run("predict", str(model), str(weird), "--out", str(tmp_path / "p\x1b[2J.csv"))
    assert proc.returncode == 0, proc.stderr
    assert "accuracy against the labels" in proc.stderr and "predictions written" in proc.stderr
    _no_controls(proc.stderr)


def test_warnings_are_one_escaped_line(blobs_npz: pathlib.Path, tmp_path: pathlib.Path) -> None:
    proc = run(
        "train", "--data", str(blobs_npz), "--layers", "dense:4,batchnorm,dense:3",
        "--epochs", "1", "--out", str(tmp_path / "m.npz"), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "nnrt: warning: BiasBeforeBatchNormWarning: layer 0"
    ), lines


def test_plugin_metadata_and_errors_are_escaped(tmp_path: pathlib.Path) -> None:
    """An installed plugin's name, version and import error reach `nnrt plugins` and
    `nnrt info` escaped."""
    info = tmp_path / "evil_meta-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: evil-meta\nVersion: 1.0\x1b[5m\x07\n"
    )
    (info / "entry_points.txt").write_text("[nnrt]\nevil_meta = nnrt_evil_meta_mod\n")
    (tmp_path / "nnrt_evil_meta_mod.py").write_text(
        "raise ImportError('broken\\x1b]0;owned\\x07\\n  fake  row')\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("NNRT_DISABLE_PLUGINS", None)
    for args in (["plugins"], ["info"], ["info", "--json"]):
        proc = subprocess.run(
            [sys.executable, "-m", "nnrt", *args], capture_output=True, text=True, env=env,
            timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        _no_controls(proc.stdout)
        _no_controls(proc.stderr)
        assert "evil_meta" in proc.stdout, proc.stdout
        assert not any(line.strip().startswith("fake  row") for line in proc.stdout.splitlines())
        warning = [line for line in proc.stderr.splitlines() if "evil_meta" in line]
        assert len(warning) == 1 and warning[0].startswith("nnrt: warning: PluginWarning:")


def test_plot_path_is_checked_before_training(
    blobs_npz: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    pytest.importorskip("matplotlib")
    bad = tmp_path / "missing" / "curve.png"
    proc = run("train", "--data", str(blobs_npz), "--out", str(tmp_path / "m.npz"),
               "--plot", str(bad), "--no-progress")  # fmt: skip
    _assert_one_line_error(proc, "--plot", "does not exist")
    assert "trained" not in proc.stdout and not (tmp_path / "m.npz").exists()


def test_plugins_lists_what_was_refused(tmp_path: pathlib.Path) -> None:
    """An installed entry point named like a built-in plugin is refused and listed so."""
    info = tmp_path / "impostor-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: impostor\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[nnrt]\nbatchnorm = nnrt_impostor_mod\n")
    (tmp_path / "nnrt_impostor_mod.py").write_text("raise RuntimeError('must never be imported')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    env.pop("NNRT_DISABLE_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "nnrt", "plugins"], capture_output=True, text=True, env=env,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("batchnorm ")]
    assert len(rows) == 2, proc.stdout
    assert "nnrt_plugins.batchnorm" in rows[0] and " ok " in rows[0]
    assert "impostor 1.0" in rows[1] and "refused: plugin name 'batchnorm' taken" in rows[1]
    assert "must never be imported" not in proc.stdout + proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "impostor" in line]
    assert len(warning) == 1 and warning[0].startswith("nnrt: warning: PluginWarning:")
