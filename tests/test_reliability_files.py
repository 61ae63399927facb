"""Regression tests: model files (issue 12, "Model files"; docs/reliability.md §3).

Each reproducer of the issue, and more of its kind:

* numpy's npz reader returns a raw member ``0.weight`` in preference to
  ``0.weight.npy`` (only the ``.npy`` one used to be checked): a 130 KB file made
  ``load`` allocate and fill 128 MB. Every member is now checked whatever its
  spelling; a shadow, duplicate or unknown member is refused before anything is
  allocated (measured with tracemalloc in a child process).
* a FIFO (or a device) given as a model or data path hung ``load``, ``nnrt
  predict``, ``nnrt info`` and ``nnrt train`` forever: only regular files are
  opened (child process with a timeout).
* JSON nested 5,000 deep gave RecursionError; one corrupt byte in the zip
  directory gave NotImplementedError / RuntimeError("password required"):
  both are ``ModelFileError`` now (every byte of the directory is flipped).
* ``"momentum": "0.5"``, ``"eps": "1e-5"``, ``eps: Infinity`` and a negative
  ``running_var`` loaded: all refused (eps > 0 finite, 0 <= momentum <= 1,
  running_var >= 0 and finite).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nnrt
from nnrt.io import ModelFileError, NotARegularFileError, open_regular_file

MB = 2**20
HANG_TIMEOUT = 60  # seconds: a case that takes this long is hanging


def _net(dtype: str = "float32") -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 5, 7),
            nnrt.layer("batchnorm", 7),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 7, 3),
        ],
        seed=1,
        dtype=dtype,
    )


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _parts(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with zipfile.ZipFile(path) as zf:
        arrays = {
            n[: -len(".npy")]: np.lib.format.read_array(io.BytesIO(zf.read(n)))
            for n in zf.namelist()
        }
    arch = json.loads(str(arrays.pop("architecture")))
    return arch, arrays


def _write(
    path: Path,
    arch: dict[str, Any] | str,
    arrays: dict[str, np.ndarray],
    extra: list[tuple[str, bytes, int]] = (),  # type: ignore[assignment]
) -> Path:
    text = arch if isinstance(arch, str) else json.dumps(arch)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("architecture.npy", _npy(np.array(text)))
        for key, arr in arrays.items():
            zf.writestr(f"{key}.npy", _npy(arr))
        for name, data, method in extra:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)
    return path


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "model.npz"
    net = _net()
    rng = np.random.default_rng(0)
    net.fit(rng.normal(size=(64, 5)), rng.integers(0, 3, 64), epochs=1, progress=False)
    net.save(path)
    return path


def _run_child(code: str, timeout: float = HANG_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; a hang fails the test (the child is killed)."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the child process hung (killed after {timeout} s)") from exc


# ----------------------------------------------------- members, whatever their spelling
def _bomb_member(rows: int = 4096, cols: int = 4096) -> bytes:
    """A .npy of rows x cols float64 zeros (128 MB for 4096 x 4096), compressible to ~130 KB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (rows, cols)}
    )
    return header.getvalue() + bytes(rows * cols * 8)


def test_raw_member_shadowing_the_npy_one_is_refused_without_allocating(
    saved: Path, tmp_path: Path
) -> None:
    # the issue's reproducer: numpy's NpzFile returns the raw "0.weight" member in
    # preference to "0.weight.npy"; it is deflated (a 130 KB file for 128 MB)
    arch, arrays = _parts(saved)
    bad = _write(
        tmp_path / "shadow.npz",
        arch,
        arrays,
        extra=[("0.weight", _bomb_member(), zipfile.ZIP_DEFLATED)],
    )
    assert bad.stat().st_size < 300_000
    out = _run_child(
        f"""
        import tracemalloc, nnrt
        from nnrt.io import ModelFileError
        tracemalloc.start()
        try:
            nnrt.load({str(bad)!r})
        except ModelFileError as exc:
            print("ModelFileError |", exc)
        else:
            print("loaded")
        print("peak", tracemalloc.get_traced_memory()[1])
        """
    )
    assert out.returncode == 0, out.stderr
    first, peak_line = out.stdout.strip().splitlines()[-2:]
    assert first.startswith("ModelFileError"), out.stdout
    assert "'0.weight'" in first, first
    assert int(peak_line.split()[1]) < 20 * MB, peak_line


