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

Reading never unpickles and validates before it allocates
(docs/reliability.md §3): the file is opened only if it is a regular file
(``open_regular_file``: never blocks on a FIFO or device); nnrt reads the zip
itself rather than through ``np.load``, and the archive must hold exactly
``architecture.npy`` and one ``<key>.npy`` per declared array, each once,
stored, unencrypted, inside the file and not overlapping another (so the
arrays read add up to at most the file's size); every ``.npy`` header
(shape, dtype) is checked against the JSON and the member's size, with a
limit of 2**31 - 1 elements per array. The architecture JSON is size- and
depth-limited and holds finite numbers and unique keys only; each layer built
from its config must report that config back (strict types, whatever the
plugin), and the constructors check ranges. Arrays must be finite and pass
the plugins' ``nnrt_check_state`` hooks (a variance >= 0). Only then are the
arrays copied in. Problems raise ``ModelFileError`` (a ``ValueError``) naming
the file and what is wrong; a layer name no installed plugin provides raises
``MissingPluginError`` naming the plugin and distribution that wrote it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
import tempfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from nnrt._locks import holding
from nnrt._network import Network, build
from nnrt._validate import check_state
from nnrt.registry import registry
from nnrt.warnings import NetworkWarning

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MissingPluginError",
    "ModelFileError",
    "NotARegularFileError",
    "architecture",
    "load",
    "open_regular_file",
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


def architecture(net: Network) -> dict[str, Any]:
    """The JSON-able description ``save`` writes (without the arrays)."""
    import nnrt  # the version (the package imports this module)

    # a layer cast after the network was built (TypeError): the file would hold the
    # network's dtype over that layer's arrays and reload to other numbers
    net._check_dtypes("save")
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


def _new_umask_lock_after_fork() -> None:
    # a fork while another thread held it would leave the child's save blocked forever
    global _umask_lock
    _umask_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_umask_lock_after_fork)


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


def save(net: Network, path: str | os.PathLike[str]) -> None:
    """Write ``net`` to exactly ``path`` (no suffix added), atomically."""

    target = os.fspath(path)
    # NOTE: copies taken under the network's lock (the weights of one whole step
    # while another thread trains it); the slow part, writing, runs without it.
    with holding(net):
        arch = architecture(net)
        arrays: dict[str, np.ndarray] = {}
        for i, layer in enumerate(net.layers):
            for group in (layer.params(), layer.buffers()):
                for name, arr in group.items():
                    arrays[f"{i}.{name}"] = np.array(arr, order="C", copy=True)
    text = json.dumps(arch, allow_nan=False, sort_keys=False)
    arrays = {ARCH_KEY: np.array(text), **arrays}
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


