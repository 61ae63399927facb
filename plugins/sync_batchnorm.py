"""Plugin: ``sync_batchnorm``, BatchNorm with statistics over the global batch of all
MPI ranks (as ``torch.nn.SyncBatchNorm``; in one process it equals ``batchnorm``).

The layer is pure Python over numpy and needs mpi4py only when it runs under MPI.
It talks to the other ranks through the communicator that
``nnrt.distributed.GradientAllreduce`` hands to every layer declaring
``uses_communicator = True`` (its attribute ``comm``: ``allreduce_sum(buf, what)``
sums a float64 buffer over the ranks in place). torch: ``nn.SyncBatchNorm``
(as ``nn.BatchNorm1d`` for ``batchnorm``).

Across ranks (docs/distributed.md), per feature and in float64: mean and
variance over the *global* batch (allreduce of count and sum -> mean, then of
the sum of squared deviations -> variance) and the backward pass through those
global statistics (allreduce of ``sum(dy)`` and ``sum(dy * xhat)``): training
on ``k`` ranks equals single-process training with ``batchnorm`` on the global
batches (up to rounding). Three small allreduces per layer and step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from nnrt.distributed import AnyComm, default_communicator
from nnrt.hookspecs import RegisterLayer, hookimpl
from nnrt.layer import Layer
from nnrt.network import Sequential
from nnrt_plugins._bn_config import batchnorm_config
from nnrt_plugins.batchnorm import (
    BatchNorm,
    check_running_stats,
    from_torch_module,
    to_torch_module,
)

if TYPE_CHECKING:
    from nnrt.hookspecs import TorchModule

__all__ = [
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "nnrt_check_state",
    "nnrt_from_torch",
    "nnrt_layer_flops",
    "nnrt_register_layers",
    "nnrt_to_torch",
]


class SyncBatchNorm(Layer):
    """BatchNorm whose training statistics cover the global batch of all ranks
    (registry name ``sync_batchnorm``; as ``torch.nn.SyncBatchNorm``).

    Same constructor, parameters (``gamma``, ``beta``), buffers
    (``running_mean``, ``running_var``) and eval behaviour as ``batchnorm``.
    In training, per feature and in float64:

      N, S   = allreduce(n_local, sum_i x_i)          mean = S / N
      Q      = allreduce(sum_i (x_i - mean)^2)        var  = Q / N  (biased; running: Q/(N-1))
      xhat   = (x - mean) / sqrt(var + eps);  y = gamma * xhat + beta
    backward, with G1, G2 = allreduce(sum_i dy_i, sum_i dy_i * xhat_i):
      dx     = gamma / sqrt(var + eps) * (dy - G1 / N - xhat * G2 / N)
      dbeta, dgamma = this rank's sum_i dy_i and sum_i dy_i * xhat_i
    (the shard's share: the trainer's gradient allreduce adds them up).

    ``comm`` is the communicator (``None``: ``nnrt.distributed.default_communicator()``
    at the first training forward, which is a one-rank no-op outside MPI). The
    layer declares ``uses_communicator = True``, so the trainer's
    ``nnrt.distributed.GradientAllreduce`` sets ``comm`` to its own, leaves the
    running statistics (identical on every rank) out of its buffer averaging
    and asks for two rows per global batch (not per rank). Every rank must
    call forward/backward in step with the others. A global batch of one
    sample raises ValueError on every rank.
    """

    uses_batch_statistics = True
    uses_communicator = True

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        n, momentum, eps = batchnorm_config("SyncBatchNorm", num_features, momentum, eps)
        self.num_features = n
        self.in_features = n
        self.out_features = n
        self.momentum = momentum
        self.eps = eps
        self.comm: AnyComm | None = None
        self.dtype = np.float64
        self.gamma = np.ones(n)
        self.beta = np.zeros(n)
        self.dgamma = np.zeros(n)
        self.dbeta = np.zeros(n)
        self.running_mean = np.zeros(n)
        self.running_var = np.ones(n)
        self._reset_cache()

    def _reset_cache(self) -> None:
        n = self.num_features
        # float64 message buffers: [count, sum x], [sum sq dev], [sum dy, sum dy*xhat]
        self._msg_stats = np.zeros(n + 1, dtype=np.float64)
        self._msg_var = np.zeros(n, dtype=np.float64)
        self._msg_grad = np.zeros(2 * n, dtype=np.float64)
        self._xhat: np.ndarray | None = None  # float64 (batch, n), cached for backward
        self._invstd = np.zeros(n, dtype=np.float64)
        self._count = 0.0
        self._Y: np.ndarray | None = None
        self._Y_train: np.ndarray | None = None
        self._dX: np.ndarray | None = None
        self._tmp: np.ndarray | None = None

    def reset_parameters(self, rng: Any = None) -> None:
        """gamma = 1, beta = 0, running_mean = 0, running_var = 1 (no randomness)."""
        self.gamma[...] = 1
        self.beta[...] = 0
        self.running_mean[...] = 0
        self.running_var[...] = 1

    def params(self) -> dict[str, np.ndarray]:
        return {"gamma": self.gamma, "beta": self.beta}

    def grads(self) -> dict[str, np.ndarray]:
        return {"gamma": self.dgamma, "beta": self.dbeta}

    def buffers(self) -> dict[str, np.ndarray]:
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "momentum": self.momentum, "eps": self.eps}

    def to_dtype(self, dtype: Any) -> SyncBatchNorm:
        self.dtype = dtype
        dt = self.dtype
        for name in ("gamma", "beta", "dgamma", "dbeta", "running_mean", "running_var"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dt))
        self._reset_cache()
        return self

    @staticmethod
    def _buffer(old: np.ndarray | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        if old is not None and old.shape == shape and old.dtype == dtype:
            return old
        return np.empty(shape, dtype=dtype)

    def _affine_into(
        self, Y: np.ndarray, X: np.ndarray, scale: np.ndarray, shift: np.ndarray
    ) -> np.ndarray:
        """Y = X * scale + shift, computed in the float64 scratch, then cast into Y."""
        n, f = Y.shape
        tmp = self._tmp = self._buffer(self._tmp, (n, f), np.float64)
        np.multiply(X, scale, out=tmp)
        np.add(tmp, shift, out=tmp)
        np.copyto(Y, tmp, casting="same_kind")
        return Y

    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        Xa = self.prepare_input(X)
        n, f = Xa.shape
        g64 = self.gamma.astype(np.float64, copy=False)
        b64 = self.beta.astype(np.float64, copy=False)
        if not training:
            scale = g64 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            shift = b64 - self.running_mean.astype(np.float64) * scale
            Y = self._Y = self._buffer(self._Y, (n, f), Xa.dtype)
            return self._affine_into(Y, Xa, scale, shift)
        comm = self.comm
        if comm is None:
            comm = self.comm = default_communicator()
        stats = self._msg_stats
        stats[0] = n
        np.sum(Xa, axis=0, dtype=np.float64, out=stats[1:])
        comm.allreduce_sum(stats, what=f"{self!r} forward: batch sum")
        N = float(stats[0])
        if N < 2:
            raise ValueError(
                f"{self!r}: training needs more than 1 sample per global batch to compute "
                f"a batch variance, got {int(N)} (local shape {Xa.shape} dtype {Xa.dtype})"
            )
        mean = stats[1:] / N
        # NOTE: two passes (mean first, then squared deviations) keep the variance
        # exact where E[x^2] - E[x]^2 would cancel.
        xhat = self._buffer(self._xhat, (n, f), np.float64)
        self._xhat = xhat
        np.subtract(Xa, mean, out=xhat)
        var = self._msg_var
        np.einsum("ij,ij->j", xhat, xhat, out=var)
        comm.allreduce_sum(var, what=f"{self!r} forward: sum of squared deviations")
        var /= N
        np.divide(1.0, np.sqrt(var + self.eps), out=self._invstd)
        xhat *= self._invstd
        self._count = N
        Y = self._Y_train = self._buffer(self._Y_train, (n, f), Xa.dtype)
        self._affine_into(Y, xhat, g64, b64)
        m = self.momentum
        rm = self.running_mean
        rv = self.running_var
        rm[...] = (1 - m) * rm.astype(np.float64) + m * mean
        rv[...] = (1 - m) * rv.astype(np.float64) + m * var * (N / (N - 1))
        return Y

    def backward(self, dY: Any) -> np.ndarray:
        if self._Y_train is None or self._xhat is None:
            raise RuntimeError(
                f"{self!r}: backward() called before forward(X, training=True); "
                f"backward uses the activations cached by the last training forward"
            )
        dy = self.prepare_grad(dY, self._Y_train)
        xhat = self._xhat
        n, f = xhat.shape
        comm = self.comm
        assert comm is not None
        msg = self._msg_grad
        np.sum(dy, axis=0, dtype=np.float64, out=msg[:f])
        tmp = self._buffer(self._tmp, (n, f), np.float64)
        self._tmp = tmp
        np.multiply(dy, xhat, out=tmp)
        np.sum(tmp, axis=0, out=msg[f:])
        # NOTE: the parameter gradients are this shard's sums; the trainer's
        # gradient allreduce adds the shards up (adding them here too would
        # count them twice).
        np.copyto(self.dbeta, msg[:f], casting="same_kind")
        np.copyto(self.dgamma, msg[f:], casting="same_kind")
        comm.allreduce_sum(msg, what=f"{self!r} backward: sums of dy and dy*xhat")
        N = self._count
        k = self.gamma.astype(np.float64) * self._invstd
        # dx = gamma * invstd * (dy - G1/N - xhat * G2/N)
        np.multiply(xhat, msg[f:] / N, out=tmp)
        np.subtract(dy, tmp, out=tmp)
        tmp -= msg[:f] / N
        tmp *= k
        dX = self._buffer(self._dX, (n, f), dy.dtype)
        self._dX = dX
        np.copyto(dX, tmp, casting="same_kind")
        return dX


def convert_sync_batchnorm(net: Any) -> Any:
    """A new ``Sequential`` with every ``batchnorm`` replaced by a :class:`SyncBatchNorm`
    (same config, parameters and buffers); the other layers are the same objects."""
    state = net.state_dict()
    layers = [
        SyncBatchNorm(**layer.config()) if isinstance(layer, BatchNorm) else layer
        for layer in net.layers
    ]
    new = Sequential(layers, seed=net.seed, dtype=net.dtype)
    new.load_state_dict(state)
    return new


@hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    register("sync_batchnorm", SyncBatchNorm)


@hookimpl
def nnrt_check_state(layer: Layer, state: dict[str, Any]) -> None:
    if type(layer) is SyncBatchNorm:
        check_running_stats(layer, state)


@hookimpl
def nnrt_layer_flops(layer: Layer, in_features: int) -> int | None:
    """FLOPs: as ``batchnorm`` (eval: ``x * a + b`` per feature)."""
    if type(layer) is not SyncBatchNorm:
        return None
    return 2 * in_features


@hookimpl
def nnrt_to_torch(layer: Layer) -> TorchModule | None:
    """``sync_batchnorm`` -> ``nn.SyncBatchNorm`` (in one process: ``BatchNorm1d``'s maths)."""
    if type(layer) is not SyncBatchNorm:
        return None
    import torch

    return to_torch_module(layer, torch.nn.SyncBatchNorm)


@hookimpl
def nnrt_from_torch(module: TorchModule) -> Layer | None:
    """``nn.SyncBatchNorm`` (affine, tracking running statistics) -> ``sync_batchnorm``."""
    import torch

    if type(module) is not torch.nn.SyncBatchNorm:
        return None
    return from_torch_module(module, SyncBatchNorm, "sync_batchnorm")
