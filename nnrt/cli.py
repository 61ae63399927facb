"""The ``nnrt`` command (console script and ``python -m nnrt``).

    nnrt demo                      train on the bundled 8x8 digits, print test accuracy
    nnrt train --data d.npz --layers "dense_nobias:64,sigmoid,dense:10" --out m.npz
                                   (--plot curve.png: the training curves too; without
                                   --layers: the demo network)
    nnrt predict m.npz d.npz       print predicted classes (or --scores, --out file)
    nnrt info [m.npz]              a model's architecture and summary, or nnrt/ABI/BLAS/plugins
    nnrt plugins                   installed plugins, their layers and distributions

Errors are one line on stderr (``nnrt: error: ...``) and a non-zero exit status
(2 for a bad command line, 1 for anything else); ``--debug`` shows the traceback
instead. Text that comes from files (layer names, config values, plugin metadata,
error messages quoting them) is printed with control characters escaped
(``\\x1b``, ``\\n``, ...): a model file cannot move the cursor, ring the bell or
forge table rows.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnrt._text import escape_controls

__all__ = ["build_layers", "load_data", "main", "parse_layers"]


def demo_layers() -> str:
    """The network of ``nnrt demo`` (and ``nnrt train`` without ``--layers``): the
    default hidden block (hook ``nnrt_default_block``) of width 64, then ``dense:10``."""
    from nnrt._hooks import default_block_spec

    return default_block_spec(64) + ",dense:10"


class CLIError(Exception):
    """An error to report as one line (bad arguments, unreadable data)."""


# ------------------------------------------------------------------ output
def clean(text: object) -> str:
    """``str(text)`` with every control/format character escaped (``\\x1b``, ``\\n``,
    ``\\u202e``): safe to print whatever a file contained."""
    return escape_controls(text)


def _say(*parts: object, file: Any = None) -> None:
    """Print one line built from ``parts``; each part is escaped (see ``clean``)."""
    print(" ".join(clean(p) for p in parts), file=file)


# --------------------------------------------------------------- --layers
LAYERS_GRAMMAR = """\
--layers grammar: comma-separated entries, each NAME[:WIDTH][:KEY=VALUE]...
  NAME        a registered layer (nnrt plugins lists them)
  WIDTH       a positive integer: the layer's output width, for layers that change
              the width (dense:10, dense_nobias:64); layers that keep the width
              (sigmoid, normalisations, ...) take none (NAME:N is accepted only if
              N equals the incoming width)
  KEY=VALUE   a constructor keyword argument (leaky_relu:negative_slope=0.1,
              NAME:momentum=0.2:eps=1e-3); VALUE is read as an int, a float,
              true/false, none, or else a string
  Each layer's input width is the previous layer's output (the first layer's is
  the number of feature columns of the data), so it is never written.
  Example: "dense:64,sigmoid,dense:32,sigmoid,dense:10"
  Without --layers: the demo network, the default hidden block of width 64
  (its layers come from the plugins: nnrt plugins) and dense:10
"""

DATA_FORMAT = """\
data files:
  .npz   numpy archive (numpy.savez) with a 2-D float/int feature array named X
         (or x, data, features, inputs), shape (samples, features), and for
         train a label array named y (or Y, labels, target, targets): integer
         class labels, shape (samples,) (loss softmax_cross_entropy), or float
         targets, shape (samples,) or (samples, outputs) (loss mse)
  .csv   comma-separated numbers, one sample per row, an optional header row;
         the last column is the label (for predict: unless every column is a
         feature of the model)