@pytest.mark.parametrize(
    "name",
    [
        "0.weight",  # raw shadow of 0.weight.npy
        "architecture",  # raw shadow of architecture.npy
        "0.weight.npy.npy",
        "0.WEIGHT.npy",
        "0.weight.NPY",
        "./0.weight.npy",
        "/0.weight.npy",
        "0.weight.npy/",
        "dir/",
        "9.weight.npy",  # a layer that does not exist
        "0.bogus.npy",
        "readme.txt",
    ],
)
def test_unknown_or_shadowing_members_are_refused(saved: Path, tmp_path: Path, name: str) -> None:
    arch, arrays = _parts(saved)
    member = _npy(np.full((5, 7), 1e6, dtype=np.float32))
    bad = _write(tmp_path / "extra.npz", arch, arrays, extra=[(name, member, zipfile.ZIP_STORED)])
    with pytest.raises(ModelFileError, match="extra.npz"):
        nnrt.load(bad)
    # the architecture alone is read strictly too (nnrt info)
    with pytest.raises(ModelFileError):
        nnrt.io.read_architecture(bad)


def test_duplicate_members_are_refused(saved: Path, tmp_path: Path) -> None:
    arch, arrays = _parts(saved)
    evil = _npy(np.full((5, 7), 1e6, dtype=np.float32))
    bad = tmp_path / "dup.npz"
    with pytest.warns(UserWarning, match="Duplicate name"):
        _write(bad, arch, arrays, extra=[("0.weight.npy", evil, zipfile.ZIP_STORED)])
    with pytest.raises(ModelFileError, match="twice"):
        nnrt.load(bad)


def test_a_member_name_with_a_nul_byte_is_refused(saved: Path, tmp_path: Path) -> None:
    # zipfile cuts a name at NUL: "0.weight.npy\0x" would read as 0.weight.npy
    data = bytearray(saved.read_bytes())
    name = b"0.weight.npy"
    # the central directory's copy of the name (the last occurrence)
    at = data.rindex(name)
    data[at + len(name) - 1 : at + len(name)] = b"\0"  # "0.weight.np\0"
    bad = tmp_path / "nul.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError):
        nnrt.load(bad)


def test_overlapping_members_are_refused(saved: Path, tmp_path: Path) -> None:
    # two directory entries pointing at the same bytes would let a small file be
    # read as many arrays; here "3.bias" is made to point at "1.beta"'s data
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        cd_offset = zf.start_dir  # type: ignore[attr-defined]
    a, b = infos["1.beta.npy"], infos["1.gamma.npy"]
    assert a.file_size == b.file_size
    # rewrite b's central-directory offset (bytes 42..46 of its entry) to a's
    pos = cd_offset
    while True:
        nlen = int.from_bytes(data[pos + 28 : pos + 30], "little")
        elen = int.from_bytes(data[pos + 30 : pos + 32], "little")
        clen = int.from_bytes(data[pos + 32 : pos + 34], "little")
        if data[pos + 46 : pos + 46 + nlen] == b"1.gamma.npy":
            data[pos + 42 : pos + 46] = a.header_offset.to_bytes(4, "little")
            break
        pos += 46 + nlen + elen + clen
    bad = tmp_path / "overlap.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="overlap|differ|corrupt"):
        nnrt.load(bad)


# ----------------------------------------------------- FIFOs and devices never block
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_as_model_path_raises_instead_of_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    out = _run_child(
        f"""
        import nnrt, nnrt.io
        for fn in (nnrt.load, nnrt.io.read_architecture):
            try:
                fn({str(fifo)!r})
            except nnrt.io.ModelFileError as exc:
                print("ModelFileError |", exc)
        """
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all("FIFO" in line for line in lines), out.stdout


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_as_model_path_raises(tmp_path: Path) -> None:
    out = _run_child(
        """
        import nnrt
        from nnrt.io import ModelFileError
        try:
            nnrt.load("/dev/zero")
        except ModelFileError as exc:
            print("ModelFileError |", exc)
        """
    )
    assert out.returncode == 0, out.stderr
    assert "character device" in out.stdout, out.stdout


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
@pytest.mark.parametrize("command", ["predict-model", "predict-data", "info", "train-data"])
def test_cli_with_a_fifo_path_exits_with_one_line_instead_of_hanging(
    saved: Path, tmp_path: Path, command: str
) -> None:
    fifo = tmp_path / "pipe.npz"
    os.mkfifo(fifo)
    data = tmp_path / "d.npz"
    np.savez(data, X=np.zeros((4, 5)), y=np.array([0, 1, 2, 0]))
    argv = {
        "predict-model": ["predict", str(fifo), str(data)],
        "predict-data": ["predict", str(saved), str(fifo)],
        "info": ["info", str(fifo)],
        "train-data": ["train", "--data", str(fifo), "--out", str(tmp_path / "o.npz")],
    }[command]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "nnrt", *argv],
            capture_output=True,
            text=True,
            timeout=HANG_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"nnrt {' '.join(argv)} hung on a FIFO") from exc
    assert out.returncode != 0
    err = out.stderr.strip()
    assert "FIFO" in err and "Traceback" not in err, err


def test_open_regular_file_refuses_directories_and_reads_regular_files(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc")
    with open_regular_file(f) as fh:
        assert fh.read() == b"abc"
    with pytest.raises(NotARegularFileError, match="directory"):
        open_regular_file(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_regular_file(tmp_path / "missing")
    link = tmp_path / "link.bin"
    link.symlink_to(f)
    with open_regular_file(link) as fh:  # a symlink to a regular file is fine
        assert fh.read() == b"abc"


# ----------------------------------------------------- architecture JSON
def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [40, 5_000, 100_000])
def test_deeply_nested_json_is_a_model_file_error(saved: Path, tmp_path: Path, depth: int) -> None:
    arch, arrays = _parts(saved)
    text = json.dumps(arch)
    # nest inside a config value, where a plugin's arguments live
    deep = "[" * depth + "1" + "]" * depth
    text = text.replace('"momentum": 0.1', f'"momentum": 0.1, "deep": {deep}', 1)
    assert '"deep"' in text
    bad = _write(tmp_path / "deep.npz", text, arrays)
    with pytest.raises(ModelFileError, match="nested"):
        nnrt.load(bad)


def test_moderate_nesting_inside_strings_is_not_counted(saved: Path, tmp_path: Path) -> None:
    # brackets inside JSON strings are not nesting: the file loads if the rest is valid
    arch, arrays = _parts(saved)
    arch["layers"][0]["plugin"] = "[" * 10_000 + '"{\\"'
    path = _write(tmp_path / "brackets.npz", arch, arrays)
    net = nnrt.load(path)
    ref = nnrt.load(saved)
    X = np.random.default_rng(1).normal(size=(6, 5))
    np.testing.assert_array_equal(net.predict(X), ref.predict(X))


@pytest.mark.parametrize(
    "text_edit",
    [
        ('"eps": 1e-05', '"eps": NaN'),
        ('"eps": 1e-05', '"eps": Infinity'),
        ('"eps": 1e-05', '"eps": -Infinity'),
        ('"eps": 1e-05', '"eps": 1e400'),
        ('"eps": 1e-05', '"eps": 1e-05, "eps": 1.0'),  # duplicate key
    ],
)
def test_non_finite_numbers_and_duplicate_keys_in_json(
    saved: Path, tmp_path: Path, text_edit: tuple[str, str]
) -> None:
    arch, arrays = _parts(saved)
    text = json.dumps(arch)
    assert text_edit[0] in text
    bad = _write(tmp_path / "nan.npz", text.replace(text_edit[0], text_edit[1], 1), arrays)
    with pytest.raises(ModelFileError, match="nan.npz"):
        nnrt.load(bad)


# ----------------------------------------------------- config values: types and ranges
@pytest.mark.parametrize(
    "key, value",
    [
        ("momentum", "0.5"),
        ("eps", "1e-5"),
        ("momentum", True),
        ("momentum", None),
        ("momentum", [0.5]),
        ("momentum", {"v": 0.5}),
        ("momentum", 1.5),
        ("momentum", -0.1),
        ("eps", 0.0),
        ("eps", -1e-5),
        ("eps", "Infinity"),
        ("num_features", "7"),
        ("num_features", 7.0),
        ("num_features", True),
    ],
)
def test_batchnorm_config_values_are_type_and_range_checked(
    saved: Path, tmp_path: Path, key: str, value: Any
) -> None:
    arch, arrays = _parts(saved)
    assert arch["layers"][1]["name"] == "batchnorm"
    arch["layers"][1]["config"][key] = value
    bad = _write(tmp_path / "cfg.npz", arch, arrays)
    with pytest.raises(ModelFileError, match=f"cfg.npz.*layer 1.*{key}|cfg.npz.*{key}"):
        nnrt.load(bad)


@pytest.mark.parametrize("key", ["in_features", "out_features"])
@pytest.mark.parametrize("value", ["5", 5.0, True, None, [5]])
def test_dense_widths_are_type_checked(saved: Path, tmp_path: Path, key: str, value: Any) -> None:
    arch, arrays = _parts(saved)
    arch["layers"][3]["config"][key] = value
    bad = _write(tmp_path / "w.npz", arch, arrays)
    with pytest.raises(ModelFileError, match="w.npz"):
        nnrt.load(bad)


def test_an_int_where_the_layer_keeps_a_float_is_accepted(saved: Path, tmp_path: Path) -> None:
    # a hand-written file may say "momentum": 1 for 1.0; the value is the same number
    arch, arrays = _parts(saved)
    arch["layers"][1]["config"]["momentum"] = 1
    path = _write(tmp_path / "int.npz", arch, arrays)
    assert nnrt.load(path)[1].config()["momentum"] == 1.0


@pytest.mark.parametrize(
    "key, values",
    [
        ("1.running_var", [-1.0]),
        ("1.running_var", [-1e-30]),
        ("1.running_var", [np.inf]),
        ("1.running_var", [np.nan]),
        ("1.running_mean", [np.inf]),
        ("0.weight", [np.nan]),
    ],
)
def test_bad_state_values_are_refused(
    saved: Path, tmp_path: Path, key: str, values: list[float]
) -> None:
    arch, arrays = _parts(saved)
    arrays[key] = arrays[key].copy()
    arrays[key].reshape(-1)[: len(values)] = values
    bad = _write(tmp_path / "state.npz", arch, arrays)
    with pytest.raises(ModelFileError, match=f"state.npz.*({key.split('.')[1]}|NaN)"):
        nnrt.load(bad)


def test_load_state_dict_refuses_a_negative_running_var_and_changes_nothing() -> None:
    net = _net("float64")
    before = net.state_dict()
    state = net.state_dict()
    state["0.weight"] += 1.0
    state["1.running_var"][2] = -0.5
    with pytest.raises(ValueError, match="running_var"):
        net.load_state_dict(state)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_batchnorm_constructor_checks_its_arguments_strictly() -> None:
    for kwargs, exc in [
        ({"momentum": "0.5"}, TypeError),
        ({"eps": "1e-5"}, TypeError),
        ({"momentum": None}, TypeError),
        ({"eps": float("inf")}, ValueError),
        ({"eps": float("nan")}, ValueError),
        ({"eps": 0.0}, ValueError),
        ({"momentum": float("nan")}, ValueError),
        ({"momentum": 1.0000001}, ValueError),
    ]:
        with pytest.raises(exc):
            nnrt.layer("batchnorm", 4, **kwargs)
    # numpy scalars and ints are real numbers
    bn = nnrt.layer("batchnorm", 4, momentum=np.float32(0.25), eps=1)
    assert bn.config()["momentum"] == 0.25 and bn.config()["eps"] == 1.0


# ----------------------------------------------------- the zip directory, byte by byte
def test_every_corrupt_byte_of_the_zip_directory_is_a_model_file_error(
    saved: Path, tmp_path: Path
) -> None:
    # one corrupt byte used to give NotImplementedError (compression method) or
    # RuntimeError("password required") (the encryption flag), among others
    data = saved.read_bytes()
    with zipfile.ZipFile(saved) as zf:
        start = zf.start_dir  # type: ignore[attr-defined]
    ref = nnrt.load(saved)
    X = np.random.default_rng(2).normal(size=(6, 5))
    expected = ref.predict(X)
    bad = tmp_path / "flip.npz"
    outcomes: dict[str, int] = {}
    for pos in range(start, len(data)):
        for value in (0x00, 0xFF, data[pos] ^ 0x01, data[pos] ^ 0x80):
            if value == data[pos]:
                continue
            blob = bytearray(data)
            blob[pos] = value
            bad.write_bytes(bytes(blob))
            try:
                net = nnrt.load(bad)
            except ModelFileError:
                outcomes["error"] = outcomes.get("error", 0) + 1
                continue
            # bytes the reader does not use (times, comments, attributes) may change
            np.testing.assert_array_equal(net.predict(X), expected)
            outcomes["same"] = outcomes.get("same", 0) + 1
    assert outcomes.get("error", 0) > 100, outcomes


@pytest.mark.parametrize("field", ["encrypted", "method", "version"])
def test_the_issue_s_corrupt_directory_bytes(saved: Path, tmp_path: Path, field: str) -> None:
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as zf:
        start = zf.start_dir  # type: ignore[attr-defined]
    # the first central-directory entry: flags at +8, method at +10, version needed +6
    assert data[start : start + 4] == b"PK\x01\x02"
    if field == "encrypted":
        data[start + 8] |= 0x01
    elif field == "method":
        data[start + 10 : start + 12] = (99).to_bytes(2, "little")
    else:
        data[start + 6 : start + 8] = (99).to_bytes(2, "little")
    bad = tmp_path / "cd.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="cd.npz"):
        nnrt.load(bad)
