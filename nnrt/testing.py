"""Test kit for layer authors: finite-difference gradient checks and a layer contract check.

``gradcheck(layer, X)`` compares ``backward`` (dX and every parameter gradient)
with central differences of ``L = sum(forward(X, training=True) * R)`` for a
fixed random projection ``R``, in float64. ``R`` and the inputs ``check_layer``
makes come from independent random streams (never the same numbers), and the
tolerance includes the rounding floor of the finite difference, which grows
with the magnitudes summed into ``L`` (so wide layers do not fail spuriously).

``check_layer(factory, in_features)`` runs the checks every built-in layer
passes: forward shapes and dtypes, params/grads agreement, backward shape,
gradients overwritten (not accumulated), gradcheck, config round trip, state
round trip, float32 handling and input validation. Both raise AssertionError
with a message naming the layer and what failed, and return True otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np

__all__ = ["check_layer", "gradcheck"]

_SEED = 20240611
# independent streams (numpy SeedSequence with distinct spawn keys): the inputs
# check_layer makes, gradcheck's projection R, dY for backward checks, ...
_STREAM_X, _STREAM_R, _STREAM_DY, _STREAM_STATE, _STREAM_INT = range(5)
# central differences lose about this many ulps of the sum L (each term's own
# rounding plus the summation); a safety factor over what was observed at width 512
_FD_ROUNDING_ULPS = 16.0


def _rng(stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(_SEED, spawn_key=(stream,)))


class LayerLike(Protocol):
    """The members of an nnrt ``Layer`` that the kit uses."""

    @property
    def in_features(self) -> int | None: ...

    @property
    def out_features(self) -> int | None: ...

    @property
    def dtype(self) -> np.dtype[Any] | None: ...

    def forward(self, X: np.ndarray, training: bool = False) -> np.ndarray: ...

    def backward(self, dY: np.ndarray) -> np.ndarray: ...

    def params(self) -> dict[str, np.ndarray]: ...

    def grads(self) -> dict[str, np.ndarray]: ...

    def buffers(self) -> dict[str, np.ndarray]: ...

    def config(self) -> dict[str, Any]: ...

    def to_dtype(self, dtype: Any) -> Any: ...


# ---------------------------------------------------------------- gradcheck
def _snapshot(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def _restore(layer: LayerLike, saved: Mapping[str, np.ndarray]) -> None:
    for k, live in layer.buffers().items():
        np.copyto(live, saved[k])


def _entries(arr: np.ndarray) -> Iterator[tuple[int, ...]]:
    return np.ndindex(*arr.shape)


def _numeric_grad(arr: np.ndarray, loss: Callable[[], float], eps: float) -> np.ndarray:
    """Central differences of ``loss()`` w.r.t. every entry of ``arr``, perturbed in place."""
    num = np.empty(arr.shape, dtype=np.float64)
    for idx in _entries(arr):
        orig = arr[idx]
        arr[idx] = orig + eps
        f_plus = loss()
        arr[idx] = orig - eps
        f_minus = loss()
        arr[idx] = orig  # exact restore: the saved value, not orig + eps - eps
        num[idx] = (f_plus - f_minus) / (2.0 * eps)
    return num


@dataclass
class _Worst:
    """The entry that exceeds its tolerance by the largest factor."""

    ratio: float = 0.0
    where: str = ""
    index: tuple[int, ...] = ()
    analytic: float = 0.0
    numeric: float = 0.0

    floor: float = 0.0

    def update(
        self,
        where: str,
        analytic: np.ndarray,
        numeric: np.ndarray,
        rtol: float,
        atol: float,
        floor: float = 0.0,
    ) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.abs(analytic - numeric) / (atol + floor + rtol * np.abs(numeric))
        ratio = np.where(np.isnan(ratio), np.inf, ratio)  # NaN in either: a failure
        if ratio.size == 0:
            return
        flat = int(np.argmax(ratio))
        r = float(ratio.reshape(-1)[flat])
        if r > self.ratio:
            idx = tuple(int(i) for i in np.unravel_index(flat, ratio.shape))
            self.ratio, self.where, self.index = r, where, idx
            self.analytic, self.numeric = float(analytic[idx]), float(numeric[idx])
            self.floor = floor


def gradcheck(
    layer: LayerLike,
    X: Any,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> bool:
    """Check ``layer.backward`` against central finite differences, in float64.

    A float32 layer is cast in place with ``layer.to_dtype("float64")`` first
    (it stays float64 afterwards). With a fixed random ``R`` (seeded) and
    ``L = sum(forward(X, training=True) * R)``, the analytic ``dX = backward(R)``
    and every parameter gradient from ``grads()`` are compared with
    ``(L(x + eps) - L(x - eps)) / (2 eps)`` for every entry of X and of each
    parameter (perturbed in place and restored exactly). ``R`` is drawn from
    its own seeded stream, independent of any X the caller drew. An entry passes
    when ``|analytic - numeric| <= atol + floor + rtol * |numeric|``, where
    ``floor = 16 * machine_eps * sum(|Y * R|) / eps`` is the rounding error of
    the central difference itself: L sums every output, so its last bits (and
    the difference quotient's) scale with that sum, i.e. with the width and
    batch. A wrong gradient (a factor off, a sum left out) is off by far more.

    ``buffers()`` are saved and restored around every forward, so layers that
    update running statistics in training (normalisation) see the same state each
    time and are left as they were.

    Returns True; raises AssertionError naming the worst entry ("dX" or
    "grad of '<name>'", its index, analytic and numeric values) otherwise.
    """
    name = repr(layer)
    if layer.dtype is not None and np.dtype(layer.dtype) != np.float64:
        layer.to_dtype("float64")
    X = np.array(X, dtype=np.float64, order="C", copy=True)
    if X.ndim != 2:
        raise ValueError(f"gradcheck({name}): X must be 2-D, got shape {X.shape}")
    saved = _snapshot(layer.buffers())

    def forward() -> np.ndarray:
        _restore(layer, saved)
        return layer.forward(X, training=True)

    Y = forward()
    if not isinstance(Y, np.ndarray) or Y.dtype != np.float64:
        raise AssertionError(
            f"gradcheck({name}): forward on float64 input must return a float64 array, "
            f"got {getattr(Y, 'dtype', type(Y).__name__)}"
        )
    R = _rng(_STREAM_R).standard_normal(Y.shape)
    floor = _FD_ROUNDING_ULPS * float(np.finfo(np.float64).eps) * float(np.sum(np.abs(Y * R)))
    floor /= eps

    def loss() -> float:
        return float(np.vdot(forward(), R))

    # analytic gradients: one training forward, then backward(R) = dL/dY
    forward()
    dX = np.array(layer.backward(R.copy()), dtype=np.float64)
    if dX.shape != X.shape:
        raise AssertionError(
            f"gradcheck({name}): backward returned shape {dX.shape}, X has shape {X.shape}"
        )
    params = layer.params()
    grads = _snapshot(layer.grads())
    if set(grads) != set(params):
        raise AssertionError(
            f"gradcheck({name}): grads() keys {sorted(grads)} differ from "
            f"params() keys {sorted(params)}"
        )

    worst = _Worst()
    worst.update("dX", dX, _numeric_grad(X, loss, eps), rtol, atol, floor)
    for key, p in params.items():
        numeric = _numeric_grad(p, loss, eps)
        worst.update(f"grad of {key!r}", grads[key], numeric, rtol, atol, floor)
    forward()  # leave the cache of a training forward on the unperturbed input
    _restore(layer, saved)
    if worst.ratio > 1.0:
        raise AssertionError(
            f"gradcheck({name}): {worst.where}{list(worst.index)} analytic "
            f"{worst.analytic!r} vs numeric {worst.numeric!r} "
            f"(|diff| {abs(worst.analytic - worst.numeric):.3g} exceeds "
            f"atol + rounding floor + rtol*|numeric| = "
            f"{atol + worst.floor + rtol * abs(worst.numeric):.3g})"
        )
    return True


# -------------------------------------------------------------- check_layer
@dataclass
class _Ctx:
    """What every check of ``check_layer`` receives."""

    factory: Callable[[], LayerLike]
    in_features: int
    batch: int
    X: np.ndarray = field(init=False)
    dY_rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.X = _rng(_STREAM_X).standard_normal((self.batch, self.in_features))
        self.dY_rng = _rng(_STREAM_DY)

    def fresh(self) -> LayerLike:
        """A new float64 layer from the factory."""
        layer = self.factory()
        if layer.dtype is not None and np.dtype(layer.dtype) != np.float64:
            layer.to_dtype("float64")
        return layer

    def out_width(self, layer: LayerLike) -> int:
        out = layer.out_features
        return self.in_features if out is None else int(out)

    def dY(self, layer: LayerLike) -> np.ndarray:
        return self.dY_rng.standard_normal((self.batch, self.out_width(layer)))


def _expect_array(what: str, Y: Any, shape: tuple[int, ...], dtype: Any) -> None:
    if not isinstance(Y, np.ndarray):
        raise AssertionError(f"{what} returned {type(Y).__name__}, not a numpy array")
    if Y.shape != shape or Y.dtype != np.dtype(dtype):
        raise AssertionError(
            f"{what} returned shape {Y.shape} dtype {Y.dtype}, "
            f"expected shape {shape} dtype {np.dtype(dtype)}"
        )


def _expect_raises(exc: type[Exception], what: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except exc:
        return
    except Exception as other:
        raise AssertionError(
            f"{what} raised {type(other).__name__}({other}), expected {exc.__name__}"
        ) from other
    raise AssertionError(f"{what} did not raise {exc.__name__}")


def _copy_state(src: LayerLike, dst: LayerLike) -> None:
    for get in ("params", "buffers"):
        dst_arrays = getattr(dst, get)()
        for k, v in getattr(src, get)().items():
            np.copyto(dst_arrays[k], v, casting="same_kind")


def _check_forward(ctx: _Ctx) -> None:
    layer = ctx.fresh()
    if layer.in_features is not None and layer.in_features != ctx.in_features:
        raise AssertionError(
            f"layer.in_features is {layer.in_features}, check_layer was given "
            f"in_features={ctx.in_features}"
        )
    shape = (ctx.batch, ctx.out_width(layer))
    X0 = ctx.X.copy()
    for training in (True, False):
        Y = layer.forward(ctx.X, training=training)
        _expect_array(f"forward(X float64, training={training})", Y, shape, np.float64)
    if not np.array_equal(ctx.X, X0):
        raise AssertionError("forward modified its input X")


def _check_params_grads(ctx: _Ctx) -> None:
    layer = ctx.fresh()
    params, grads = layer.params(), layer.grads()
    if set(params) != set(grads):
        raise AssertionError(
            f"params() keys {sorted(params)} differ from grads() keys {sorted(grads)}"
        )
    for k, p in params.items():
        g = grads[k]
        if not isinstance(p, np.ndarray) or not isinstance(g, np.ndarray):
            raise AssertionError(f"param {k!r} or its grad is not a numpy array")
        if p.shape != g.shape or p.dtype != g.dtype:
            raise AssertionError(
                f"param {k!r} (shape {p.shape} dtype {p.dtype}) and its grad "
                f"(shape {g.shape} dtype {g.dtype}) disagree"
            )
    for k, b in layer.buffers().items():
        if not isinstance(b, np.ndarray):
            raise AssertionError(f"buffer {k!r} is {type(b).__name__}, not a numpy array")


def _check_backward(ctx: _Ctx) -> None:
    layer = ctx.fresh()
    layer.forward(ctx.X, training=True)
    dY = ctx.dY(layer)
    dX = layer.backward(dY)
    _expect_array("backward(dY float64)", dX, ctx.X.shape, np.float64)
    first = _snapshot(layer.grads())
    layer.backward(dY)
    for k, g in layer.grads().items():
        if not np.allclose(g, first[k], rtol=1e-12, atol=0.0):
            raise AssertionError(
                f"grad {k!r} changed on a second backward with the same dY: "
                f"backward must overwrite gradients, not accumulate them"
            )


def _check_gradcheck(ctx: _Ctx) -> None:
    gradcheck(ctx.fresh(), ctx.X)


def _check_config(ctx: _Ctx) -> None:
    layer = ctx.fresh()
    cfg = layer.config()
    if not isinstance(cfg, dict):
        raise AssertionError(f"config() returned {type(cfg).__name__}, not a dict")
    try:
        text = json.dumps(cfg, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"config() {cfg!r} is not JSON-able: {exc}") from exc
    try:
        rebuilt = type(layer)(**json.loads(text))
    except Exception as exc:
        raise AssertionError(
            f"{type(layer).__name__}(**{cfg!r}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    again = json.dumps(rebuilt.config(), sort_keys=True)
    if again != text:
        raise AssertionError(f"rebuilt layer has config {again}, the original {text}")


def _check_state_roundtrip(ctx: _Ctx) -> None:
    src = ctx.fresh()
    rng = _rng(_STREAM_STATE)
    # move buffers (running statistics) away from their initial values, then params
    for shift in (0.5, -1.0):
        src.forward(ctx.X * 1.5 + shift, training=True)
    for p in src.params().values():
        p += 0.1 * rng.standard_normal(p.shape)
    dst = ctx.fresh()
    _copy_state(src, dst)
    want = np.array(src.forward(ctx.X, training=False), copy=True)
    got = dst.forward(ctx.X, training=False)
    if not np.array_equal(want, got):
        diff = float(np.max(np.abs(want - got)))
        raise AssertionError(
            f"a fresh layer given copies of params() and buffers() computes a different "
            f"eval forward (max |diff| {diff:.3g}): some state is not in params()/buffers()"
        )


def _check_float32(ctx: _Ctx) -> None:
    ref = ctx.fresh()
    layer = ctx.fresh()
    layer.to_dtype("float32")
    if layer.dtype is None or np.dtype(layer.dtype) != np.float32:
        raise AssertionError(f"after to_dtype('float32') layer.dtype is {layer.dtype}")
    for get in ("params", "grads", "buffers"):
        for k, a in getattr(layer, get)().items():
            if a.dtype != np.float32:
                raise AssertionError(f"after to_dtype('float32') {get}()[{k!r}] is {a.dtype}")
    _copy_state(ref, layer)
    X_int = _rng(_STREAM_INT).integers(-3, 4, size=ctx.X.shape)
    shape = (ctx.batch, ctx.out_width(layer))
    for label, X in (("float64", ctx.X), ("int64", X_int)):
        want = ref.forward(X.astype(np.float64), training=False)
        got = layer.forward(X, training=False)
        _expect_array(f"float32 layer: forward(X {label})", got, shape, np.float32)
        scale = max(1.0, float(np.max(np.abs(want))))
        if not np.allclose(got, want, rtol=1e-4, atol=1e-5 * scale):
            diff = float(np.max(np.abs(got - want)))
            raise AssertionError(
                f"float32 layer: forward(X {label}) differs from the float64 layer's "
                f"by up to {diff:.3g}"
            )
    layer.forward(ctx.X, training=True)
    dX = layer.backward(ctx.dY(layer))
    _expect_array("float32 layer: backward(dY float64)", dX, ctx.X.shape, np.float32)


def _check_bad_inputs(ctx: _Ctx) -> None:
    layer = ctx.fresh()
    X = ctx.X
    cases: list[tuple[type[Exception], str, np.ndarray]] = [
        (ValueError, "rank 1", X[0].copy()),
        (ValueError, "rank 3", X[None].copy()),
        (ValueError, "empty batch", X[:0].copy()),
        (TypeError, "complex dtype", X.astype(np.complex128)),
    ]
    if layer.in_features is not None:
        wide = np.zeros((ctx.batch, ctx.in_features + 1))
        cases.append((ValueError, "wrong feature count", wide))
    for exc, label, bad in cases:
        for training in (True, False):
            _expect_raises(
                exc,
                f"forward(X with {label}: shape {bad.shape} dtype {bad.dtype}, "
                f"training={training})",
                partial(layer.forward, bad, training=training),
            )


_CHECKS: tuple[tuple[str, Callable[[_Ctx], None]], ...] = (
    ("forward shapes", _check_forward),
    ("params/grads agree", _check_params_grads),
    ("backward", _check_backward),
    ("gradcheck", _check_gradcheck),
    ("config round trip", _check_config),
    ("state round trip", _check_state_roundtrip),
    ("float32", _check_float32),
    ("bad inputs", _check_bad_inputs),
)


def check_layer(factory: Callable[[], LayerLike], in_features: int, batch: int = 8) -> bool:
    """Run the layer contract checks on layers made by ``factory`` (zero-arg, fresh layer).

    Checks, each on a fresh layer: forward shapes (batch, out_features, or
    in_features when out_features is None) and float64 output in training and
    eval; params()/grads() with equal keys, shapes and dtypes; backward returns
    dX of X's shape and overwrites (never accumulates) gradients; gradcheck in
    float64; config() is JSON-able and ``type(layer)(**config)`` rebuilds an
    equal config; copying params() and buffers() into a fresh layer reproduces
    the eval output exactly; after ``to_dtype("float32")`` a float64 or int
    input gives float32 output close to the float64 layer's; rank 1/3 input,
    an empty batch and a wrong feature count raise ValueError, complex input
    TypeError.

    Returns True; raises AssertionError naming the layer and the failed check.
    """
    if batch < 2:
        raise ValueError(f"check_layer: batch must be >= 2, got {batch}")
    ctx = _Ctx(factory, int(in_features), int(batch))
    for title, check in _CHECKS:
        try:
            check(ctx)
        except AssertionError as exc:
            raise AssertionError(f"check_layer({_layer_name(factory)}): {title}: {exc}") from exc
        except Exception as exc:
            raise AssertionError(
                f"check_layer({_layer_name(factory)}): {title}: raised {type(exc).__name__}: {exc}"
            ) from exc
    return True


def _layer_name(factory: Callable[[], LayerLike]) -> str:
    try:
        return repr(factory())
    except Exception:
        return getattr(factory, "__name__", repr(factory))