"""

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WIDTH = re.compile(r"^[+]?[0-9]+$")


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_layers(spec: str) -> list[tuple[str, list[int], dict[str, Any]]]:
    """``"dense_nobias:64,sigmoid,dense:10"`` -> [(name, widths, kwargs), ...].

    See ``LAYERS_GRAMMAR``: a bare number is a width (a positive int), anything
    else must be ``key=value``. Errors name the entry, the part and what was expected.
    """
    out: list[tuple[str, list[int], dict[str, Any]]] = []
    if not spec.strip():
        raise CLIError("--layers is empty; expected e.g. 'dense:64,sigmoid,dense:10'")
    for i, token in enumerate(spec.split(","), 1):
        token = token.strip()
        where = f"--layers entry {i} {token!r}"
        if not token:
            raise CLIError(f"--layers entry {i} is empty (two commas, or a trailing comma?)")
        name, *rest = (t.strip() for t in token.split(":"))
        if not name:
            raise CLIError(f"{where}: no layer name before ':'")
        widths: list[int] = []
        kwargs: dict[str, Any] = {}
        for part in rest:
            if "=" in part:
                key, value = (t.strip() for t in part.split("=", 1))
                if not _IDENT.match(key):
                    raise CLIError(
                        f"{where}: {part!r}: expected KEY=VALUE with KEY a Python identifier"
                    )
                if value == "":
                    raise CLIError(f"{where}: {key}= has no value")
                if key in kwargs:
                    raise CLIError(f"{where}: {key} is given twice")
                kwargs[key] = _parse_value(value)
            elif _WIDTH.match(part):
                n = int(part)
                if n <= 0:
                    raise CLIError(f"{where}: width must be a positive integer, got {part}")
                if kwargs:
                    raise CLIError(f"{where}: the width {part} must come before KEY=VALUE items")
                widths.append(n)
            elif part == "":
                raise CLIError(f"{where}: empty item between ':' separators")
            else:
                raise CLIError(
                    f"{where}: {part!r} is neither a width (a positive integer) nor KEY=VALUE "
                    f"(hyperparameters are named: {name}:KEY=VALUE)"
                )
        if len(widths) > 1:
            raise CLIError(
                f"{where}: more than one width ({', '.join(map(str, widths))}); the input "
                f"width comes from the previous layer, give only the output width"
            )
        out.append((name, widths, kwargs))
    return out


def _shape_kind(name: str, width: int) -> str:
    """How a layer type uses widths, probed without keyword arguments:
    "maps" (``name(in, out)``, e.g. dense), "sized" (``name(width)`` keeping the
    width, e.g. a normalisation) or "free" (``name()``, e.g. sigmoid)."""
    import nnrt

    probe = width + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, args in (("maps", (width, probe)), ("sized", (width,)), ("free", ())):
            try:
                layer = nnrt.layer(name, *args)
            except Exception:
                continue
            inf, outf = layer.in_features, layer.out_features
            if kind == "maps" and inf == width and outf == probe:
                return kind
            if kind == "sized" and inf == width and outf in (None, width):
                return kind
            if kind == "free" and inf is None:
                return kind
    return "unknown"


def build_layers(spec: str, in_features: int) -> list[Any]:
    """Layers from a ``--layers`` string (see ``LAYERS_GRAMMAR``); each layer's input
    width is the previous layer's output width, the first one's ``in_features``."""
    import nnrt

    layers = []
    width = int(in_features)
    available = nnrt.available_layers()
    for i, (name, widths, kwargs) in enumerate(parse_layers(spec), 1):
        where = f"--layers entry {i} ({name})"
        if name not in available:
            known = ", ".join(sorted(available))
            raise CLIError(f"{where}: unknown layer {name!r}; available: {known}")
        kind = _shape_kind(name, width)
        if kind == "maps":
            if not widths:
                raise CLIError(
                    f"{where}: needs an output width after width {width}, e.g. {name}:10"
                )
            args: tuple[int, ...] = (width, widths[0])
        elif kind == "sized":
            if widths and widths[0] != width:
                raise CLIError(
                    f"{where}: {name} keeps the width, which is {width} here; "
                    f"got {name}:{widths[0]} (leave the width out)"
                )
            args = (width,)
        elif kind == "free":
            if widths:
                raise CLIError(
                    f"{where}: {name} keeps the width and takes no width argument, got "
                    f"{widths[0]}; give hyperparameters as KEY=VALUE"
                )
            args = ()
        else:
            raise CLIError(
                f"{where}: cannot tell how {name} takes its widths: neither {name}(in, out), "
                f"{name}(width) nor {name}() builds a layer"
            )
        call = ", ".join([*map(str, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
        try:
            layer = nnrt.layer(name, *args, **kwargs)
        except Exception as exc:
            raise CLIError(f"{where}: {name}({call}) failed: {exc}") from exc
        if layer.in_features not in (None, width):
            raise CLIError(
                f"{where}: {name}({call}) takes {layer.in_features} inputs, but the width "
                f"here is {width}"
            )
        if layer.out_features is not None:
            width = int(layer.out_features)
        layers.append(layer)
    return layers


_X_KEYS = ("X", "x", "data", "features", "inputs")
_Y_KEYS = ("y", "Y", "labels", "target", "targets")


def _labels(y: np.ndarray) -> np.ndarray:
    """Float labels holding whole numbers become int64 class labels."""
    if y.dtype.kind == "f" and y.ndim == 1 and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    return y


def _regular_file(path: str, what: str) -> None:
    """Refuse anything but an existing regular file (a FIFO or device would block)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CLIError(f"{what} {path!r} does not exist") from None
    except OSError as exc:
        raise CLIError(f"{what} {path!r}: cannot access: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CLIError(f"{what} {path!r} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise CLIError(f"{what} {path!r} is not a regular file (a FIFO, socket or device?)")


def _check_arrays(path: str, X: np.ndarray, y: np.ndarray | None) -> None:
    if X.dtype.kind not in "biuf":
        raise CLIError(
            f"{path}: features must be numbers (float, int or bool), got dtype {X.dtype}"
        )
    if X.ndim != 2:
        raise CLIError(
            f"{path}: features must be a 2-D array (samples, features), got shape {X.shape}"
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise CLIError(f"{path}: no data: features have shape {X.shape}")
    if y is not None:
        if y.dtype.kind not in "biuf":
            raise CLIError(f"{path}: labels must be numbers, got dtype {y.dtype}")
        if y.ndim not in (1, 2) or y.shape[0] != X.shape[0]:
            raise CLIError(
                f"{path}: labels of shape {y.shape} do not match {X.shape[0]} samples "
                f"(expected shape ({X.shape[0]},) or ({X.shape[0]}, outputs))"
            )


def _load_csv(path: str, n_features: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.strip()]
    except UnicodeDecodeError:
        raise CLIError(f"{path}: not a text (UTF-8) CSV file") from None
    except OSError as exc:
        raise CLIError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if lines:
        try:
            [float(v) for v in lines[0].split(",")]
        except ValueError:
            lines = lines[1:]  # a header row
    if not lines:
        raise CLIError(f"{path}: no data rows (the CSV file is empty or has only a header)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = np.loadtxt(lines, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise CLIError(f"{path}: cannot read as CSV of numbers: {exc}") from None
    if n_features is not None and table.shape[1] == n_features:
        return table, None
    if table.shape[1] < 2:
        raise CLIError(
            f"{path}: needs feature columns and a label column (the last), got "
            f"{table.shape[1]} column"
        )
    return table[:, :-1], _labels(table[:, -1])


def load_data(path: str, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, y) from ``.npz`` (arrays ``X`` and ``y``; y optional) or ``.csv``.

    CSV: comma-separated numbers, an optional header row; the last column is
    the label unless ``n_features`` says every column is a feature. See
    ``DATA_FORMAT``. X is checked to be a non-empty 2-D numeric array (3-D and
    more are flattened per sample) and y to have one entry per sample.
    """
    _regular_file(path, "data file")
    if path.lower().endswith(".csv"):
        X, y = _load_csv(path, n_features)
        _check_arrays(path, X, y)
        return X, y
    if not zipfile.is_zipfile(path):
        raise CLIError(
            f"{path}: not an .npz file (not a zip archive); give a numpy .npz "
            f"(numpy.savez) or a .csv file"
        )
    from nnrt.io import open_regular_file

    try:
        with open_regular_file(path, "data file") as raw, np.load(raw, allow_pickle=False) as data:
            files = set(data.files)
            xk = next((k for k in _X_KEYS if k in files), None)
            if xk is None:
                raise CLIError(
                    f"{path}: no feature array; expected one of {list(_X_KEYS)}, found "
                    f"{sorted(files)}"
                )
            yk = next((k for k in _Y_KEYS if k in files), None)
            X = np.asarray(data[xk])
            y = np.asarray(data[yk]) if yk is not None else None
    except CLIError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickled" in str(exc):
            raise CLIError(
                f"{path}: holds an array of Python objects, which nnrt does not read "
                f"(save plain numeric arrays with numpy.savez)"
            ) from None
        raise CLIError(f"{path}: cannot read as .npz: {exc}") from None
    except Exception as exc:
        raise CLIError(f"{path}: cannot read as .npz: {type(exc).__name__}: {exc}") from None
    if X.ndim > 2:
        X = X.reshape(X.shape[0], -1)
    _check_arrays(path, X, y)
    return X, (_labels(y) if y is not None else None)


def _model_file(path: str) -> None:
    """A model path must be a regular file holding a zip archive (what .npz is)."""
    _regular_file(path, "model file")
    if not zipfile.is_zipfile(path):
        raise CLIError(
            f"{path}: not an nnrt model file (not a zip archive; nnrt models are .npz files "
            f"written by net.save or nnrt train)"
        )


def _check_writable(path: str, flag: str = "--out") -> None:
    """Fail now, not after training, if ``path`` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CLIError(f"{flag} {path!r} is a directory; give a file name")
    if not os.path.isdir(directory):
        raise CLIError(f"{flag} {path!r}: directory {directory!r} does not exist")
    if os.path.exists(path) and not os.path.isfile(path):
        raise CLIError(f"{flag} {path!r} exists and is not a regular file")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".nnrt-write-test-"):
            pass
    except OSError as exc:
        raise CLIError(
            f"{flag} {path!r}: cannot write in {directory!r}: {exc.strerror or exc}"
        ) from None


def _make_optimizer(name: str, net: Any, lr: float, momentum: float, weight_decay: float) -> Any:
    from nnrt.registry import registry

    known = registry.optimizers()
    if name not in known:
        raise CLIError(
            f"--optimizer: unknown optimizer {name!r}; registered: {', '.join(sorted(known))}"
        )
    try:
        return registry.make_optimizer_from(
            name, net, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--optimizer {name}: {exc}") from exc


def _show_progress(args: argparse.Namespace) -> bool:
    """``--progress``/``--no-progress``, else on when stderr is a terminal (as fit)."""
    if args.progress is not None:
        return bool(args.progress)
    return sys.stderr is not None and sys.stderr.isatty()


def _progress(args: argparse.Namespace) -> bool | None:
    return args.progress  # None: on when stderr is a terminal


def _format_logs(logs: dict[str, list[float]], held_out: str = "val") -> str:
    """Last value of each metric; ``held_out="test"`` labels the validation data as
    the test set it is (``test_accuracy``, not ``val_accuracy``)."""
    return "  ".join(
        f"{held_out + k[3:] if k.startswith('val_') else k} {v[-1]:.4f}"
        for k, v in logs.items()
        if v
    )


def _plot(history: Any, path: str, title: str, held_out: str = "validation") -> str | None:
    """Training curves to ``path`` if matplotlib is importable; returns the path."""
    from nnrt.plotting import plot_history

    try:
        plot_history(history, path, title=title, val_label=held_out)
    except ImportError:
        return None
    return os.path.abspath(path)


# ------------------------------------------------------------------ verbs
def cmd_demo(args: argparse.Namespace) -> int:
    import nnrt
    from nnrt.datasets import load_digits

    if args.out:
        _check_writable(args.out)

    X, y = load_digits()
    X = (X / 16.0).astype(np.float32)  # pixel counts 0..16 -> [0, 1]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(X))
    n_test = int(round(len(X) * 0.2))
    test, train = order[:n_test], order[n_test:]
    spec = demo_layers()
    layers = build_layers(spec, X.shape[1])
    net = nnrt.Sequential(layers, seed=args.seed)
    print(
        f"nnrt {nnrt.__version__} demo: 8x8 handwritten digits (UCI via scikit-learn, "
        f"CC BY 4.0), {len(train)} train / {len(test)} test samples"
    )
    print(f"network: {spec}  ({sum(p.size for p in net.params().values())} parameters)")
    opt = nnrt.optim.Adam(net, lr=args.lr)
    t0 = time.perf_counter()
    history = net.fit(
        X[train],
        y[train],
        optimizer=opt,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation=(X[test], y[test]),
        # the held-out digits are the test set: the bar says so (test_accuracy)
        progress=False,
        callbacks=[nnrt.ProgressBar(held_out="test")] if _show_progress(args) else None,
    )
    seconds = time.perf_counter() - t0
    result = net.evaluate(X[test], y[test])
    print(
        f"trained {args.epochs} epochs in {seconds:.2f} s; "
        f"{_format_logs(history.history, held_out='test')}"
    )
    print(f"test accuracy: {100 * result['accuracy']:.2f}% ({len(test)} samples)")
    if args.out:
        net.save(args.out)
        _say(f"model written to {os.path.abspath(args.out)}")
    if not args.no_plot:
        where = _plot(history, args.plot, "nnrt demo: 8x8 digits", held_out="test")
        if where is None:
            print("matplotlib is not installed: no training-curve plot (pip install 'nnrt[plot]')")
        else:
            _say(f"training curve written to {where}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import nnrt

    _check_writable(args.out)
    X, y = load_data(args.data)
    if y is None:
        raise CLIError(f"{args.data}: no labels (an array named y, or the last CSV column)")
    layers = build_layers(demo_layers() if args.layers is None else args.layers, X.shape[1])
    net = nnrt.Sequential(layers, seed=args.seed, dtype=args.dtype)
    loss = args.loss or ("softmax_cross_entropy" if y.dtype.kind in "iu" else "mse")
    if loss == "mse" and y.ndim == 1:
        y = y.reshape(-1, 1)
    opt = _make_optimizer(args.optimizer, net, args.lr, args.momentum, args.weight_decay)
    if args.plot:  # fail before training, not after
        from nnrt.plotting import require_matplotlib

        require_matplotlib()
        _check_writable(args.plot, "--plot")
    t0 = time.perf_counter()
    history = net.fit(
        X,
        y,
        loss=loss,
        optimizer=opt,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation_split=args.validation_split,
        progress=_progress(args),
    )
    seconds = time.perf_counter() - t0
    print(
        f"trained {len(history.epoch)} epochs on {X.shape[0]} samples in {seconds:.2f} s; "
        f"{_format_logs(history.history)}"
    )
    net.save(args.out)
    _say(f"model written to {os.path.abspath(args.out)}")
    if args.plot:
        _say(f"training curve written to {_plot(history, args.plot, 'nnrt train')}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import nnrt

    _model_file(args.model)
    if args.out:
        _check_writable(args.out)
    net = nnrt.load(args.model)
    X, y = load_data(args.data, n_features=net.in_features)
    scores = net.predict(X, batch_size=args.batch_size)
    if args.scores:
        result = scores
    else:
        result = net.predict_classes(X, batch_size=args.batch_size)
    if args.out:
        if args.out.lower().endswith(".npy"):
            np.save(args.out, result)
        else:
            fmt = "%d" if result.dtype.kind in "iu" else "%.9g"
            np.savetxt(args.out, result.reshape(result.shape[0], -1), fmt=fmt, delimiter=",")
        _say(
            f"{result.shape[0]} predictions written to {os.path.abspath(args.out)}", file=sys.stderr
        )
    else:
        lines = []
        for row in result.reshape(result.shape[0], -1):
            lines.append(
                ",".join(str(int(v)) if result.dtype.kind in "iu" else f"{v:.6g}" for v in row)
            )
        sys.stdout.write("\n".join(lines) + "\n")
    if y is not None and y.ndim == 1 and y.dtype.kind in "iu":
        acc = float(np.mean(net.predict_classes(X, batch_size=args.batch_size) == y))
        _say(
            f"accuracy against the labels in {args.data}: {100 * acc:.2f}% ({X.shape[0]} samples)",
            file=sys.stderr,
        )
    return 0


def _param_count(spec: dict[str, Any]) -> int:
    return sum(math.prod(s) for s in spec.get("params", {}).values())


def _source(spec: dict[str, Any]) -> str:
    """``sigmoid (nnrt 0.1.0)``: the plugin, and its distribution when that differs."""
    plugin = spec.get("plugin") or "?"
    dist = spec.get("distribution")
    version = spec.get("version")
    if not dist:
        return str(plugin)
    where = " ".join(str(p) for p in (dist, version) if p)
    return str(plugin) if str(dist) == str(plugin) and not version else f"{plugin} ({where})"


def cmd_info(args: argparse.Namespace) -> int:
    import nnrt
    from nnrt.io import read_architecture

    if args.model:
        _model_file(args.model)
        arch = read_architecture(args.model)
        _say(f"model: {os.path.abspath(args.model)}")
        _say(
            f"written by nnrt {arch.get('nnrt_version')} (ABI {arch.get('abi_version')}, "
            f"file format {arch.get('format_version')}); this nnrt {nnrt.__version__} "
            f"(ABI {nnrt.ABI_VERSION})"
        )
        _say(f"dtype {arch['dtype']}, seed {arch.get('seed')}")
        total = 0
        print(f"{'#':>3}  {'layer':<14} {'params':>8}  config / from")
        for i, spec in enumerate(arch["layers"]):
            n = _param_count(spec)
            total += n
            cfg = ", ".join(f"{clean(k)}={clean(v)}" for k, v in spec["config"].items())
            _say(f"{i:>3}  {clean(spec['name']):<14} {n:>8}  {cfg}  [{clean(_source(spec))}]")
        print(f"total trainable parameters: {total}")
        from nnrt.summary import file_summary

        print("\nsummary:")
        for line in file_summary(args.model, args.batch_size).splitlines():
            print(clean(line))
        return 0
    # the installation: what a user pastes into a bug report (plugin statuses quote
    # third-party error messages: escaped like everything else)
    import io

    from nnrt.config import show_config

    buf = io.StringIO()
    show_config(buf, as_json=bool(getattr(args, "json", False)))
    for line in buf.getvalue().splitlines():
        print(clean(line))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from nnrt.registry import registry

    plugins = [*registry.plugins().values(), *registry.refused_plugins()]
    rows: list[tuple[str, ...]] = [("plugin", "distribution", "layers", "status", "source")]
    for p in plugins:
        dist = f"{p.dist} {p.version}" if p.dist else "-"
        row = (p.name, dist, ", ".join(p.layers) or "-", p.status, p.source)
        rows.append(tuple(clean(c) for c in row))  # metadata of installed packages
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
    return 0


# ------------------------------------------------------------------ parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {value}")
    return value


def _float_in(low: float, high: float | None, what: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value) and value >= low and (high is None or value < high)
        if not ok or (low == 0.0 and what.startswith("positive") and value == 0.0):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_POSITIVE = _float_in(0.0, None, "positive and finite")
_NON_NEGATIVE = _float_in(0.0, None, "finite and >= 0")
_FRACTION = _float_in(0.0, 1.0, "in [0, 1)")


def _open_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line after the usage, control characters escaped."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {clean(' '.join(message.split()))}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nnrt", description="nnrt: a small, fast neural-network runtime for the CPU."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show tracebacks on errors",
        )

    def progress_flags(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument(
            "--progress",
            dest="progress",
            action="store_true",
            default=None,
            help="show a progress bar (default: when stderr is a terminal)",
        )
        g.add_argument(
            "--no-progress", dest="progress", action="store_false", help="no progress bar"
        )

    p = sub.add_parser("demo", help="train on the bundled 8x8 digits and print test accuracy")
    p.add_argument("--epochs", type=_positive_int, default=20)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=_POSITIVE, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--plot",
        default="nnrt-demo.png",
        help="training-curve PNG (needs matplotlib; default: nnrt-demo.png)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--out", help="also save the trained model here (.npz)")
    progress_flags(p)
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "train",
        help="train a network on a .npz/.csv file and save it",
        description="Train a network on a .npz or .csv file and save it.",
        epilog=LAYERS_GRAMMAR + "\n" + DATA_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data", required=True, help=".npz with X and y, or .csv (last column: label); see below"
    )
    p.add_argument(
        "--layers",
        default=None,
        help="NAME[:WIDTH][:KEY=VALUE]... comma-separated, see below (default: the demo "
        "network, the default hidden block of width 64 and dense:10)",
    )
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=_POSITIVE, default=1e-3)
    p.add_argument(
        "--optimizer",
        default="adam",
        help="a registered optimizer: adam (default), adamw, sgd, or a plugin's (nnrt plugins)",
    )
    p.add_argument("--momentum", type=_FRACTION, default=0.0, help="SGD momentum, in [0, 1)")
    p.add_argument("--weight-decay", type=_NON_NEGATIVE, default=0.0)
    p.add_argument(
        "--loss",
        default=None,
        help="a registered loss: softmax_cross_entropy (default for integer labels), mse, "
        "bce_with_logits, or a plugin's (nnrt plugins)",
    )
    p.add_argument(
        "--validation-split",
        type=_open_fraction,
        default=None,
        help="hold out this fraction of the samples, in (0, 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", default="model.npz", help="where to save the model (default model.npz)")
    p.add_argument("--plot", help="also write the training curves to this image (.png, .svg, ...)")
    progress_flags(p)
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "predict",
        help="predict with a saved model",
        description="Predict with a saved model.",
        epilog=DATA_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model")
    p.add_argument("data", help=".npz with X, or .csv; see below")
    p.add_argument("--scores", action="store_true", help="output scores instead of classes")
    p.add_argument("--batch-size", type=_positive_int, default=1024)
    p.add_argument("--out", help="write to this file (.npy, else CSV) instead of stdout")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="describe a model file, or this installation")
    p.add_argument("model", nargs="?")
    common(p)
    p.add_argument("--json", action="store_true", help="installation info as JSON")
    p.add_argument(
        "--batch-size", type=_positive_int, default=32, help="batch for activation memory"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plugins", help="list installed plugins and their layers")
    common(p)
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nnrt`` command; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # an unknown flag after a command: that command's usage, not the top-level one
        sub = _subparser(parser, getattr(args, "command", None))
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        import nnrt

        print(f"nnrt {nnrt.__version__}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("nnrt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        msg = clean(" ".join(msg.split()))  # one line, nothing a terminal would act on
        kind = "" if isinstance(exc, CLIError) else f" ({type(exc).__name__})"
        print(f"nnrt: error: {msg or type(exc).__name__}{kind}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings as one line ``nnrt: warning: <Category>: <message>``: on the command
    line there is no user source line to point at, and plugin text is escaped."""
    text = clean(" ".join(str(message).split()))
    print(f"nnrt: warning: {category.__name__}: {text}", file=file or sys.stderr)


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> Any:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command is not None:
            return action.choices.get(command)
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
