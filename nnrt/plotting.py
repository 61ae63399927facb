"""Training curves: ``plot_history(history, path=None)`` (also ``History.plot``).

One panel per quantity: the loss and every metric ``fit`` recorded, each with
its training curve and, when there was validation data, its validation curve
(``"val_<name>"``), against the epoch (1-based). Needs matplotlib, the ``plot``
extra: ``pip install "nnrt[plot]"``.

With ``path`` the figure is written there (format from the suffix: ``.png``,
``.svg``, ``.pdf``, ...) through matplotlib's object-oriented API, so no GUI
backend or pyplot state is touched; the image is ``PANEL_SIZE[0] * dpi`` pixels
wide per panel and ``PANEL_SIZE[1] * dpi`` high. Without ``path`` the figure is
made with pyplot, so that ``plt.show()`` or a notebook displays it. Either way
the ``matplotlib.figure.Figure`` is returned.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["PANEL_SIZE", "plot_history", "require_matplotlib"]

#: (width, height) of one panel in inches
PANEL_SIZE = (4.0, 3.0)

_MISSING = (
    'plotting training curves needs matplotlib, which is not installed: pip install "nnrt[plot]"'
)


def require_matplotlib() -> None:
    """Raise ImportError naming ``pip install "nnrt[plot]"`` unless matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING) from exc


def _series(history: Any) -> tuple[list[int], Mapping[str, list[float]]]:
    logs = getattr(history, "history", history)
    if not isinstance(logs, Mapping):
        raise TypeError(
            f"plot_history: expected an nnrt.History or a dict of per-epoch lists, "
            f"got {type(history).__name__}"
        )
    logs = {str(k): [float(v) for v in vals] for k, vals in logs.items() if len(vals)}
    if not logs:
        raise ValueError("plot_history: the history is empty (no epoch ran): nothing to plot")
    n = max(len(v) for v in logs.values())
    epochs = list(getattr(history, "epoch", []) or [])
    if len(epochs) != n:
        epochs = list(range(n))
    return [int(e) + 1 for e in epochs], logs


def _panels(logs: Mapping[str, list[float]]) -> list[str]:
    """Base names in display order: loss first, then metrics as recorded."""
    names: list[str] = []
    for key in logs:
        base = key[4:] if key.startswith("val_") else key
        if base not in names:
            names.append(base)
    if "loss" in names:
        names.remove("loss")
        names.insert(0, "loss")
    return names


def plot_history(
    history: Any,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    dpi: int = 100,
    val_label: str = "validation",
) -> Any:
    """Plot every curve of ``history`` (an ``nnrt.History`` or its ``.history`` dict).

    Returns the ``matplotlib.figure.Figure``; with ``path`` also writes it there
    (see the module docstring). ``val_label`` names the held-out curves in the
    legend (``"test"`` when the validation data is a test set). Raises ImportError
    naming ``nnrt[plot]`` when matplotlib is missing and ValueError for an empty
    history.
    """
    epochs, logs = _series(history)
    panels = _panels(logs)
    try:
        if path is None:
            import matplotlib.pyplot as plt

            fig = plt.figure()
        else:
            from matplotlib.figure import Figure

            fig = Figure()
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    fig.set_size_inches(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1])
    fig.set_dpi(dpi)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, base in zip(axes, panels, strict=True):
        for key, label, style in ((base, "train", "-"), (f"val_{base}", val_label, "--")):
            if key in logs:
                values = logs[key]
                ax.plot(epochs[: len(values)], values, style, marker=".", label=label)
        ax.set_title(base)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig
