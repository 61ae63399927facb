"""Saving and loading networks: one ``.npz`` file.

File layout (``numpy.savez``, uncompressed):

* ``architecture``: a 0-d unicode array holding JSON::

      {"format": "nnrt-network", "format_version": 1, "nnrt_version": "0.1.0",
       "abi_version": 1, "dtype": "float32", "seed": 0,
       "layers": [{"name": "dense_nobias", "config": {...},
                   "plugin": "dense_nobias", "distribution": "nnrt", "version": "0.1.0",
                   "params": {"weight": [64, 32]}, "buffers": {}}, ...]}

* one array per parameter and buffer, keyed as ``Sequential.state_dict``
  (``"0.weight"``, ``"1.running_var"``, ...).

Writing is atomic: the file is written to a temporary file in the same
directory, flushed and fsync'ed, renamed over ``path`` with ``os.replace``,
and the directory is fsync'ed, so a crash (even ``kill -9``) mid-save leaves
either the old file or the new one, never a mix.

Reading never unpickles (``np.load(allow_pickle=False)``) and validates
before it allocates: every array's ``.npy`` header (shape, dtype) is read
first and checked against the shapes the JSON declares, against the size the
zip directory records, and against a limit of 2**31 - 1 elements per array;
the integer arguments in each layer's config must fit the declared shapes.
Only then are layers built and arrays read. Problems raise
``ModelFileError`` (a ``ValueError``) naming the file and what is wrong; a
layer name no installed plugin provides raises ``MissingPluginError`` naming
the plugin and distribution that wrote it.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nnrt.network import Sequential

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MissingPluginError",
    "ModelFileError",
    "architecture",
    "load",
    "read_architecture",
    "save",
]

FORMAT_NAME = "nnrt-network"
FORMAT_VERSION = 1
MAX_ELEMENTS = 2**31 - 1  # kernels index with C int (BLAS takes int)
MAX_ARCHITECTURE_CHARS = 16 * 2**20
ARCH_KEY = "architecture"


class ModelFileError(ValueError):
    """A model file is truncated, corrupt, or not an nnrt model (message names the file)."""


class MissingPluginError(LookupError):
    """A model file uses a layer name that no installed plugin registers."""


# ------------------------------------------------------------------ saving
def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: config value {value!r} ({type(value).__name__}) is not JSON-able")


def architecture(net: Sequential) -> dict[str, Any]:
    """The JSON-able description ``save`` writes (without the arrays)."""
    import nnrt
    from nnrt.registry import registry

    plugins = registry.plugins()
    layers = []
    for i, layer in enumerate(net.layers):
        name = registry.name_of(type(layer))
        if name is None:
            raise ValueError(
                f"save: layer {i} {layer!r} ({type(layer).__module__}."
                f"{type(layer).__qualname__}) is not a registered layer type, so a file "
                f"could not be loaded again; register it through a plugin first "
                f"(nnrt.register_plugin)"
            )
        entry = registry.get(name)
        info = plugins.get(entry.plugin)
        where = f"save: layer {i} {layer!r}"
        layers.append(
            {
                "name": name,
                "config": _jsonable(layer.config(), where),
                "plugin": entry.plugin,
                "distribution": entry.dist,
                "version": info.version if info is not None else None,
                "params": {k: list(v.shape) for k, v in layer.params().items()},
                "buffers": {k: list(v.shape) for k, v in layer.buffers().items()},
            }
        )
    seed = net.seed
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "nnrt_version": nnrt.__version__,
        "abi_version": int(nnrt.ABI_VERSION),
        "dtype": net.dtype.name,
        "seed": int(seed) if isinstance(seed, (int, np.integer)) else None,
        "layers": layers,
    }


_umask_lock = threading.Lock()


def _new_file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        pass
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(dirname: str) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def save(net: Sequential, path: str | os.PathLike[str]) -> None:
    """Write ``net`` to exactly ``path`` (no suffix added), atomically."""
    target = os.fspath(path)
    arch = architecture(net)
    text = json.dumps(arch, allow_nan=False, sort_keys=False)
    arrays: dict[str, np.ndarray] = {ARCH_KEY: np.array(text)}
    for i, layer in enumerate(net.layers):
        for group in (layer.params(), layer.buffers()):
            for name, arr in group.items():
                arrays[f"{i}.{name}"] = np.ascontiguousarray(arr)
    dirname = os.path.dirname(os.path.abspath(target))
    mode = _new_file_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=dirname)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(dirname)


# ------------------------------------------------------------------ loading
def _err(path: str, msg: str) -> ModelFileError:
    return ModelFileError(f"{path}: {msg}")


def _member_header(
    path: str, zf: zipfile.ZipFile, key: str
) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from the ``.npy`` header of ``key``, checked against the zip size."""
    member = f"{key}.npy"
    try:
        info = zf.getinfo(member)
        with zf.open(member) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            header_end = fh.tell()
    except (ValueError, KeyError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise _err(path, f"entry {key!r} is corrupt or truncated: {exc}") from exc
    # The zip directory's sizes are not trusted (they bound what is allocated later): a
    # member must be stored, as save writes it (deflate could inflate ~1000x), and fit in
    # the file on disk.
    if info.compress_type != zipfile.ZIP_STORED:
        raise _err(
            path,
            f"entry {key!r} is compressed (zip method {info.compress_type}); nnrt model "
            f"files store their arrays uncompressed (write them with net.save)",
        )
    disk = os.path.getsize(path)
    if info.compress_size != info.file_size or info.header_offset + info.file_size > disk:
        raise _err(
            path,
            f"entry {key!r}: the zip directory claims {info.file_size} bytes, but the file "
            f"holds {disk} bytes; the file is corrupt or forged",
        )
    if dtype.hasobject:
        raise _err(
            path,
            f"entry {key!r} holds Python objects (dtype {dtype}); nnrt model files hold "
            f"only numeric arrays and are never unpickled",
        )
    if any((not isinstance(d, int)) or d < 0 for d in shape):
        raise _err(path, f"entry {key!r} declares an invalid shape {shape}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise _err(
            path,
            f"entry {key!r} declares shape {shape} ({count} elements), over the limit "
            f"of {MAX_ELEMENTS} elements per array",
        )
    expected = header_end + count * dtype.itemsize
    if info.file_size != expected:
        raise _err(
            path,
            f"entry {key!r} declares shape {shape} dtype {dtype} ({count * dtype.itemsize} "
            f"bytes of data), but the archive stores {info.file_size - header_end} bytes; "
            f"the file is corrupt or truncated",
        )
    return tuple(shape), dtype


def _check_shape_list(path: str, where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise _err(path, f"{where}: shape must be a list of non-negative ints, got {value!r}")
    return tuple(value)


def _validate_architecture(path: str, arch: Any) -> dict[str, Any]:
    if not isinstance(arch, dict) or arch.get("format") != FORMAT_NAME:
        raise _err(path, f"the architecture entry is not an nnrt network (format {FORMAT_NAME!r})")
    version = arch.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _err(path, f"invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise _err(
            path,
            f"written by a newer nnrt ({arch.get('nnrt_version')!r}, file format version "
            f"{version}); this nnrt reads format version {FORMAT_VERSION}: upgrade nnrt",
        )
    if arch.get("dtype") not in ("float32", "float64"):
        raise _err(path, f"invalid dtype {arch.get('dtype')!r} (float32 or float64)")
    seed = arch.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise _err(path, f"invalid seed {seed!r}")
    layers = arch.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _err(path, "the architecture lists no layers")
    for i, spec in enumerate(layers):
        where = f"layer {i}"
        if not isinstance(spec, dict):
            raise _err(path, f"{where}: expected an object, got {spec!r:.80}")
        if not isinstance(spec.get("name"), str):
            raise _err(path, f"{where}: missing layer name")
        if not isinstance(spec.get("config"), dict):
            raise _err(path, f"{where} ({spec['name']!r}): config must be an object")
        for group in ("params", "buffers"):
            shapes = spec.get(group, {})
            if not isinstance(shapes, dict):
                raise _err(path, f"{where} ({spec['name']!r}): {group} must be an object")
            for k, v in shapes.items():
                _check_shape_list(path, f"{where} ({spec['name']!r}) {group} {k!r}", v)
    return arch


def _read_architecture(path: str, npz: Any) -> dict[str, Any]:
    if ARCH_KEY not in npz.files:
        raise _err(
            path,
            f"no {ARCH_KEY!r} entry: not an nnrt model file (write one with net.save(path)); "
            f"entries: {sorted(npz.files)[:10]}",
        )
    shape, dtype = _member_header(path, npz.zip, ARCH_KEY)
    if shape != () or dtype.kind != "U":
        raise _err(
            path,
            f"the {ARCH_KEY!r} entry must be a 0-d unicode array, got shape {shape} dtype {dtype}",
        )
    if dtype.itemsize // 4 > MAX_ARCHITECTURE_CHARS:
        raise _err(path, f"the {ARCH_KEY!r} entry is implausibly large ({dtype})")
    try:
        text = str(npz[ARCH_KEY][()])
        arch = json.loads(text)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _err(path, f"the {ARCH_KEY!r} entry is corrupt: {exc}") from exc
    return _validate_architecture(path, arch)


def _open(path: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except zipfile.BadZipFile as exc:
        raise _err(
            path,
            f"truncated, corrupt or not an .npz archive (zipfile: {exc}); an nnrt model "
            f"file is written by net.save(path)",
        ) from exc
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise _err(
            path, f"not a readable nnrt model file (.npz): {type(exc).__name__}: {exc}"
        ) from exc


def read_architecture(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated JSON architecture of a model file, without building the network."""
    p = os.fspath(path)
    npz = _open(p)
    try:
        if not hasattr(npz, "files"):
            raise _err(p, "holds a single .npy array, not an nnrt model (.npz)")
        return _read_architecture(p, npz)
    finally:
        if hasattr(npz, "close"):
            npz.close()


def _missing_plugin(path: str, i: int, spec: dict[str, Any]) -> MissingPluginError:
    from nnrt.registry import registry

    plugin = spec.get("plugin")
    dist = spec.get("distribution")
    version = spec.get("version")
    source = f"plugin {plugin!r}" if plugin else "an unknown plugin"
    if dist:
        source += f" from distribution {dist!r}" + (f" {version}" if version else "")
    hint = f"install it (pip install {dist})" if dist else "install or register that plugin"
    info = registry.plugins().get(plugin) if isinstance(plugin, str) else None
    if info is not None and info.status != "ok":
        hint = f"that plugin is installed but {info.status}"
    known = ", ".join(sorted(registry.layers()))
    return MissingPluginError(
        f"{path}: layer {i} is {spec['name']!r}, which no loaded plugin provides; the file "
        f"was written with {source}: {hint}. Registered layers: {known}"
    )


_SIZE_KEY = re.compile(r"(features|size|units|dim|dims|width|channels|length)$")


def _check_config_sizes(path: str, i: int, spec: dict[str, Any]) -> None:
    """Reject config ints that would allocate far more than the stored arrays hold."""
    dims = [d for g in ("params", "buffers") for s in spec.get(g, {}).values() for d in s]
    limit = max(dims) if dims else MAX_ELEMENTS

    def walk(value: Any, key: str) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            # only size-like arguments (in_features, num_features, hidden_size, ...)
            # decide allocations; seeds and counters may be any int
            if _SIZE_KEY.search(key) and value > limit:
                raise _err(
                    path,
                    f"layer {i} ({spec['name']!r}): config {key}={value} does not fit the "
                    f"stored array shapes (largest dimension {limit}); the file is corrupt",
                )
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for v in value:
                walk(v, key)

    walk(spec["config"], "")


def load(path: str | os.PathLike[str]) -> Sequential:
    """Read a network written by ``save``; see the module docstring for the checks."""
    from nnrt.network import Sequential
    from nnrt.registry import registry
    from nnrt.warnings import NetworkWarning

    p = os.fspath(path)
    npz = _open(p)
    if not hasattr(npz, "files"):
        raise _err(p, "holds a single .npy array, not an nnrt model (.npz)")
    with npz:
        arch = _read_architecture(p, npz)
        specs: list[dict[str, Any]] = arch["layers"]
        # 1. every array header against the declared shapes, before any allocation
        expected: dict[str, tuple[int, ...]] = {}
        for i, spec in enumerate(specs):
            for group in ("params", "buffers"):
                for name, shape in spec.get(group, {}).items():
                    expected[f"{i}.{name}"] = tuple(shape)
        stored = set(npz.files) - {ARCH_KEY}
        missing = sorted(set(expected) - stored)
        extra = sorted(stored - set(expected))
        if missing or extra:
            raise _err(
                p, f"arrays do not match the architecture: missing {missing}, unexpected {extra}"
            )
        for key, shape in expected.items():
            got, dtype = _member_header(p, npz.zip, key)
            if got != shape:
                raise _err(p, f"array {key!r} has shape {got}, the architecture declares {shape}")
            if dtype.kind != "f":
                raise _err(p, f"array {key!r} has dtype {dtype}; parameters must be floats")
        # 2. layers, from the registry
        available = registry.layers()
        layers = []
        for i, spec in enumerate(specs):
            entry = available.get(spec["name"])
            if entry is None:
                raise _missing_plugin(p, i, spec)
            _check_config_sizes(p, i, spec)
            try:
                layer = entry.cls(**spec["config"])
            except Exception as exc:
                raise _err(
                    p,
                    f"layer {i} ({spec['name']!r}) could not be built from config "
                    f"{spec['config']}: {type(exc).__name__}: {exc}",
                ) from exc
            for group in ("params", "buffers"):
                have = {k: tuple(v.shape) for k, v in getattr(layer, group)().items()}
                want = {k: tuple(v) for k, v in spec.get(group, {}).items()}
                if have != want:
                    raise _err(
                        p,
                        f"layer {i} {layer!r}: its {group} are {have}, the file declares {want}",
                    )
            layers.append(layer)
        with warnings.catch_warnings():
            # the network checks warned when this network was first built
            warnings.simplefilter("ignore", NetworkWarning)
            try:
                net = Sequential(layers, seed=arch.get("seed"), dtype=arch["dtype"])
            except (ValueError, TypeError) as exc:
                raise _err(p, f"the layers do not form a network: {exc}") from exc
        # 3. the arrays
        state: dict[str, np.ndarray] = {}
        for key in expected:
            try:
                state[key] = npz[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise _err(p, f"array {key!r} is corrupt or truncated: {exc}") from exc
            if not np.isfinite(state[key]).all():
                raise _err(p, f"array {key!r} contains NaN or Inf")
        net.load_state_dict(state)
    return net