# ------------------------------------------------------------------ opening
class NotARegularFileError(OSError):
    """A path names a FIFO, device, socket or directory where a regular file is needed."""

    def __str__(self) -> str:
        return str(self.strerror)


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_regular_file(path: str | os.PathLike[str], what: str = "file") -> BinaryIO:
    """Open ``path`` for binary reading only if it is a regular file.

    Never blocks: the file is opened with ``O_NONBLOCK`` (opening a FIFO that
    has no writer would otherwise wait forever) and ``fstat`` of the open
    descriptor (no race with a rename) must say it is a regular file; a FIFO,
    device, socket or directory raises ``NotARegularFileError`` (an
    ``OSError``) naming the path and what it is. Symbolic links are followed.
    ``FileNotFoundError`` / ``PermissionError`` pass through. The caller
    closes the returned file (use ``with``). nnrt's loaders and the CLI read
    model and data files through this.
    """
    p = os.fspath(path)
    flags = os.O_RDONLY
    for name in ("O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC", "O_BINARY"):
        flags |= getattr(os, name, 0)
    fd = os.open(p, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
            raise NotARegularFileError(
                errno.EINVAL,
                f"{what} {p!r} is {kind}, not a regular file; nnrt reads {what}s only "
                f"from regular files",
                p,
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------ loading
MAX_JSON_DEPTH = 32  # the format nests 4 deep; a plugin's config a few more
MAX_LAYERS = 100_000
MAX_SEED = 2**128
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MEMBER = re.compile(r"(?:architecture|(0|[1-9][0-9]*)\.([A-Za-z_][A-Za-z0-9_]*))\.npy\Z")
# everything a corrupt or forged archive can make zipfile/numpy raise
_READ_ERRORS = (
    ValueError,
    KeyError,
    EOFError,
    OSError,
    RuntimeError,  # "password required" (encrypted member)
    NotImplementedError,  # unknown compression method
    OverflowError,
    TypeError,
    UnicodeDecodeError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
)


def _err(path: str, msg: str) -> ModelFileError:
    return ModelFileError(f"{path}: {msg}")


class _Archive:
    """The zip directory of a model file, checked before any member is read.

    Each member must be named ``<key>.npy`` exactly once (a raw ``0.weight``
    beside ``0.weight.npy`` would be what ``np.load`` returns: refused), stored
    uncompressed and unencrypted, lie inside the file, and not overlap another
    member, so that the arrays read can never add up to more than the file's
    size on disk.
    """

    def __init__(self, path: str, fh: BinaryIO) -> None:
        self.path = path
        self.fh = fh
        self.disk = os.fstat(fh.fileno()).st_size
        try:
            self.zf = zipfile.ZipFile(fh)
        except _READ_ERRORS as exc:
            fh.seek(0)
            if fh.read(6) == b"\x93NUMPY":
                raise _err(path, "holds a single .npy array, not an nnrt model (.npz)") from exc
            raise _err(
                path,
                f"truncated, corrupt or not an .npz archive ({type(exc).__name__}: {exc}); "
                f"an nnrt model file is written by net.save(path)",
            ) from exc
        self.members: dict[str, zipfile.ZipInfo] = {}
        try:
            self._check_directory()
        except BaseException:
            self.close()
            raise

    def _check_directory(self) -> None:
        path = self.path
        infos = self.zf.infolist()
        spans = []
        for info in infos:
            name = info.filename
            if name != info.orig_filename or not _MEMBER.match(name):
                raise _err(
                    path,
                    f"unexpected entry {info.orig_filename!r:.80} in the archive (an nnrt "
                    f"model file holds 'architecture.npy' and '<layer>.<name>.npy' "
                    f"entries only)",
                )
            if name in self.members:
                raise _err(path, f"entry {name!r} appears twice in the archive")
            if info.flag_bits & 0x1:
                raise _err(path, f"entry {name!r} is encrypted; nnrt model files never are")
            if info.compress_type != zipfile.ZIP_STORED:
                raise _err(
                    path,
                    f"entry {name!r} is compressed (zip method {info.compress_type}); nnrt "
                    f"model files store their arrays uncompressed (write them with net.save)",
                )
            if info.compress_size != info.file_size or info.header_offset < 0:
                raise _err(path, f"entry {name!r}: inconsistent sizes in the zip directory")
            # NOTE: 30 bytes of local header precede each member's name and data
            start, end = info.header_offset, info.header_offset + 30 + info.file_size
            if end > self.disk:
                raise _err(
                    path,
                    f"entry {name!r}: the zip directory claims {info.file_size} bytes at "
                    f"offset {start}, but the file holds {self.disk} bytes; the file is "
                    f"corrupt or forged",
                )
            spans.append((start, end, name))
            self.members[name] = info
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise _err(path, f"entries {a!r} and {b!r} overlap in the archive (forged)")

    def close(self) -> None:
        try:
            self.zf.close()
        finally:
            self.fh.close()

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype[Any], bool]:
        """Shape, dtype and Fortran order from the ``.npy`` header of ``key``, checked."""
        path = self.path
        info = self.members.get(f"{key}.npy")
        if info is None:
            raise _err(path, f"no entry {key!r} in the archive")
        try:
            with self.zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f"unsupported .npy format version {version}")
                header_end = fh.tell()
        except _READ_ERRORS as exc:
            raise _err(path, f"entry {key!r} is corrupt or truncated: {exc}") from exc
        if dtype.hasobject:
            raise _err(
                path,
                f"entry {key!r} holds Python objects (dtype {dtype}); nnrt model files hold "
                f"only numeric arrays and are never unpickled",
            )
        if not isinstance(shape, tuple) or any(
            (not isinstance(d, int)) or isinstance(d, bool) or d < 0 for d in shape
        ):
            raise _err(path, f"entry {key!r} declares an invalid shape {shape}")
        count = math.prod(shape)
        if count > MAX_ELEMENTS:
            raise _err(
                path,
                f"entry {key!r} declares shape {shape} ({count} elements), over the limit "
                f"of {MAX_ELEMENTS} elements per array",
            )
        if info.file_size != header_end + count * dtype.itemsize:
            raise _err(
                path,
                f"entry {key!r} declares shape {shape} dtype {dtype} ({count * dtype.itemsize} "
                f"bytes of data), but the archive stores {info.file_size - header_end} bytes; "
                f"the file is corrupt or truncated",
            )
        return tuple(shape), dtype, bool(fortran)

    def array(self, key: str) -> np.ndarray:
        """The array of ``key`` (its header must have been checked by ``header``)."""
        try:
            with self.zf.open(self.members[f"{key}.npy"]) as fh:
                arr = np.lib.format.read_array(fh, allow_pickle=False)
        except _READ_ERRORS as exc:
            raise _err(self.path, f"entry {key!r} is corrupt or truncated: {exc}") from exc
        return np.asarray(arr)


