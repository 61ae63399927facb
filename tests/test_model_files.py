"""Model files are data, never code: hostile ``.npz`` files fail with a clear error.

``nnrt.load`` must never unpickle, never import a module named by the file,
and never allocate what a forged header or size field claims. Each case here
builds a hostile file by hand and checks the error (``ModelFileError``, a
ValueError naming the file; ``MissingPluginError`` for layer names nothing
provides), that no pickle was run, that ``sys.modules`` did not change, and
(tracemalloc / an address-space limit in a child process) that nothing big
was allocated.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.io import MissingPluginError, ModelFileError

MB = 2**20


def _net() -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 5, 7),
            nnrt.layer("batchnorm", 7),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 7, 3),
        ],
        seed=1,
        dtype="float32",
    )


def _parts(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arch = json.loads(str(arrays.pop("architecture")))
    return arch, arrays


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _members(arch: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, bytes]:
    out = {"architecture.npy": _npy(np.array(json.dumps(arch)))}
    out.update({f"{k}.npy": _npy(v) for k, v in arrays.items()})
    return out


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.npz"
    _net().save(path)
    nnrt.load(path)  # warm up: later loads import nothing new
    return path


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any unpickling during the test fails it."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nnrt.load unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


class _Marker:
    """Unpickling this sets ``builtins._nnrt_pickle_ran`` (runs code)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("import builtins; builtins._nnrt_pickle_ran = True",))


