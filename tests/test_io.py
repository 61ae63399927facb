"""save / load: round trip, file layout, atomicity (kill -9), and every kind of bad file."""

from __future__ import annotations

import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.io import MissingPluginError, ModelFileError


def _trained(dtype: str, seed: int = 0) -> tuple[nnrt.Sequential, np.ndarray]:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(64, 6))
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1)
    net = nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 6, 12),
            nnrt.layer("batchnorm", 12, momentum=0.3),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 12, 3),
        ],
        seed=seed,
        dtype=dtype,
    )
    net.fit(X, y, epochs=3, batch_size=16, progress=False)
    return net, X


def _rewrite(path: pathlib.Path, arch_edit: Any = None, arrays_edit: Any = None) -> None:
    """Rewrite a saved model with an edited architecture and/or arrays (test helper)."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arch = json.loads(str(arrays.pop("architecture")))
    if arch_edit:
        arch_edit(arch)
    if arrays_edit:
        arrays_edit(arrays)
    np.savez(path, architecture=np.array(json.dumps(arch)), **arrays)


# ----------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip_identical_predictions(tmp_path: pathlib.Path, dtype: str) -> None:
    net, X = _trained(dtype)
    path = tmp_path / "model.weights"  # no .npz suffix: written exactly here
    net.save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.weights"]
    loaded = nnrt.load(str(path))
    assert loaded.dtype == np.dtype(dtype)
    assert [type(a) for a in loaded.layers] == [type(b) for b in net.layers]
    assert [a.config() for a in loaded.layers] == [b.config() for b in net.layers]
    a, b = net.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert np.array_equal(net.predict(X), loaded.predict(X))
    # running statistics were trained (not the defaults) and survived
    assert not np.allclose(b["1.running_var"], 1.0)


def test_file_layout_is_npz_with_json_architecture(tmp_path: pathlib.Path) -> None:
    net, _ = _trained("float32")
    path = tmp_path / "m.npz"
    net.save(path)
    with zipfile.ZipFile(path) as zf:
        assert "architecture.npy" in zf.namelist()
    with np.load(path, allow_pickle=False) as data:
        arch_arr = data["architecture"]
        assert arch_arr.shape == () and arch_arr.dtype.kind == "U"
        arch = json.loads(str(arch_arr))
        assert set(data.files) == {"architecture"} | set(net.state_dict())
        np.testing.assert_array_equal(data["3.bias"], net.state_dict()["3.bias"])
    assert arch["nnrt_version"] == nnrt.__version__
    assert arch["abi_version"] == nnrt.ABI_VERSION
    assert isinstance(arch["format_version"], int) and arch["dtype"] == "float32"
    names = [spec["name"] for spec in arch["layers"]]
    assert names == ["dense_nobias", "batchnorm", "sigmoid", "dense"]
    bn = arch["layers"][1]
    assert bn["config"] == {"num_features": 12, "momentum": 0.3, "eps": 1e-5}
    assert bn["plugin"] == "batchnorm" and bn["distribution"] == "nnrt"
    assert bn["buffers"] == {"running_mean": [12], "running_var": [12]}


def test_save_replaces_existing_file_and_leaves_no_temp(tmp_path: pathlib.Path) -> None:
    net, X = _trained("float64")
    other, _ = _trained("float64", seed=9)
    path = tmp_path / "m.npz"
    other.save(path)
    net.save(path)
    assert os.listdir(tmp_path) == ["m.npz"]
    assert np.array_equal(nnrt.load(path).predict(X), net.predict(X))


def test_loading_does_not_repeat_the_network_warning(tmp_path: pathlib.Path) -> None:
    with pytest.warns(nnrt.BiasBeforeBatchNormWarning):
        net = nnrt.Sequential([nnrt.layer("dense", 3, 4), nnrt.layer("batchnorm", 4)])
    net.save(tmp_path / "m.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nnrt.load(tmp_path / "m.npz")


# ----------------------------------------------------------- missing plugins
def test_unknown_layer_names_the_plugin_and_distribution(tmp_path: pathlib.Path) -> None:
    net, _ = _trained("float32")
    path = tmp_path / "m.npz"
    net.save(path)

    def edit(arch: dict[str, Any]) -> None:
        arch["layers"][2].update(
            name="swish", plugin="fancy_acts", distribution="nnrt-fancy-acts", version="2.1"
        )

    _rewrite(path, edit)
    with pytest.raises(MissingPluginError) as info:
        nnrt.load(path)
    msg = str(info.value)
    assert "'swish'" in msg and "fancy_acts" in msg and "nnrt-fancy-acts" in msg
    assert "pip install nnrt-fancy-acts" in msg and "layer 2" in msg


def test_layer_from_runtime_plugin_missing_in_a_fresh_process(tmp_path: pathlib.Path) -> None:
    """A file written with a run-time plugin, loaded where that plugin is absent."""
    script = textwrap.dedent(
        """
        import sys, numpy as np, nnrt

        class Scale(nnrt.Layer):
            def __init__(self, factor=2.0):
                super().__init__()
                self.factor = float(factor)
            def forward(self, X, training=False):
                return np.ascontiguousarray(X, dtype=self.dtype) * self.factor
            def backward(self, dY):
                return dY * self.factor
            def config(self):
                return {"factor": self.factor}

        class ScalePlugin:
            @nnrt.hookimpl
            def nnrt_register_layers(self, register):
                register("scale_by", Scale)

        nnrt.register_plugin(ScalePlugin(), name="scaler_plugin")
        net = nnrt.Sequential([nnrt.layer("dense", 2, 2), nnrt.layer("scale_by", 3.0)])
        net.save(sys.argv[1])
        """
    )
    path = tmp_path / "m.npz"
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=60)
    with pytest.raises(MissingPluginError, match="scale_by.*scaler_plugin"):
        nnrt.load(path)


# ----------------------------------------------------------- bad files
def test_truncated_files_give_a_clear_error(tmp_path: pathlib.Path) -> None:
    net, _ = _trained("float32")
    path = tmp_path / "m.npz"
    net.save(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.npz"
    for cut in (0, 10, 100, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="bad.npz"):
            nnrt.load(bad)


def test_corrupted_bytes_give_a_clear_error(tmp_path: pathlib.Path) -> None:
    net, _ = _trained("float64")
    path = tmp_path / "m.npz"
    net.save(path)
    data = path.read_bytes()
    rng = random.Random(0)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(path) as zf:
        # the data of every member: flipping a byte there must be caught (CRC, header)
        offsets = []
        for info in zf.infolist():
            local = data[info.header_offset : info.header_offset + 30]
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            offsets.append(start + rng.randrange(info.compress_size))
            offsets.append(start + 10)  # the .npy header text
    for off in offsets:
        corrupt = bytearray(data)
        corrupt[off] ^= 0x5A
        bad.write_bytes(bytes(corrupt))
        with pytest.raises(ModelFileError):
            nnrt.load(bad)


def test_not_a_model_file(tmp_path: pathlib.Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, world\n")
    with pytest.raises(ModelFileError, match="notes.txt"):
        nnrt.load(text)
    plain = tmp_path / "plain.npz"
    np.savez(plain, X=np.zeros((3, 2)))
    with pytest.raises(ModelFileError, match="architecture"):
        nnrt.load(plain)
    single = tmp_path / "one.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ModelFileError, match="single"):
        nnrt.load(single)
    with pytest.raises(FileNotFoundError):
        nnrt.load(tmp_path / "missing.npz")


class _Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_object_arrays_are_refused_and_never_unpickled(tmp_path: pathlib.Path) -> None:
    net, _ = _trained("float32")
    path = tmp_path / "m.npz"
    net.save(path)
    marker = tmp_path / "pwned"
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["3.bias"] = np.array([_Boom(str(marker))] * 3, dtype=object)
    np.savez(path, **arrays)  # numpy pickles the object array
    with pytest.raises(ModelFileError, match="object"):
        nnrt.load(path)
    assert not marker.exists()
    # an object array as the architecture entry itself
    arrays["architecture"] = np.array({"format": "x"}, dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(ModelFileError):
        nnrt.load(path)
    assert not marker.exists()


def test_mismatched_shapes_and_missing_arrays(tmp_path: pathlib.Path) -> None:
    net, _ = _trained("float32")
    path = tmp_path / "m.npz"
    net.save(path)
    _rewrite(path, arrays_edit=lambda a: a.update({"0.weight": np.zeros((6, 11), np.float32)}))
    with pytest.raises(ModelFileError, match=r"'0.weight'.*\(6, 11\).*\(6, 12\)"):
        nnrt.load(path)
    net.save(path)
    _rewrite(path, arrays_edit=lambda a: a.pop("1.running_var"))
    with pytest.raises(ModelFileError, match="missing.*1.running_var"):
        nnrt.load(path)
    net.save(path)
    # declared shapes and arrays agree, but the layer's config contradicts them

    def bad_config(arch: dict[str, Any]) -> None:
        arch["layers"][3]["config"]["out_features"] = 4

    _rewrite(path, bad_config)
    with pytest.raises(ModelFileError, match="layer 3"):
        nnrt.load(path)


def test_absurd_sizes_are_rejected_before_allocating(tmp_path: pathlib.Path) -> None:
    net, _ = _trained("float32")
    path = tmp_path / "m.npz"
    net.save(path)

    # a config asking for a 2**40 x 2**40 weight matrix, with small stored arrays
    def huge_config(arch: dict[str, Any]) -> None:
        arch["layers"][0]["config"] = {"in_features": 2**40, "out_features": 2**40}

    _rewrite(path, huge_config)
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError, match="in_features"):
        nnrt.load(path)
    assert time.perf_counter() - t0 < 5

    # a forged .npy header declaring a huge shape over a few bytes of data
    net.save(path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arch = json.loads(str(arrays["architecture"]))
    arch["layers"][3]["params"]["bias"] = [2**45]
    arrays["architecture"] = np.array(json.dumps(arch))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (2**45,)}
    )
    forged = buf.getvalue() + b"\0" * 12
    with zipfile.ZipFile(path, "w") as zf:
        for key, arr in arrays.items():
            if key == "3.bias":
                zf.writestr("3.bias.npy", forged)
            else:
                member = io.BytesIO()
                np.save(member, arr)
                zf.writestr(f"{key}.npy", member.getvalue())
    with pytest.raises(ModelFileError, match=r"3.bias.*shape"):
        nnrt.load(path)


def test_newer_format_version_asks_for_an_upgrade(tmp_path: pathlib.Path) -> None:
    net, _ = _trained("float32")
    path = tmp_path / "m.npz"
    net.save(path)
    _rewrite(path, lambda a: a.update(format_version=99, nnrt_version="9.0"))
    with pytest.raises(ModelFileError, match="upgrade nnrt"):
        nnrt.load(path)


def test_unregistered_layer_cannot_be_saved(tmp_path: pathlib.Path) -> None:
    class Local(nnrt.Layer):
        def __init__(self) -> None:
            super().__init__()

        def forward(self, X: Any, training: bool = False) -> Any:
            return X

        def backward(self, dY: Any) -> Any:
            return dY

    net = nnrt.Sequential([nnrt.layer("dense", 2, 2), Local()])
    with pytest.raises(ValueError, match="not a registered layer"):
        net.save(tmp_path / "m.npz")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------- atomicity
_SAVER = textwrap.dedent(
    """
    import sys, numpy as np, nnrt
    net = nnrt.Sequential([nnrt.layer("dense", 1000, 1000), nnrt.layer("dense", 1000, 500)],
                          seed=0, dtype="float64")
    params = list(net.params().values())
    k = int(sys.argv[2])
    while True:
        for p in params:
            p.fill(k)          # every array of version k holds the value k
        net.save(sys.argv[1])
        print(k, flush=True)
        k += 1
    """
)


@pytest.mark.slow
def test_kill_9_during_save_leaves_a_loadable_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "big.npz"
    rng = random.Random(1234)
    start = 0
    for _round in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # one complete save has happened
            assert first.strip() == str(start), first
            time.sleep(rng.uniform(0.01, 0.6))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        net = nnrt.load(path)
        values = {float(v) for p in net.params().values() for v in np.unique(p)}
        assert len(values) == 1, values  # one consistent version, not a mix
        version = int(values.pop())
        assert version >= start
        start = version + 1000  # the next round writes clearly different content
    # temporary files of killed saves are hidden (dot-prefixed) and never the target
    for name in os.listdir(tmp_path):
        assert name == "big.npz" or (name.startswith(".big.npz.") and name.endswith(".tmp"))