def _json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON ``text`` (strings skipped), without recursion."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    codes = np.frombuffer(stripped.encode("utf-32-le"), dtype=np.uint32)
    steps = np.zeros(codes.shape, dtype=np.int64)
    steps[(codes == ord("[")) | (codes == ord("{"))] = 1
    steps[(codes == ord("]")) | (codes == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def _parse_json(path: str, text: str) -> Any:
    """JSON with no NaN/Infinity, no duplicate keys and a nesting limit."""
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise _err(
            path,
            f"the {ARCH_KEY!r} JSON is nested {depth} deep (limit {MAX_JSON_DEPTH}); the "
            f"file is corrupt or forged",
        )

    def constant(name: str) -> Any:
        raise ValueError(f"non-finite number {name} (model files hold finite numbers only)")

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text[:40]} overflows a float")
        return value

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"duplicate key {key!r:.60} in an object")
            out[key] = value
        return out

    try:
        return json.loads(
            text, parse_constant=constant, parse_float=number, object_pairs_hook=pairs
        )
    except (ValueError, RecursionError) as exc:
        raise _err(path, f"the {ARCH_KEY!r} entry is not valid JSON: {exc}") from exc


def _check_shape_list(path: str, where: str, value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or len(value) > 32
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)
    ):
        raise _err(path, f"{where}: shape must be a list of non-negative ints, got {value!r:.80}")
    if math.prod(value) > MAX_ELEMENTS:
        raise _err(path, f"{where}: shape {value} is over {MAX_ELEMENTS} elements")
    return tuple(value)