class _Bomb:
    """Unpickling this allocates 2**40 bytes."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (bytearray, (2**40,))


def _load_fails(
    path: Path, exc: type[BaseException] = ModelFileError, match: str | None = None
) -> str:
    before = set(sys.modules)
    tracemalloc.start()
    try:
        with pytest.raises(exc, match=match) as info:
            nnrt.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * MB, f"load allocated {peak / MB:.0f} MB before failing"
    new = set(sys.modules) - before
    assert not new, f"load imported {sorted(new)}"
    import builtins

    assert not hasattr(builtins, "_nnrt_pickle_ran"), "a pickle in the file was executed"
    return str(info.value)


# ------------------------------------------------------------------ pickles
def test_a_valid_file_loads_without_unpickling(saved: Path, no_pickle: None) -> None:
    net = nnrt.load(saved)
    X = np.random.default_rng(0).normal(size=(4, 5))
    np.testing.assert_array_equal(net.predict(X), _net().predict(X))


@pytest.mark.parametrize("where", ["3.bias", "architecture"])
@pytest.mark.parametrize("payload", [_Marker, _Bomb])
def test_object_arrays_and_pickle_payloads_are_refused(
    saved: Path, no_pickle: None, where: str, payload: type
) -> None:
    arch, arrays = _parts(saved)
    members = _members(arch, arrays)
    members[f"{where}.npy"] = _npy(np.array([payload(), payload()], dtype=object))
    _write_zip(saved, members)
    msg = _load_fails(saved)
    assert str(saved) in msg and where in msg


def test_raw_pickle_instead_of_npy_is_refused(saved: Path, no_pickle: None) -> None:
    arch, arrays = _parts(saved)
    members = _members(arch, arrays)
    members["0.weight.npy"] = pickle.dumps(_Marker())
    _write_zip(saved, members)
    _load_fails(saved, match="0.weight")
    _write_zip(saved, {"architecture.npy": pickle.dumps(_Marker())})
    _load_fails(saved)


# ------------------------------------------------------- names in the JSON
@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "subprocess:Popen",
        "builtins.eval",
        "nnrt.io.save",
        "nnrt_plugins._sigmoid.Sigmoid",
        "antigravity",
        "__import__",
        "../../etc/passwd",
    ],
)
def test_layer_name_that_is_a_python_path_imports_nothing(saved: Path, name: str) -> None:
    arch, arrays = _parts(saved)
    arch["layers"][2].update(
        name=name, plugin="evil_plugin_module", distribution="evil-dist", config={}
    )
    _write_zip(saved, _members(arch, arrays))
    msg = _load_fails(saved, MissingPluginError)
    assert name in msg and "layer 2" in msg and "evil_plugin_module" in msg
    assert "evil_plugin_module" not in sys.modules and "antigravity" not in sys.modules


def test_plugin_field_is_never_imported(saved: Path) -> None:
    arch, arrays = _parts(saved)
    for spec in arch["layers"]:
        spec.update(plugin="antigravity", distribution="antigravity")
    _write_zip(saved, _members(arch, arrays))
    before = set(sys.modules)
    nnrt.load(saved)  # the layer names are real: it loads, and imports nothing
    assert set(sys.modules) == before


@pytest.mark.parametrize(
    "config",
    [
        {"in_features": "__import__('os').system('true')", "out_features": 3},
        {"in_features": 7, "out_features": 3, "__class__": "os.system"},
        {"in_features": {"py/object": "os.system"}, "out_features": 3},
        {"in_features": -7, "out_features": 3},
        {"in_features": 7.0, "out_features": 3},
        {"in_features": True, "out_features": 3},
    ],
)
def test_hostile_layer_configs_are_refused(saved: Path, config: dict[str, Any]) -> None:
    arch, arrays = _parts(saved)
    arch["layers"][3]["config"] = config
    _write_zip(saved, _members(arch, arrays))
    msg = _load_fails(saved, match="layer 3")
    assert str(saved) in msg


# ------------------------------------------------------------------ sizes
def test_header_declaring_10_to_the_12_elements(saved: Path) -> None:
    arch, arrays = _parts(saved)
    arch["layers"][0]["params"]["weight"] = [10**6, 10**6]
    arch["layers"][0]["config"] = {"in_features": 10**6, "out_features": 10**6}
    members = _members(arch, arrays)
    members["0.weight.npy"] = _npy_header((10**6, 10**6)) + b"\0" * 64
    _write_zip(saved, members)
    msg = _load_fails(saved, match="0.weight")
    assert "1000000" in msg


def test_json_declaring_a_huge_shape_over_small_arrays(saved: Path) -> None:
    arch, arrays = _parts(saved)
    arch["layers"][0]["params"]["weight"] = [10**6, 10**6]
    arch["layers"][0]["config"] = {"in_features": 10**6, "out_features": 10**6}
    _write_zip(saved, _members(arch, arrays))
    _load_fails(saved, match="0.weight")


def test_config_asking_for_a_huge_layer_over_small_arrays(saved: Path) -> None:
    arch, arrays = _parts(saved)
    arch["layers"][1]["config"]["num_features"] = 10**9
    _write_zip(saved, _members(arch, arrays))
    _load_fails(saved, match="layer 1")


def test_header_shape_larger_than_its_data(saved: Path) -> None:
    arch, arrays = _parts(saved)
    arch["layers"][3]["params"]["weight"] = [7, 3000]
    arch["layers"][3]["params"]["bias"] = [3000]
    arch["layers"][3]["config"] = {"in_features": 7, "out_features": 3000}
    members = _members(arch, arrays)
    members["3.weight.npy"] = _npy_header((7, 3000), "<f4") + b"\0" * 84
    members["3.bias.npy"] = _npy_header((3000,), "<f4") + b"\0" * 12
    _write_zip(saved, members)
    _load_fails(saved, match="3.weight|3.bias")


def _forge_central_sizes(path: Path, member: str, size: int) -> None:
    """Rewrite the central-directory sizes of ``member`` (stored) to ``size`` bytes."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    pos = 0
    while True:
        pos = data.find(b"PK\x01\x02", pos)
        assert pos >= 0, member
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + name_len]) == name:
            struct.pack_into("<II", data, pos + 20, size, size)  # compressed, uncompressed
            break
        pos += 4
    path.write_bytes(bytes(data))


