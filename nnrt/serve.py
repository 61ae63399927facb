"""Frozen inference sessions for serving: ``nnrt.freeze(net)``.

A session is a snapshot of a network at one moment, for inference only (like an
onnxruntime ``InferenceSession``): it keeps its own private, read-only copies of
the weights, so later changes to ``net`` (training, ``load_state_dict``, writes to
parameters or running statistics) do not affect it, and it never re-reads state
Python can change.

At freeze time every dense-like layer (a compiled layer whose own class sets the
eval-chain attribute ``_nnrt_eval_dense``) is merged with what follows it when
the plugins' eval protocol allows (the same protocol as the eval forward,
nnrt/_kernels.pyx):

* a following per-feature affine (a compiled layer of the same width and dtype
  offering ``_nnrt_eval_affine() -> (center, scale, shift)``, e.g. a normalisation
  with running statistics) is folded into the weights, in float64 and rounded
  once to the network's dtype: ``W' = W * scale``, ``b' = (b - center) * scale +
  shift``;
* a following activation declared by ``_nnrt_epilogue = "sigmoid"`` runs in the
  same output pass as the bias.

On CPUs where the eval path runs its small-M kernel (AVX-512), every merged layer
keeps a copy of its weights packed into column panels (nnrt/_packed.h) that serves
every batch (one row of a W of at most 512 KB runs the small-M kernel on the
row-major copy instead: the same sums); the bias and the sigmoid run panel by panel,
and when two threads are allowed (``nnrt.set_num_threads``, the thread policy) the
panels of a large enough layer are split over nnrt's helper thread. Every output
element is the same chain of fused multiply-adds whichever kernel or thread computes
it, so a row gives the same bits in any batch.

Every other layer (Python layers, plugins without the protocol) runs through its
own eval forward, on a private copy of the layer, in sequence; those layers keep
internal buffers, so each one runs under a lock of the session (calls from several
threads serialise on that layer only). The merged stages allocate their output per
call and are safe to run in several threads at once.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

import numpy as np

from nnrt import _serve
from nnrt._locks import holding
from nnrt.dense import Dense
from nnrt.layer import Layer

__all__ = ["InferenceSession", "freeze"]

# a class created by a class statement in Python (type flag Py_TPFLAGS_HEAPTYPE):
# its protocol attributes could be overridden, so it never joins a merged stage
_HEAPTYPE = 1 << 9


def _compiled(layer: object) -> bool:
    return isinstance(layer, Layer) and not (type(layer).__flags__ & _HEAPTYPE)


def _own_attr(layer: object, name: str) -> Any:
    # the protocol attribute as defined by the layer's own class, never inherited
    return type(layer).__dict__.get(name)


class _LayerStage:
    """A layer that is not merged: its own eval forward, under a lock (its output
    buffer is reused by its next call), copied out before the lock is released."""

    def __init__(self, layer: Layer) -> None:
        self.layer = layer
        self._lock = threading.Lock()

    def __call__(self, X: Any) -> np.ndarray:
        with self._lock:
            out = self.layer.forward(X, False)
            return np.array(out, copy=True)


class InferenceSession:
    """A frozen, read-only inference snapshot of a network (``nnrt.freeze(net)``).

    ``session(X)`` / ``session.predict(X)`` return what ``net.predict(X)`` returned
    when the session was made (to float rounding: the folds change the order of
    operations), as a new array on each call. Thread-safe. Pickles as the
    snapshot (it is frozen again when loaded).
    """

    def __init__(self, net: Any, _private: bool = False) -> None:
        snapshot = net if _private else copy.deepcopy(net)
        layers = list(snapshot.layers)
        if not layers:
            raise ValueError("freeze: the network has no layers")
        if snapshot.in_features is None:
            raise ValueError("freeze: the network is not built (its input width is unknown)")
        self._net = snapshot
        self._dtype = np.dtype(snapshot.dtype)
        self._in_features = int(snapshot.in_features)
        self._first = layers[0]
        self._stages, self._merged = _plan(layers, self._dtype)
        self._out_features = snapshot.out_features

    # ------------------------------------------------------------------ info
    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int | None:
        return self._out_features

    @property
    def stages(self) -> list[str]:
        """One line per stage: which layers of the network it runs (and how)."""
        return list(self._merged)

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}): {s}" for i, s in enumerate(self._merged))
        return f"InferenceSession(dtype={self._dtype.name}){inner}"

    # --------------------------------------------------------------- compute
    def __call__(self, X: Any) -> np.ndarray:
        return self.predict(X)

    def predict(self, X: Any, batch_size: int | None = None) -> np.ndarray:
        """Eval forward of the frozen network on ``X`` (batch_size: rows per chunk;
        None: all at once). Raises the errors ``net.forward`` raises for a bad input."""
        try:
            Xa = self._first.prepare_input(X)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"Sequential layer 0: {exc}") from exc
        if batch_size is None or batch_size >= Xa.shape[0]:
            if batch_size is not None and (type(batch_size) is bool or batch_size < 1):
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            return _serve.run_stages(self._stages, Xa)
        if type(batch_size) is not int or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        parts = [
            _serve.run_stages(self._stages, Xa[i : i + batch_size])
            for i in range(0, Xa.shape[0], batch_size)
        ]
        return np.concatenate(parts, axis=0)

    # ---------------------------------------------------------------- pickle
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self._net,))


def _rebuild(net: Any) -> InferenceSession:
    return InferenceSession(net, _private=True)


def freeze(net: Any) -> InferenceSession:
    """A frozen inference session of ``net`` as it is now (see nnrt.serve).

    The weights are copied under the network's lock (those of one whole step when
    another thread is training it); ``net`` is not modified.
    """
    if not hasattr(net, "layers") or not hasattr(net, "dtype"):
        raise TypeError(f"freeze: expected an nnrt network, got {type(net).__name__}")
    check = getattr(net, "_check_dtypes", None)
    with holding(net):
        if check is not None:  # a layer cast after the network was built: refused
            check("freeze")
        return InferenceSession(net)


def _plan(layers: list[Layer], dtype: np.dtype) -> tuple[tuple[Any, ...], list[str]]:
    stages: list[Any] = []
    desc: list[str] = []
    i, m = 0, len(layers)
    while i < m:
        layer = layers[i]
        if (
            isinstance(layer, Dense)
            and _compiled(layer)
            and _own_attr(layer, "_nnrt_eval_dense") is True
            and np.dtype(layer.dtype) in (np.float32, np.float64)
        ):
            stage, j, what = _merge(layers, i, np.dtype(layer.dtype))
            stages.append(stage)
            desc.append(what)
            i = j
            continue
        stages.append(_LayerStage(layer))
        desc.append(f"{i}: {type(layer).__name__} (own eval forward)")
        i += 1
    return tuple(stages), desc


def _merge(layers: list[Layer], i: int, dt: np.dtype) -> tuple[Any, int, str]:
    dense = layers[i]
    params = dense.params()
    W = np.array(params["weight"], dtype=np.float64)
    n_out = W.shape[1]
    b = params.get("bias")
    b64 = None if b is None else np.array(b, dtype=np.float64)
    names = [type(dense).__name__]
    j = i + 1
    if j < len(layers):
        nxt = layers[j]
        if (
            _compiled(nxt)
            and _own_attr(nxt, "_nnrt_eval_affine") is not None
            and nxt.in_features == n_out
            and nxt.out_features == n_out
            and np.dtype(nxt.dtype) == dt
        ):
            center, scale, shift = (
                np.array(a, dtype=np.float64) for a in _own_attr(nxt, "_nnrt_eval_affine")(nxt)
            )
            for name, a in (("center", center), ("scale", scale), ("shift", shift)):
                if a.shape != (n_out,):
                    raise ValueError(
                        f"freeze: {nxt!r}: _nnrt_eval_affine() gave a {name} of shape "
                        f"{a.shape}, expected ({n_out},)"
                    )
            W = W * scale
            b64 = ((0.0 if b64 is None else b64) - center) * scale + shift
            names.append(f"{type(nxt).__name__} folded")
            j += 1
    act = _serve.ACT_NONE
    if j < len(layers):
        nxt = layers[j]
        if (
            _compiled(nxt)
            and _own_attr(nxt, "_nnrt_epilogue") == "sigmoid"
            and nxt.in_features in (None, n_out)
            and (nxt.dtype is None or np.dtype(nxt.dtype) == dt)
        ):
            act = _serve.ACT_SIGMOID
            names.append(f"{type(nxt).__name__} fused")
            j += 1
    stage = _serve.FrozenDense(W.astype(dt), None if b64 is None else b64.astype(dt), act)
    span = f"{i}" if j == i + 1 else f"{i}-{j - 1}"
    return stage, j, f"{span}: " + " + ".join(names)
