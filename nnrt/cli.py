"""The ``nnrt`` command (console script and ``python -m nnrt``).

    nnrt demo                      train on the bundled 8x8 digits, print test accuracy
    nnrt train --data d.npz --layers "dense_nobias:64,batchnorm,sigmoid,dense:10" --out m.npz
    nnrt predict m.npz d.npz       print predicted classes (or --scores, --out file)
    nnrt info [m.npz]              a model's architecture, or nnrt/ABI/BLAS/plugins
    nnrt plugins                   installed plugins, their layers and distributions

Errors are one line on stderr (``nnrt: error: ...``) and a non-zero exit status;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["build_layers", "load_data", "main", "parse_layers"]

DEMO_LAYERS = "dense_nobias:64,batchnorm,sigmoid,dense:10"


class CLIError(Exception):
    """An error to report as one line (bad arguments, unreadable data)."""


# ------------------------------------------------------------------ helpers
def _parse_value(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_layers(spec: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """``"dense_nobias:64,batchnorm,sigmoid,dense:10"`` -> [(name, args, kwargs), ...].

    Arguments follow the name after ``:`` (``name:a:b``), keyword arguments as
    ``key=value`` (``batchnorm:momentum=0.2``).
    """
    out = []
    for token in spec.split(","):
        token = token.strip()
        if not token:
            raise CLIError(f"--layers {spec!r}: empty layer entry")
        name, *rest = token.split(":")
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for part in rest:
            if "=" in part:
                k, v = part.split("=", 1)
                kwargs[k.strip()] = _parse_value(v.strip())
            else:
                args.append(_parse_value(part.strip()))
        out.append((name.strip(), args, kwargs))
    return out


def build_layers(spec: str, in_features: int) -> list[Any]:
    """Layers from a ``--layers`` string; each layer's input width is inferred.

    A layer is built as ``name(width, *args)`` when that works and takes
    ``width`` inputs (dense, batchnorm, ...), else as ``name(*args)`` (sigmoid).
    """
    import nnrt

    layers = []
    width = in_features
    for name, args, kwargs in parse_layers(spec):
        if name not in nnrt.available_layers():
            known = ", ".join(sorted(nnrt.available_layers()))
            raise CLIError(f"--layers: unknown layer {name!r}; available: {known}")
        layer = None
        errors = []
        for attempt in ((width, *args), tuple(args)):
            try:
                candidate = nnrt.layer(name, *attempt, **kwargs)
            except (TypeError, ValueError) as exc:
                errors.append(f"{name}{attempt}: {exc}")
                continue
            if candidate.in_features not in (None, width):
                errors.append(f"{name}{attempt}: takes {candidate.in_features} inputs, not {width}")
                continue
            layer = candidate
            break
        if layer is None:
            raise CLIError(f"--layers: cannot build {name!r} after width {width}: {errors[-1]}")
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


def load_data(path: str, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, y) from ``.npz`` (arrays ``X`` and ``y``; y optional) or ``.csv``.

    CSV: comma-separated numbers, an optional header row; the last column is
    the label unless ``n_features`` says every column is a feature.
    """
    if not os.path.exists(path):
        raise CLIError(f"data file {path!r} does not exist")
    if path.lower().endswith(".csv"):
        try:
            with open(path, encoding="utf-8") as fh:
                first = fh.readline()
            skip = 0
            try:
                [float(v) for v in first.strip().split(",")]
            except ValueError:
                skip = 1  # a header row
            table = np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
        except (ValueError, OSError) as exc:
            raise CLIError(f"{path}: cannot read as CSV of numbers: {exc}") from exc
        if n_features is not None and table.shape[1] == n_features:
            return table, None
        if table.shape[1] < 2:
            raise CLIError(f"{path}: needs feature columns and a label column, got 1 column")
        return table[:, :-1], _labels(table[:, -1])
    try:
        with np.load(path, allow_pickle=False) as data:
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
    except Exception as exc:
        raise CLIError(f"{path}: cannot read as .npz: {type(exc).__name__}: {exc}") from exc
    if X.ndim != 2:
        X = X.reshape(X.shape[0], -1) if X.ndim > 2 else X
    return X, (_labels(y) if y is not None else None)


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


def _progress(args: argparse.Namespace) -> bool | None:
    return args.progress  # None: on when stderr is a terminal


def _format_logs(logs: dict[str, list[float]]) -> str:
    return "  ".join(f"{k} {v[-1]:.4f}" for k, v in logs.items() if v)