_FORGED_LOAD = textwrap.dedent(
    """
    import resource, sys, tracemalloc
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # never swap the host
    import nnrt
    tracemalloc.start()
    try:
        nnrt.load(sys.argv[1])
    except Exception as exc:
        print(type(exc).__name__, "|", exc)
    else:
        print("LOADED |")
    print("PEAK", tracemalloc.get_traced_memory()[1])
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and zip forging: Linux")
def test_forged_zip_sizes_do_not_make_load_allocate(saved: Path) -> None:
    """A zip directory claiming 4 GB for a 100-byte member must not make load build a 4 GB layer."""
    arch, _ = _parts(saved)
    n_in, n_out = 20000, 25000  # 5e8 float64 elements: 4.0e9 bytes, under the 2**31 limit
    widths = {
        0: {"in_features": n_in, "out_features": n_out},
        3: {"in_features": n_out, "out_features": 3},
    }
    for i, cfg in widths.items():
        arch["layers"][i]["config"] = cfg
    arch["layers"][1]["config"]["num_features"] = n_out
    arch["dtype"] = "float64"
    arrays = {
        "1.gamma": np.ones(n_out),
        "1.beta": np.zeros(n_out),
        "1.running_mean": np.zeros(n_out),
        "1.running_var": np.ones(n_out),
        "3.weight": np.zeros((n_out, 3)),
        "3.bias": np.zeros(3),
    }
    for i, spec in enumerate(arch["layers"]):
        for group in ("params", "buffers"):
            spec[group] = {
                k.split(".", 1)[1]: list(v.shape)
                for k, v in arrays.items()
                if k.startswith(f"{i}.")
                and (k.split(".", 1)[1] in ("running_mean", "running_var")) == (group == "buffers")
            }
    arch["layers"][0]["params"] = {"weight": [n_in, n_out]}
    members = _members(arch, arrays)
    header = _npy_header((n_in, n_out))
    members["0.weight.npy"] = header + b"\0" * 96
    _write_zip(saved, members)
    _forge_central_sizes(saved, "0.weight.npy", len(header) + n_in * n_out * 8)
    out = subprocess.run(
        [sys.executable, "-c", _FORGED_LOAD, str(saved)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first, peak_line = out.stdout.strip().splitlines()[-2:]
    kind, _, msg = first.partition(" | ")
    peak = int(peak_line.split()[1])
    assert kind == "ModelFileError", first
    assert "MemoryError" not in msg, f"load tried to allocate what the zip claims: {msg}"
    assert peak < 50 * MB, f"load allocated {peak / MB:.0f} MB"


# ------------------------------------------------------- truncation, junk
def test_every_truncation_point_gives_a_model_file_error(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    bad = tmp_path / "cut.npz"
    cuts = sorted({0, 1, 3, 4, 22, *range(0, len(data), max(1, len(data) // 97)), len(data) - 1})
    for cut in cuts:
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="cut.npz"):
            nnrt.load(bad)


def test_junk_appended_or_prepended(saved: Path, tmp_path: Path) -> None:
    data = saved.read_bytes()
    bad = tmp_path / "junk.npz"
    for blob in (data + b"\0" * 1000, os.urandom(64) + data, data[: len(data) // 2] + data):
        bad.write_bytes(blob)
        try:
            net = nnrt.load(bad)
        except ModelFileError:
            continue
        # zip readers tolerate some junk; if it loads, it must be the same network
        ref = nnrt.load(saved)
        for k, v in ref.state_dict().items():
            np.testing.assert_array_equal(net.state_dict()[k], v)


def test_non_zip_and_directory_and_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.npz"):
        nnrt.load(empty)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ModelFileError, match="junk.npz"):
        nnrt.load(junk)
    with pytest.raises((IsADirectoryError, PermissionError, ModelFileError)):
        nnrt.load(tmp_path)
