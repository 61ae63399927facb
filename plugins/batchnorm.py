"""Plugin: batch normalisation ``batchnorm`` (torch.nn.BatchNorm1d semantics).

Also checks networks (hook ``nnrt_check_network``): a ``dense`` layer with a
bias right before a ``batchnorm`` gets an ``nnrt.BiasBeforeBatchNormWarning``.

Folding (hook ``nnrt_fold_pair``, used by ``net.fold()``): in eval mode
BatchNorm is a per-feature affine map with the running statistics::

    s = gamma / sqrt(running_var + eps)
    BN(z) = (z - running_mean) * s + beta

so for ``z = X @ W + b`` (``b = 0`` for ``dense_nobias``)::

    BN(z) = X @ (W * s) + ((b - running_mean) * s + beta)      (s scales W's columns)

and a ``dense``/``dense_nobias`` followed by ``batchnorm`` becomes one ``dense``
with ``W' = W * s`` and ``b' = (b - running_mean) * s + beta``, computed in
float64 (the network then casts it to its dtype).

Fusion (hook ``nnrt_fuse_pair``): a ``batchnorm`` followed by a ``sigmoid``
runs in ``Sequential``'s compiled loop as one sweep over the array (forward
``sigmoid(bn(x))``; backward without the array between them).

ONNX: ``BatchNormalization`` in inference mode. torch: ``nn.BatchNorm1d(n,
eps, momentum)`` (``affine=True``, tracking running statistics) with
``gamma``/``beta`` = ``weight``/``bias`` and the running statistics.
``num_batches_tracked`` has no nnrt counterpart: it is dropped on import and
0 on export (it only matters for ``momentum=None``, which nnrt does not have).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, cast

import numpy as np

import nnrt.fold
from nnrt.dense import Dense
from nnrt.hookspecs import RegisterLayer, RegisterWarning, hookimpl
from nnrt.network import Sequential
from nnrt.warnings import NetworkWarning, warn_user
from nnrt_plugins._batchnorm import BatchNorm
from nnrt_plugins._dense_nobias import DenseNoBias
from nnrt_plugins._sigmoid import Sigmoid

if TYPE_CHECKING:
    from nnrt.hookspecs import OnnxExportContext, TorchModule
    from nnrt.layer import Layer

__all__ = [
    "BatchNorm",
    "BiasBeforeBatchNormWarning",
    "check_running_stats",
    "fold_batchnorm",
    "fold_into_dense",
    "from_torch_module",
    "nnrt_check_network",
    "nnrt_check_state",
    "nnrt_default_block",
    "nnrt_fold_pair",
    "nnrt_from_torch",
    "nnrt_fuse_pair",
    "nnrt_layer_flops",
    "nnrt_onnx_export",
    "nnrt_register_layers",
    "nnrt_register_warnings",
    "nnrt_to_torch",
    "onnx_export_node",
    "to_torch_module",
]


class BiasBeforeBatchNormWarning(NetworkWarning):
    """A ``dense`` layer with a bias feeds a ``batchnorm`` layer: the bias does nothing.

    BatchNorm subtracts the per-feature batch mean right after the dense layer.
    For ``x = u + b`` (``u = X @ W``, ``b`` the bias) the normalised value is
    ``x - E[x] = u + b - (E[u] + b) = u - E[u]``: the bias cancels exactly, in
    training (batch mean) and in eval (the running mean absorbs it too), so it
    receives a gradient whose effect on the output is zero. Ioffe & Szegedy
    make this argument in the BatchNorm paper (2015, section 2: "the
    combination of the update to b and subsequent change in normalization led
    to no change in the output of the layer nor, consequently, the loss") and
    drop the bias in section 3.2: "the bias b can be ignored since its effect
    will be canceled by the subsequent mean subtraction (the role of the bias
    is subsumed by beta)". BatchNorm's learned shift ``beta`` does what the
    bias would have done.

    The network still works; the bias wastes parameters, optimizer state and
    time, and weight decay or a bias that drifts with the running mean make it
    misleading. Use ``dense_nobias`` instead of ``dense`` before ``batchnorm``.
    Silence with ``warnings.filterwarnings("ignore",
    category=nnrt.BiasBeforeBatchNormWarning)``.
    """


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("batchnorm", BatchNorm)


@hookimpl
def nnrt_register_warnings(register: RegisterWarning) -> None:
    """``nnrt.BiasBeforeBatchNormWarning`` is this module's class."""
    register(BiasBeforeBatchNormWarning)


@hookimpl
def nnrt_check_network(net: Sequential) -> None:
    # NOTE: only direct adjacency: a sigmoid (or anything non-affine) in between
    # makes the bias meaningful again.
    layers = net.layers
    for i in range(1, len(layers)):
        prev, bn = layers[i - 1], layers[i]
        if not isinstance(bn, BatchNorm) or "bias" not in prev.params():
            continue
        warn_user(
            f"layer {i - 1} {prev!r} has a bias and feeds layer {i} {bn!r}: BatchNorm "
            f"subtracts the batch mean, which cancels the bias, and its beta does the "
            f"bias's job; use 'dense_nobias' instead of 'dense' here "
            f"(see help(nnrt.BiasBeforeBatchNormWarning))",
            BiasBeforeBatchNormWarning,
        )


@hookimpl
def nnrt_default_block() -> tuple[str, ...]:
    """nnrt's default hidden block: ``dense_nobias -> batchnorm -> sigmoid`` (no bias
    before the normalisation: see ``BiasBeforeBatchNormWarning``)."""
    return ("dense_nobias", "batchnorm", "sigmoid")


def check_running_stats(layer: Layer, state: dict[str, Any]) -> None:
    """Running statistics a batch-normalisation layer may be given: finite, variance >= 0."""
    for name in ("running_mean", "running_var"):
        arr = state.get(name)
        if arr is None:
            continue
        arr = np.asarray(arr)
        if not np.isfinite(arr).all():
            raise ValueError(f"{layer!r}: {name} contains NaN or Inf")
        if name == "running_var" and (arr < 0).any():
            raise ValueError(
                f"{layer!r}: running_var must be >= 0 (a variance), got minimum {float(arr.min())!r}"
            )


@hookimpl
def nnrt_check_state(layer: Layer, state: dict[str, Any]) -> None:
    if type(layer) is BatchNorm:
        check_running_stats(layer, state)


@hookimpl
def nnrt_onnx_export(layer: Layer, input: str, ctx: OnnxExportContext) -> str | None:
    """ONNX: ``BatchNormalization`` in inference mode (running statistics)."""
    if type(layer) is not BatchNorm:
        return None
    return onnx_export_node(layer, input, ctx)


def onnx_export_node(layer: Layer, input: str, ctx: OnnxExportContext) -> str:
    """The ONNX ``BatchNormalization`` node (inference mode) of the batch-normalisation
    ``layer``; returns its output's name."""
    p, b = layer.params(), layer.buffers()
    scale = ctx.add_initializer("gamma", p["gamma"])
    bias = ctx.add_initializer("beta", p["beta"])
    mean = ctx.add_initializer("running_mean", b["running_mean"])
    cfg = layer.config()
    eps = float(cfg["eps"])
    # NOTE: ONNX stores the epsilon attribute as float32; the rounding (~5e-11
    # for 1e-3) is moved into running_var so that var + epsilon is exact in a
    # float64 graph too.
    eps32 = float(np.float32(eps))
    var = ctx.add_initializer(
        "running_var", np.asarray(b["running_var"], dtype=np.float64) + (eps - eps32)
    )
    return ctx.add_node(
        "BatchNormalization",
        [input, scale, bias, mean, var],
        epsilon=eps32,
        momentum=1.0 - float(cfg["momentum"]),
    )[0]


@hookimpl
def nnrt_layer_flops(layer: Layer, in_features: int) -> int | None:
    """FLOPs: eval folds the statistics into a scale and a shift: ``x * a + b``."""
    if type(layer) is not BatchNorm:
        return None
    return 2 * in_features


def fold_into_dense(dense: Layer, bn: Layer) -> Dense:
    """A new float64 ``dense`` equal in eval mode to ``dense`` (a ``dense`` or
    ``dense_nobias``) followed by the batch normalisation ``bn`` (see the module
    docstring for the formula)."""
    p = dense.params()
    W = np.asarray(p["weight"], dtype=np.float64)
    b = np.asarray(p["bias"], dtype=np.float64) if "bias" in p else np.zeros(W.shape[1])
    g, buf = bn.params(), bn.buffers()
    eps = float(bn.config()["eps"])
    scale = np.asarray(g["gamma"], np.float64) / np.sqrt(
        np.asarray(buf["running_var"], np.float64) + eps
    )
    folded = Dense(W.shape[0], W.shape[1])
    out = folded.params()
    np.copyto(out["weight"], W * scale[None, :])
    np.copyto(
        out["bias"],
        (b - np.asarray(buf["running_mean"], np.float64)) * scale
        + np.asarray(g["beta"], np.float64),
    )
    return folded


def fold_batchnorm(net: Sequential) -> Sequential:
    """Deprecated name of ``net.fold()`` (``nnrt.fold.fold``), from when the only fold
    was a dense layer and the ``batchnorm`` after it; warns ``DeprecationWarning``.

    This plugin keeps the old spellings ``net.fold_batchnorm()`` and
    ``nnrt.fold.fold_batchnorm(net)`` working (the core knows no batchnorm).
    """
    warnings.warn(
        "fold_batchnorm is deprecated: use net.fold() or nnrt.fold.fold(net), which fold "
        "every pair a plugin can merge (hook nnrt_fold_pair)",
        DeprecationWarning,
        stacklevel=2,
    )
    return cast(Sequential, nnrt.fold.fold(net))


Sequential.fold_batchnorm = fold_batchnorm  # type: ignore[attr-defined]
nnrt.fold.fold_batchnorm = fold_batchnorm  # type: ignore[attr-defined]


@hookimpl
def nnrt_fold_pair(first: Layer, second: Layer) -> Layer | None:
    """``dense``/``dense_nobias`` followed by ``batchnorm`` -> one ``dense``."""
    if type(second) is not BatchNorm or type(first) not in (Dense, DenseNoBias):
        return None
    return fold_into_dense(first, second)


@hookimpl
def nnrt_fuse_pair(first: Layer, second: Layer) -> bool | None:
    """``batchnorm`` followed by ``sigmoid`` runs as one sweep (``BatchNorm._nnrt_forward_pair``:
    ``sigmoid(bn(x))`` forward; backward without the array between them)."""
    if type(first) is BatchNorm and type(second) is Sigmoid:
        return True
    return None


def to_torch_module(layer: Layer, cls: type[TorchModule]) -> TorchModule:
    """A ``cls`` (``nn.BatchNorm1d`` or ``nn.SyncBatchNorm``) with a copy of the
    batch-normalisation ``layer``'s config, parameters and running statistics."""
    import torch

    def t(a: np.ndarray) -> Any:
        return torch.from_numpy(np.array(a, copy=True))

    p, b = layer.params(), layer.buffers()
    cfg = layer.config()
    gamma = t(p["gamma"])
    bn = cls(
        int(cfg["num_features"]),
        eps=float(cfg["eps"]),
        momentum=float(cfg["momentum"]),
        dtype=gamma.dtype,
    )
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(t(p["beta"]))
        bn.running_mean.copy_(t(b["running_mean"]))
        bn.running_var.copy_(t(b["running_var"]))
    return bn


def from_torch_module(module: TorchModule, cls: type[Layer], name: str) -> Layer:
    """A new ``cls`` (registered as ``name``) with a copy of the torch batch-norm
    ``module``'s config, ``weight``/``bias`` and running statistics (float64).

    Settings nnrt has no counterpart for raise ``TypeError`` saying which."""
    kind = type(module).__name__
    if not module.affine or not module.track_running_stats:
        raise TypeError(f"only {kind}(affine=True, track_running_stats=True) maps to nnrt's {name}")
    if module.momentum is None:
        raise TypeError(
            "momentum=None (cumulative moving average) has no nnrt counterpart; "
            "set a float momentum"
        )
    layer = cls(module.num_features, momentum=float(module.momentum), eps=float(module.eps))
    p, b = layer.params(), layer.buffers()
    for ours, theirs in (
        (p["gamma"], module.weight),
        (p["beta"], module.bias),
        (b["running_mean"], module.running_mean),
        (b["running_var"], module.running_var),
    ):
        np.copyto(ours, theirs.detach().cpu().numpy())
    return layer


@hookimpl
def nnrt_to_torch(layer: Layer) -> TorchModule | None:
    """``batchnorm`` -> ``nn.BatchNorm1d`` (running statistics, momentum and eps included)."""
    if type(layer) is not BatchNorm:
        return None
    import torch

    return to_torch_module(layer, torch.nn.BatchNorm1d)


@hookimpl
def nnrt_from_torch(module: TorchModule) -> Layer | None:
    """``nn.BatchNorm1d`` (affine, tracking running statistics, float momentum) -> ``batchnorm``."""
    import torch

    if type(module) is not torch.nn.BatchNorm1d:
        return None
    return from_torch_module(module, BatchNorm, "batchnorm")