def _plot(history: Any, path: str, title: str) -> str | None:
    """Training curves to ``path`` (PNG) if matplotlib is importable; returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    h = history.history
    epochs = [e + 1 for e in history.epoch]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", axes[0]), ("accuracy", axes[1])):
        for k in (key, f"val_{key}"):
            if k in h:
                ax.plot(
                    epochs,
                    h[k],
                    marker=".",
                    label=k.replace("val_", "test ") if k.startswith("val_") else f"train {k}",
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.abspath(path)


# ------------------------------------------------------------------ verbs
def cmd_demo(args: argparse.Namespace) -> int:
    import nnrt
    from nnrt.datasets import load_digits

    X, y = load_digits()
    X = (X / 16.0).astype(np.float32)  # pixel counts 0..16 -> [0, 1]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(X))
    n_test = int(round(len(X) * 0.2))
    test, train = order[:n_test], order[n_test:]
    layers = build_layers(DEMO_LAYERS, X.shape[1])
    net = nnrt.Sequential(layers, seed=args.seed)
    print(
        f"nnrt {nnrt.__version__} demo: 8x8 handwritten digits (UCI via scikit-learn, "
        f"CC BY 4.0), {len(train)} train / {len(test)} test samples"
    )
    print(f"network: {DEMO_LAYERS}  ({sum(p.size for p in net.params().values())} parameters)")
    opt = nnrt.optim.Adam(net, lr=args.lr)
    t0 = time.perf_counter()
    history = net.fit(
        X[train],
        y[train],
        optimizer=opt,
        epochs=args.epochs,
        batch_size=args.batch_size,
        validation=(X[test], y[test]),
        progress=_progress(args),
    )
    seconds = time.perf_counter() - t0
    result = net.evaluate(X[test], y[test])
    print(f"trained {args.epochs} epochs in {seconds:.2f} s; {_format_logs(history.history)}")
    print(f"test accuracy: {100 * result['accuracy']:.2f}% ({len(test)} samples)")
    if args.out:
        net.save(args.out)
        print(f"model written to {os.path.abspath(args.out)}")
    if not args.no_plot:
        where = _plot(history, args.plot, "nnrt demo: 8x8 digits")
        if where is None:
            print("matplotlib is not installed: no training-curve plot (pip install 'nnrt[plot]')")
        else:
            print(f"training curve written to {where}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import nnrt

    X, y = load_data(args.data)
    if y is None:
        raise CLIError(f"{args.data}: no labels (an array named y, or the last CSV column)")
    layers = build_layers(args.layers, X.shape[1])
    net = nnrt.Sequential(layers, seed=args.seed, dtype=args.dtype)
    loss = args.loss or ("softmax_cross_entropy" if y.dtype.kind in "iu" else "mse")
    if loss == "mse" and y.ndim == 1:
        y = y.reshape(-1, 1)
    opt = _make_optimizer(args.optimizer, net, args.lr, args.momentum, args.weight_decay)
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
    print(f"model written to {os.path.abspath(args.out)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import nnrt

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
        print(
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
        print(
            f"accuracy against the labels in {args.data}: {100 * acc:.2f}% ({X.shape[0]} samples)",
            file=sys.stderr,
        )
    return 0


def _param_count(spec: dict[str, Any]) -> int:
    return sum(math.prod(s) for s in spec.get("params", {}).values())


def cmd_info(args: argparse.Namespace) -> int:
    import nnrt
    from nnrt.io import read_architecture

    if args.model:
        arch = read_architecture(args.model)
        print(f"model: {os.path.abspath(args.model)}")
        print(
            f"written by nnrt {arch.get('nnrt_version')} (ABI {arch.get('abi_version')}, "
            f"file format {arch.get('format_version')}); this nnrt {nnrt.__version__} "
            f"(ABI {nnrt.ABI_VERSION})"
        )
        print(f"dtype {arch['dtype']}, seed {arch.get('seed')}")
        total = 0
        print(f"{'#':>3}  {'layer':<14} {'params':>8}  config / from")
        for i, spec in enumerate(arch["layers"]):
            n = _param_count(spec)
            total += n
            cfg = ", ".join(f"{k}={v}" for k, v in spec["config"].items())
            src = spec.get("plugin") or "?"
            if spec.get("distribution"):
                src += f" ({spec['distribution']} {spec.get('version') or ''})".rstrip()
            print(f"{i:>3}  {spec['name']:<14} {n:>8}  {cfg}  [{src}]")
        print(f"total trainable parameters: {total}")
        return 0
    # the installation: what a user pastes into a bug report
    from nnrt.config import show_config

    show_config(as_json=bool(getattr(args, "json", False)))
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from nnrt.registry import registry

    plugins = registry.plugins()
    rows = [("plugin", "distribution", "layers", "status", "source")]
    for p in plugins.values():
        dist = f"{p.dist} {p.version}" if p.dist else "-"
        rows.append((p.name, dist, ", ".join(p.layers) or "-", p.status, p.source))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4])
    return 0


# ------------------------------------------------------------------ parser
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnrt", description="nnrt: a small, fast neural-network runtime for the CPU."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
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

    p = sub.add_parser("train", help="train a network on a .npz/.csv file and save it")
    p.add_argument("--data", required=True, help=".npz with X and y, or .csv (last column: label)")
    p.add_argument(
        "--layers",
        default=DEMO_LAYERS,
        help=f'comma-separated name[:arg...] (default "{DEMO_LAYERS}")',
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--optimizer",
        default="adam",
        help="a registered optimizer: adam (default), adamw, sgd, or a plugin's (nnrt plugins)",
    )
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--loss",
        default=None,
        help="a registered loss: softmax_cross_entropy (default for integer labels), mse, "
        "bce_with_logits, or a plugin's (nnrt plugins)",
    )
    p.add_argument("--validation-split", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", default="model.npz", help="where to save the model (default model.npz)")
    progress_flags(p)
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict with a saved model")
    p.add_argument("model")
    p.add_argument("data", help=".npz with X, or .csv")
    p.add_argument("--scores", action="store_true", help="output scores instead of classes")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--out", help="write to this file (.npy, else CSV) instead of stdout")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="describe a model file, or this installation")
    p.add_argument("model", nargs="?")
    common(p)
    p.add_argument("--json", action="store_true", help="installation info as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plugins", help="list installed plugins and their layers")
    common(p)
    p.set_defaults(func=cmd_plugins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nnrt`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        import nnrt

        print(f"nnrt {nnrt.__version__}")
        return 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("nnrt: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        msg = " ".join(msg.split())  # one line
        kind = "" if isinstance(exc, CLIError) else f" ({type(exc).__name__})"
        print(f"nnrt: error: {msg}{kind}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