def _validate_architecture(path: str, arch: Any) -> dict[str, Any]:
    if not isinstance(arch, dict) or arch.get("format") != FORMAT_NAME:
        raise _err(path, f"the architecture entry is not an nnrt network (format {FORMAT_NAME!r})")
    version = arch.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _err(path, f"invalid format_version {version!r:.40}")
    if version > FORMAT_VERSION:
        raise _err(
            path,
            f"written by a newer nnrt ({arch.get('nnrt_version')!r:.40}, file format version "
            f"{version}); this nnrt reads format version {FORMAT_VERSION}: upgrade nnrt",
        )
    dtype = arch.get("dtype")
    if not isinstance(dtype, str) or dtype not in ("float32", "float64"):
        raise _err(path, f"invalid dtype {dtype!r:.40} (float32 or float64)")
    seed = arch.get("seed")
    if seed is not None and (
        not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED
    ):
        raise _err(path, f"invalid seed {seed!r:.40} (an int in [0, 2**128) or null)")
    layers = arch.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _err(path, "the architecture lists no layers")
    if len(layers) > MAX_LAYERS:
        raise _err(path, f"the architecture lists {len(layers)} layers (limit {MAX_LAYERS})")
    for i, spec in enumerate(layers):
        where = f"layer {i}"
        if not isinstance(spec, dict):
            raise _err(path, f"{where}: expected an object, got {spec!r:.80}")
        if not isinstance(spec.get("name"), str):
            raise _err(path, f"{where}: missing layer name")
        if not isinstance(spec.get("config"), dict):
            raise _err(path, f"{where} ({spec['name']!r:.60}): config must be an object")
        names: set[str] = set()
        for group in ("params", "buffers"):
            shapes = spec.get(group, {})
            if not isinstance(shapes, dict):
                raise _err(path, f"{where} ({spec['name']!r:.60}): {group} must be an object")
            for k, v in shapes.items():
                if not _PARAM_NAME.match(k) or k in names:
                    raise _err(
                        path, f"{where} ({spec['name']!r:.60}): invalid {group} name {k!r:.60}"
                    )
                names.add(k)
                _check_shape_list(path, f"{where} ({spec['name']!r:.60}) {group} '{i}.{k}'", v)
    return arch


def _read_architecture(archive: _Archive) -> dict[str, Any]:
    path = archive.path
    if f"{ARCH_KEY}.npy" not in archive.members:
        raise _err(
            path,
            f"no {ARCH_KEY!r} entry: not an nnrt model file (write one with net.save(path)); "
            f"entries: {sorted(archive.members)[:10]}",
        )
    shape, dtype, _ = archive.header(ARCH_KEY)
    if shape != () or dtype.kind != "U":
        raise _err(
            path,
            f"the {ARCH_KEY!r} entry must be a 0-d unicode array, got shape {shape} dtype {dtype}",
        )
    if dtype.itemsize // 4 > MAX_ARCHITECTURE_CHARS:
        raise _err(path, f"the {ARCH_KEY!r} entry is implausibly large ({dtype})")
    try:
        text = str(archive.array(ARCH_KEY)[()])
    except ModelFileError:
        raise
    except _READ_ERRORS as exc:  # e.g. a lone surrogate that cannot be a str
        raise _err(path, f"the {ARCH_KEY!r} entry is corrupt: {exc}") from exc
    return _validate_architecture(path, _parse_json(path, text))


def _expected_arrays(archive: _Archive, arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{"<i>.<name>": shape}`` the architecture declares; the archive holds exactly those."""
    expected: dict[str, tuple[int, ...]] = {}
    for i, spec in enumerate(arch["layers"]):
        for group in ("params", "buffers"):
            for name, shape in spec.get(group, {}).items():
                expected[f"{i}.{name}"] = tuple(shape)
    stored = {m[: -len(".npy")] for m in archive.members} - {ARCH_KEY}
    missing = sorted(set(expected) - stored)
    extra = sorted(stored - set(expected))
    if missing or extra:
        raise _err(
            archive.path,
            f"arrays do not match the architecture: missing {missing[:10]}, unexpected "
            f"{extra[:10]}",
        )
    return expected


def _open_archive(path: str) -> _Archive:
    try:
        fh = open_regular_file(path, "model file")
    except NotARegularFileError as exc:
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a model file", path) from exc
        raise _err(path, str(exc)) from exc
    try:
        return _Archive(path, fh)
    except BaseException:
        fh.close()  # idempotent: _Archive closes it too when its checks fail
        raise


def read_architecture(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated JSON architecture of a model file, without building the network."""
    p = os.fspath(path)
    archive = _open_archive(p)
    try:
        arch = _read_architecture(archive)
        _expected_arrays(archive, arch)
        return arch
    finally:
        archive.close()


def _missing_plugin(path: str, i: int, spec: dict[str, Any]) -> MissingPluginError:
    plugin = spec.get("plugin")
    dist = spec.get("distribution")
    version = spec.get("version")
    source = f"plugin {plugin!r:.80}" if plugin else "an unknown plugin"
    if dist:
        source += f" from distribution {dist!r:.80}" + (f" {version!s:.40}" if version else "")
    hint = f"install it (pip install {dist!s:.80})" if dist else "install or register that plugin"
    info = registry.plugins().get(plugin) if isinstance(plugin, str) else None
    if info is not None and info.status != "ok":
        hint = f"that plugin is installed but {info.status}"
    known = ", ".join(sorted(registry.layers()))
    return MissingPluginError(
        f"{path}: layer {i} is {spec['name']!r:.80}, which no loaded plugin provides; the file "
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


def _same_value(a: Any, b: Any) -> bool:
    """JSON values equal in type and value (an int may stand for an equal float)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _check_config_echo(path: str, i: int, spec: dict[str, Any], layer: Any) -> None:
    """The built layer must report back the config it was given, value for value.

    Generic strict typing for every plugin: a constructor that coerces
    ``"momentum": "0.5"`` or ``"eps": "1e-5"`` (strings) or ``true`` into a
    number builds a layer whose ``config()`` differs from the file, and the file
    is refused; range checks are the constructor's (e.g. a normalisation's eps > 0).
    """
    try:
        echo = _jsonable(layer.config(), f"layer {i}")
    except Exception as exc:
        raise _err(path, f"layer {i} ({spec['name']!r}): config() failed: {exc}") from exc
    for key, value in spec["config"].items():
        if key not in echo or not _same_value(value, echo[key]):
            got = echo.get(key, "<absent>")
            raise _err(
                path,
                f"layer {i} ({spec['name']!r}): config {key}={value!r:.60} "
                f"({type(value).__name__}) is not a valid value (the layer made it "
                f"{got!r:.60}); the file is corrupt or forged",
            )


def _check_state(path: str, net: Network, state: dict[str, np.ndarray]) -> None:
    """Finite arrays, then each plugin's own checks of its layers' state (hook)."""
    for key, arr in state.items():
        if not np.isfinite(arr).all():
            raise _err(path, f"array {key!r} contains NaN or Inf")
    try:
        check_state(net, state)
    except ValueError as exc:
        raise _err(path, str(exc)) from exc


def load(path: str | os.PathLike[str]) -> Network:
    """Read a network written by ``save``; see the module docstring for the checks."""
    p = os.fspath(path)
    archive = _open_archive(p)
    try:
        return _load(p, archive)
    except (ModelFileError, MissingPluginError):
        raise
    except RecursionError as exc:
        raise _err(p, f"nested too deeply to load: {exc}") from exc
    finally:
        archive.close()


def _load(p: str, archive: _Archive) -> Network:
    arch = _read_architecture(archive)
    specs: list[dict[str, Any]] = arch["layers"]
    # 1. every member and array header against the declared shapes, before allocating
    expected = _expected_arrays(archive, arch)
    for key, shape in expected.items():
        got, dtype, _ = archive.header(key)
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
                f"{spec['config']!r:.200}: {type(exc).__name__}: {exc}",
            ) from exc
        _check_config_echo(p, i, spec, layer)
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
            net = build(layers, seed=arch.get("seed"), dtype=arch["dtype"])
        except (ValueError, TypeError) as exc:
            raise _err(p, f"the layers do not form a network: {exc}") from exc
    # 3. the arrays (their sizes add up to at most the file's size: _Archive)
    state = {key: archive.array(key) for key in expected}
    _check_state(p, net, state)
    net.load_state_dict(state)
    return net
