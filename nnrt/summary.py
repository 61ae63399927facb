"""``net.summary()``: one row per layer, totals, memory and forward FLOPs.

``summary(net, batch_size=32)`` returns a :class:`ModelSummary`: ``str()`` of it
is the table (also its ``repr``, so ``net.summary()`` shows itself at a prompt),
``.layers`` is the same information as a list of dicts for programs, ``.totals``
a dict of the totals, ``.to_dict()`` both (JSON-able). It never prints unless
asked: ``net.summary(print_fn=print)`` (or ``print_fn=logger.info``) hands each
line of the table to ``print_fn``, as Keras' ``summary(print_fn=...)`` does.

What the columns count:

* **out**: the layer's output width (a layer with ``out_features = None`` keeps
  its input width);
* **params** / **buffers**: elements in ``layer.params()`` / ``layer.buffers()``;
* **FLOPs/sample**: forward (evaluation mode) floating-point operations for one
  sample, a multiply-add counting as 2. Each layer's count comes from the
  ``nnrt_layer_flops`` hook of the plugin that knows it (the core answers for
  ``dense``: ``2*in*out + out``; the built-in plugins for theirs). A layer no
  plugin answers for is counted as one FLOP per output element and marked
  ``~`` (an estimate; ``flops_estimated`` in the structured form);
* **memory**: parameters and buffers in float32 and float64; activations are the
  outputs of every layer for one batch of ``batch_size`` samples (what a
  training forward keeps for backward), in float32 and float64.

Names in the table come from the registry and may come from a model file: control
characters are escaped (``\\x1b``), long names shortened; ``.layers`` holds them
unchanged.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nnrt._network import Network
from nnrt.io import MissingPluginError, load
from nnrt.registry import PluginError, registry

__all__ = ["ModelSummary", "escape", "file_summary", "layer_flops", "summary"]

_ITEMSIZE = {"float32": 4, "float64": 8}
_MAX_NAME = 40


def escape(text: object, limit: int | None = None) -> str:
    """``text`` with every control / format / separator character escaped, e.g. ``\\x1b``.

    A terminal then shows what a model file holds instead of obeying it
    (colour changes, cursor moves, erased lines). ``limit`` shortens the result
    to that many characters, ending it with ``…``.
    """
    out = []
    for ch in str(text):
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            code = ord(ch)
            out.append(
                f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
        else:
            out.append(ch)
    result = "".join(out)
    if limit is not None and len(result) > limit:
        result = result[: max(limit - 1, 0)] + "…"
    return result


def _count(arrays: dict[str, Any]) -> int:
    return int(sum(int(np.size(a)) for a in arrays.values()))


def _check_flops(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PluginError(
            f"nnrt_layer_flops returned {value!r} for layer type {name!r}; "
            f"expected a non-negative int or None"
        )
    return int(value)


def layer_flops(layer: Any, in_features: int) -> tuple[int, bool]:
    """(forward FLOPs per sample, estimated?) of ``layer`` fed ``in_features`` columns.

    Asks the plugins (hook ``nnrt_layer_flops``); when none answers, counts one
    FLOP per output element and returns ``estimated=True``.
    """
    registry.ensure_loaded()
    result = registry.pm.hook.nnrt_layer_flops(layer=layer, in_features=int(in_features))
    if result is not None:
        return _check_flops(result, registry.name_of(type(layer)) or type(layer).__name__), False
    out = layer.out_features
    return int(out if out is not None else in_features), True


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _both(count: int) -> str:
    return f"{_bytes(4 * count)} float32 / {_bytes(8 * count)} float64"


@dataclass
class ModelSummary:
    """What ``net.summary()`` returns: ``str()`` is the table, ``layers`` / ``totals`` the data.

    ``layers``: one dict per layer with ``index``, ``name`` (registered name, or
    ``<ClassName>`` for an unregistered class), ``plugin`` (None when
    unregistered), ``class``, ``in_features`` / ``out_features`` (the widths the
    layer sees in this network; None where unknown), ``params`` / ``buffers``
    (element counts), ``param_shapes`` / ``buffer_shapes``, ``flops`` (forward,
    per sample; None where the width is unknown) and ``flops_estimated``.
    ``totals``: ``params``, ``buffers``, ``flops``, ``flops_estimated``,
    ``activations`` (values per batch), and ``bytes``: float32/float64 sizes of
    ``params``, ``buffers`` and ``activations``.
    """

    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    batch_size: int
    dtype: str
    in_features: int | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"layers": [...], "totals": {...}, "batch_size", "dtype", "in_features"}``."""
        return {
            "layers": [dict(row) for row in self.layers],
            "totals": dict(self.totals),
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "in_features": self.in_features,
        }

    def lines(self) -> list[str]:
        """The table, one string per line."""
        head = ("#", "layer", "plugin", "out", "params", "buffers", "FLOPs/sample")
        rows = [head]
        for r in self.layers:
            flops = "?" if r["flops"] is None else f"{r['flops']:,}"
            if r["flops_estimated"] and r["flops"] is not None:
                flops = "~" + flops
            rows.append(
                (
                    str(r["index"]),
                    escape(r["name"], _MAX_NAME),
                    escape(r["plugin"] if r["plugin"] is not None else "-", _MAX_NAME),
                    "?" if r["out_features"] is None else str(r["out_features"]),
                    f"{r['params']:,}",
                    f"{r['buffers']:,}",
                    flops,
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
        left = {1, 2}
        table = [
            "  ".join(
                cell.ljust(widths[c]) if c in left else cell.rjust(widths[c])
                for c, cell in enumerate(row)
            ).rstrip()
            for row in rows
        ]
        rule = "-" * max(len(line) for line in table)
        t = self.totals
        width = "?" if self.in_features is None else str(self.in_features)
        flops_total = f"{t['flops']:,}" + (
            " (~: estimated, see nnrt.summary)" if t["flops_estimated"] else ""
        )
        out = [
            f"Sequential: {len(self.layers)} layers, {self.dtype}, input width {width}",
            rule,
            table[0],
            rule,
            *table[1:],
            rule,
            f"parameters:  {t['params']:,} ({_both(t['params'])})",
            f"buffers:     {t['buffers']:,} ({_both(t['buffers'])})",
            f"activations: {t['activations']:,} values at batch size {self.batch_size} "
            f"({_both(t['activations'])})",
            f"forward FLOPs per sample: {flops_total}",
        ]
        out.extend(self.notes)
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def __repr__(self) -> str:
        return str(self)


def summary(
    net: Network,
    batch_size: int = 32,
    *,
    in_features: int | None = None,
    print_fn: Callable[[str], Any] | None = None,
) -> ModelSummary:
    """Describe ``net`` (see the module docstring); ``print_fn(line)`` per line if given.

    ``batch_size`` sets the batch the activation memory is counted for;
    ``in_features`` gives the input width of a network whose first layers keep
    the width (e.g. one that starts with ``sigmoid``), which it cannot know.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"summary: batch_size must be a positive int, got {batch_size!r}")
    if in_features is not None and (
        isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1
    ):
        raise ValueError(f"summary: in_features must be a positive int, got {in_features!r}")
    first = net.in_features
    if first is not None and in_features is not None and first != in_features:
        raise ValueError(
            f"summary: in_features={in_features}, but layer 0 {net.layers[0]!r} takes {first}"
        )
    width: int | None = first if first is not None else in_features
    rows: list[dict[str, Any]] = []
    entries = registry.layers()
    for i, layer in enumerate(net.layers):
        cls = type(layer)
        name = registry.name_of(cls)
        plugin = entries[name].plugin if name is not None else None
        n_in = layer.in_features if layer.in_features is not None else width
        n_out = layer.out_features if layer.out_features is not None else n_in
        flops: int | None
        if n_in is None:
            flops, estimated = None, False
        else:
            flops, estimated = layer_flops(layer, int(n_in))
        params, buffers = layer.params(), layer.buffers()
        rows.append(
            {
                "index": i,
                "name": name if name is not None else f"<{cls.__qualname__}>",
                "plugin": plugin,
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "in_features": None if n_in is None else int(n_in),
                "out_features": None if n_out is None else int(n_out),
                "params": _count(params),
                "buffers": _count(buffers),
                "param_shapes": {k: [int(d) for d in np.shape(v)] for k, v in params.items()},
                "buffer_shapes": {k: [int(d) for d in np.shape(v)] for k, v in buffers.items()},
                "flops": flops,
                "flops_estimated": estimated,
            }
        )
        width = None if n_out is None else int(n_out)
    n_params = sum(r["params"] for r in rows)
    n_buffers = sum(r["buffers"] for r in rows)
    activations = batch_size * sum(r["out_features"] or 0 for r in rows)
    notes = []
    if any(r["out_features"] is None for r in rows):
        notes.append(
            "?: width unknown (the first layers keep their input width): "
            "pass summary(in_features=...)"
        )
    totals: dict[str, Any] = {
        "params": n_params,
        "buffers": n_buffers,
        "flops": sum(r["flops"] or 0 for r in rows),
        "flops_estimated": any(r["flops_estimated"] for r in rows),
        "activations": activations,
        "bytes": {
            kind: {dt: size * count for dt, size in _ITEMSIZE.items()}
            for kind, count in (
                ("params", n_params),
                ("buffers", n_buffers),
                ("activations", activations),
            )
        },
    }
    result = ModelSummary(
        layers=rows,
        totals=totals,
        batch_size=batch_size,
        dtype=net.dtype.name,
        in_features=None if rows[0]["in_features"] is None else rows[0]["in_features"],
        notes=notes,
    )
    if print_fn is not None:
        for line in result.lines():
            print_fn(line)
    return result


def file_summary(path: Any, batch_size: int = 32) -> str:
    """The summary table of the model file ``path`` (for ``nnrt info model.npz``).

    A file whose layer types are not all installed cannot be built: the text
    then says which plugin is missing instead of a table.
    """
    try:
        net = load(path)
    except MissingPluginError as exc:
        return f"no summary: {escape(exc, 300)}"
    return str(summary(net, batch_size))
