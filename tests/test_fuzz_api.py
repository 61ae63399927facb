"""Property-based fuzzing of the public API (hypothesis).

Random layer stacks from the registry, batch sizes 1..512, widths, input and
gradient dtypes (float16/32/64, ints, bool, byte-swapped, complex, object,
str), memory layouts (C, Fortran, strided, negative strides, broadcast zero
strides, read-only, misaligned) and NaN/Inf values. Every case must either

* give the same forward output, input gradient and parameter gradients as the
  same network (same seed) run on a clean C-contiguous float64 copy of the
  input, and (for layers with a reference here, finite inputs) match a float64
  numpy reference written in this file; or
* raise ValueError/TypeError whose message names the layer and the shape and
  dtype involved.

Every case runs in a worker process (tests/_subproc.py) so that a segfault in
a kernel fails the test instead of killing pytest. Example counts come from
the hypothesis profile (tests/conftest.py: "ci" 300 per test, "long" 10^4);
the fit test (two trainings per example) runs a third of it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
from _subproc import isolated
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

import nnrt

# ------------------------------------------------------------------ layers
# name -> kind: "change" (in, out), "feat" (num_features), "keep" (no args)
KNOWN_KINDS = {
    "dense": "change",
    "dense_nobias": "change",
    "batchnorm": "feat",
    "sync_batchnorm": "feat",
    "sigmoid": "keep",
    "relu": "keep",
    "leaky_relu": "keep",
    "tanh": "keep",
    "dropout": "keep",
}
# layers that normalise with batch statistics: a training batch of 1 is a ValueError
BATCH_STAT = {"batchnorm", "sync_batchnorm"}


def _probe_kind(name: str) -> str | None:
    """How a registered layer we do not know takes simple arguments (None: skip it)."""
    cls = nnrt.registry.get(name).cls
    for kind, args in (("keep", ()), ("feat", (3,)), ("change", (3, 2))):
        try:
            layer = cls(*args)
        except Exception:
            continue
        if kind == "keep" and layer.in_features is None and layer.out_features is None:
            return kind
        if kind == "feat" and layer.in_features == 3 and layer.out_features in (3, None):
            return kind
        if kind == "change" and layer.in_features == 3 and layer.out_features == 2:
            return kind
    return None


def _layer_kinds() -> dict[str, str]:
    kinds = {}
    for name in sorted(nnrt.available_layers()):
        kind = KNOWN_KINDS.get(name) or _probe_kind(name)
        if kind is not None:
            kinds[name] = kind
    return kinds


LAYER_KINDS = _layer_kinds()
LAYER_NAMES = sorted(LAYER_KINDS)

# ------------------------------------------------------------------ inputs
REAL_DTYPES = [
    "float64",
    "float32",
    "float16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint64",
    "bool",
    ">f8",
    ">f4",
    ">i4",
]
BAD_DTYPES = ["complex64", "complex128", "object", "U8"]
LAYOUTS = [
    "C",
    "F",
    "strided",
    "negstride",
    "broadcast",
    "readonly",
    "misaligned",
    "list",
]
SPECIALS = [None, "nan", "inf", "-inf", "mixed", "huge"]


def _base_values(rng: np.random.Generator, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    # multiples of 1/8 in [-4, 4]: exact in every float dtype, small ints for int dtypes
    v = np.round(rng.uniform(-4, 4, shape) * 8) / 8
    if dtype.kind == "b":
        return v > 0
    if dtype.kind == "u":
        return np.abs(np.round(v))
    if dtype.kind == "i":
        return np.round(v)
    return v


def make_array(
    seed: int, shape: tuple[int, int], dtype_name: str, layout: str, special: str | None
) -> Any:
    """The (possibly weird) array a case feeds in; deterministic in its arguments."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype_name)
    if dt.kind in "fiub":
        vals = _base_values(rng, shape, dt)
    else:
        vals = np.round(rng.uniform(-4, 4, shape) * 8) / 8
    if special is not None and dt.kind in "fc" and vals.size:
        flat = vals.reshape(-1)
        k = max(1, flat.size // 7)
        idx = rng.choice(flat.size, size=k, replace=False)
        table = {
            "nan": [np.nan],
            "inf": [np.inf],
            "-inf": [-np.inf],
            "mixed": [np.nan, np.inf, -np.inf],
            "huge": [1e30, -1e30, 3e38, 1e300],
        }[special]
        flat[idx] = rng.choice(table, size=k)
    if dt.kind == "U":
        arr: Any = vals.astype(dt)
    elif dt.kind == "O":
        arr = vals.astype(object)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = vals.astype(dt)
    rows, cols = shape
    if layout == "C":
        return np.ascontiguousarray(arr)
    if layout == "F":
        return np.asfortranarray(arr)
    if layout == "strided":
        big = np.zeros((2 * rows + 1, 3 * cols + 2), dtype=arr.dtype)
        view = big[1::2, 2::3][:rows, :cols]
        view[...] = arr
        return view
    if layout == "negstride":
        return np.ascontiguousarray(arr[::-1, ::-1])[::-1, ::-1]
    if layout == "broadcast":
        return np.broadcast_to(arr[:1], shape)  # zero row stride, read-only
    if layout == "readonly":
        out = np.array(arr)
        out.flags.writeable = False
        return out
    if layout == "misaligned":
        if arr.dtype.hasobject:
            return arr
        raw = np.zeros(arr.nbytes + 1, dtype=np.uint8)
        raw[1:] = np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=np.uint8)
        out = np.frombuffer(raw.tobytes(), dtype=arr.dtype, offset=1)
        return out.reshape(shape)  # read-only (bytes), misaligned for itemsize > 1
    if layout == "list":
        return arr.tolist()
    raise AssertionError(layout)


def clean_copy(x: Any) -> np.ndarray:
    """A clean C-contiguous float64 copy of a real-valued input."""
    return np.array(x, dtype=np.float64, order="C")


def is_real(x: Any) -> bool:
    return np.asarray(x).dtype.kind in "fiub"


# ------------------------------------------------------------------ networks
def build_specs(names: list[str], widths: list[int]) -> list[tuple[str, tuple[Any, ...]]]:
    """Layer specs for a stack; ``widths[0]`` is the input width."""
    specs: list[tuple[str, tuple[Any, ...]]] = []
    w = widths[0]
    k = 1
    for name in names:
        kind = LAYER_KINDS[name]
        if kind == "change":
            out = widths[k % len(widths)]
            k += 1
            specs.append((name, (w, out)))
            w = out
        elif kind == "feat":
            specs.append((name, (w,)))
        else:
            specs.append((name, ()))
    return specs


def build_net(specs: list[tuple[str, tuple[Any, ...]]], dtype: str, seed: int) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the bias-before-BatchNorm advice
        return nnrt.Sequential(
            [nnrt.layer(name, *args) for name, args in specs], seed=seed, dtype=dtype
        )


def _err(exc: BaseException) -> tuple[str, str]:
    return (type(exc).__name__, str(exc))


def _run_net(case: dict[str, Any], X: Any, dY: Any) -> dict[str, Any]:
    net = build_net(case["specs"], case["net_dtype"], case["seed"])
    res: dict[str, Any] = {"state": net.state_dict()}
    try:
        Y = net.forward(X, training=case["training"])
    except Exception as exc:
        res["fwd_error"] = _err(exc)
        return res
    res["Y"] = np.array(Y)
    res["buffers"] = {k: v.copy() for k, v in net.buffers().items()}
    if case["training"] and dY is not None:
        try:
            dX = net.backward(dY)
        except Exception as exc:
            res["bwd_error"] = _err(exc)
            return res
        res["dX"] = np.array(dX)
        res["grads"] = {k: v.copy() for k, v in net.grads().items()}
    return res


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Worker side: the weird run and, for real inputs, the clean float64 run."""
    X = make_array(
        case["x_seed"], case["x_shape"], case["x_dtype"], case["x_layout"], case["x_special"]
    )
    dY = None
    if case.get("dy_dtype") is not None:
        dY = make_array(
            case["dy_seed"], case["dy_shape"], case["dy_dtype"], case["dy_layout"], None
        )
    out = {"weird": _run_net(case, X, dY)}
    if is_real(X) and np.asarray(X).ndim == 2:
        dYc = clean_copy(dY) if dY is not None and is_real(dY) else dY
        out["clean"] = _run_net(case, clean_copy(X), dYc)
    return out


# ------------------------------------------------------------------ references
def _expit(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1 / (1 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1 + e)
    return out


# set by ref_forward when a case is too ill-conditioned for a float64 reference
ILL_CONDITIONED = [False]


def ref_forward(specs, state, X, training):
    """float64 numpy forward; returns (Y, caches) or None if a layer has no reference."""
    caches = []
    for i, (name, _args) in enumerate(specs):
        p = {
            k.split(".", 1)[1]: v.astype(np.float64)
            for k, v in state.items()
            if k.split(".")[0] == str(i)
        }
        if name == "dense":
            Y = X @ p["weight"] + p["bias"]
        elif name == "dense_nobias":
            Y = X @ p["weight"]
        elif name == "sigmoid":
            Y = _expit(X)
        elif name == "relu":
            Y = np.maximum(X, 0)
        elif name == "leaky_relu":
            Y = np.where(X > 0, X, 0.01 * X)
        elif name == "tanh":
            Y = np.tanh(X)
        elif name == "dropout" and not training:
            Y = X.copy()
        elif name in BATCH_STAT:
            if training:
                mean = X.mean(axis=0)
                var = ((X - mean) ** 2).mean(axis=0)
                if np.any(np.sqrt(var) < 1e-3 * (1 + np.abs(mean))):
                    # NOTE: a (nearly) constant column in a training batch: BatchNorm
                    # normalises its input's rounding noise, amplified by up to
                    # 1/sqrt(eps) (more through stacked BatchNorms), and a kinked
                    # activation after it (relu) then picks a slope from that noise's
                    # sign: the network's answer is exact for a slightly different
                    # input, and no float64 reference can match it. Such a case is
                    # compared with its clean copy only.
                    ILL_CONDITIONED[0] = True
            else:
                mean, var = p["running_mean"], p["running_var"]
            invstd = 1 / np.sqrt(var + 1e-5)
            xhat = (X - mean) * invstd
            Y = p["gamma"] * xhat + p["beta"]
            caches.append((X, Y, p, xhat, invstd))
            X = Y
            continue
        else:
            return None
        caches.append((X, Y, p, None, None))
        X = Y
    return X, caches


def ref_backward(specs, caches, dY):
    """float64 numpy backward; returns (dX, grads keyed like net.grads(), peak).

    ``peak`` is the largest intermediate gradient magnitude: the scale of the rounding
    errors a float32 network accumulates (BatchNorm on a near-constant column
    multiplies by up to 1/sqrt(eps) per layer, then sums back to ~0).
    """
    grads = {}
    peak = float(np.abs(dY).max(initial=0.0))
    for i in range(len(specs) - 1, -1, -1):
        name = specs[i][0]
        X, Y, p, xhat, invstd = caches[i]
        if name in ("dense", "dense_nobias"):
            grads[f"{i}.weight"] = X.T @ dY
            if name == "dense":
                grads[f"{i}.bias"] = dY.sum(axis=0)
            dY = dY @ p["weight"].T
        elif name == "sigmoid":
            dY = dY * Y * (1 - Y)
        elif name == "relu":
            dY = dY * (X > 0)
        elif name == "leaky_relu":
            dY = dY * np.where(X > 0, 1.0, 0.01)
        elif name == "tanh":
            dY = dY * (1 - Y**2)
        elif name in BATCH_STAT:
            n = X.shape[0]
            dbeta = dY.sum(axis=0)
            dgamma = (dY * xhat).sum(axis=0)
            grads[f"{i}.gamma"], grads[f"{i}.beta"] = dgamma, dbeta
            # the kernel may form gamma * invstd * dy and subtract its mean: cancellation
            # at that magnitude is the float32 rounding scale
            peak = max(peak, float(np.abs(p["gamma"] * invstd * dY).max(initial=0.0)))
            dY = p["gamma"] * invstd / n * (n * dY - dbeta - xhat * dgamma)
        else:
            raise AssertionError(name)
        peak = max(peak, float(np.abs(dY).max(initial=0.0)))
    return dY, grads, peak


# ------------------------------------------------------------------ checks
def _class_names(specs) -> list[str]:
    return [type(nnrt.layer(name, *args)).__name__ for name, args in specs]


def assert_names_layer_shape_dtype(msg: str, specs, shape=None, dtype=None) -> None:
    names = _class_names(specs)
    assert any(n in msg for n in names), f"message does not name a layer ({names}): {msg}"
    if shape is not None:
        assert str(tuple(shape)) in msg, f"message does not quote the shape {shape}: {msg}"
    else:
        assert re.search(r"shape \(", msg), f"message quotes no shape: {msg}"
    if dtype is not None:
        assert str(np.dtype(dtype)) in msg, f"message does not quote dtype {dtype}: {msg}"
    else:
        assert "dtype" in msg, f"message quotes no dtype: {msg}"


def _tols(net_dtype: str) -> tuple[float, float]:
    return (1e-5, 1e-5) if net_dtype == "float32" else (1e-11, 1e-11)


def _close(a, b, net_dtype, what, scale_from=None):
    rtol, atol = _tols(net_dtype)
    ref = b if scale_from is None else scale_from
    finite = np.abs(ref[np.isfinite(ref)]) if np.size(ref) else np.zeros(1)
    scale = 1.0 + (float(finite.max()) if finite.size else 0.0)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert_allclose(a, b, rtol=rtol, atol=atol * scale, equal_nan=True, err_msg=what)


def _close_ref(a, b, net_dtype, what, peak=0.0):
    # the reference is float64 from the same rounded inputs and parameters; a
    # float32 network rounds every intermediate, and BatchNorm can amplify that
    # by up to 1/sqrt(eps)
    if net_dtype == "float32":
        rtol, atol = 2e-3, 2e-3
    else:
        rtol, atol = 1e-8, 1e-8
    scale = 1.0 + max(float(np.abs(b).max(initial=0.0)), peak)
    assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


def check_case(case: dict[str, Any]) -> str:
    """Run ``case`` in the worker and check the outcome; returns a short outcome label."""
    res = isolated(run_case, case)
    specs = case["specs"]
    weird = res["weird"]
    X = make_array(
        case["x_seed"], case["x_shape"], case["x_dtype"], case["x_layout"], case["x_special"]
    )
    xarr = np.asarray(X)
    if not is_real(X):
        # complex, object, str: TypeError naming the first layer, the shape and the dtype
        assert "fwd_error" in weird, f"{xarr.dtype} input was accepted"
        kind, msg = weird["fwd_error"]
        assert kind == "TypeError", f"{xarr.dtype} input raised {kind}: {msg}"
        assert_names_layer_shape_dtype(msg, specs, xarr.shape, xarr.dtype)
        return "TypeError(dtype)"
    clean = res["clean"]
    if "fwd_error" in clean or "fwd_error" in weird:
        assert "fwd_error" in clean and "fwd_error" in weird, (
            f"weird input and its clean float64 copy disagree: weird {weird.get('fwd_error')}, "
            f"clean {clean.get('fwd_error')}"
        )
        kind, msg = weird["fwd_error"]
        assert kind == clean["fwd_error"][0] and kind in ("ValueError", "TypeError"), (kind, msg)
        assert_names_layer_shape_dtype(msg, specs)
        bs_layers = [n for n, _ in specs if n in BATCH_STAT]
        if case["training"] and xarr.shape[0] == 1 and bs_layers:
            assert kind == "ValueError"
            return "ValueError(batch of 1)"
        # any other forward error is unexpected for the inputs this suite generates
        raise AssertionError(f"unexpected forward error {kind}: {msg}")
    if case["training"] and xarr.shape[0] == 1:
        assert not any(n in BATCH_STAT for n, _ in specs), "BatchNorm trained on one sample"
    nd = case["net_dtype"]
    Y, Yc = weird["Y"], clean["Y"]
    assert Y.dtype == np.dtype(nd), f"output dtype {Y.dtype}, network dtype {nd}"
    assert Y.flags.c_contiguous
    _close(Y, Yc, nd, "forward output vs clean float64 copy")
    for k in clean["buffers"]:
        _close(weird["buffers"][k], clean["buffers"][k], nd, f"buffer {k} vs clean copy")
    # independent reference (finite inputs, layers with a reference)
    with np.errstate(over="ignore", invalid="ignore"):
        x_seen = clean_copy(np.asarray(clean_copy(X), dtype=nd))
    # (NaN/Inf/huge inputs: compared with the clean copy only; float32 may overflow)
    plain = case["x_special"] is None
    ILL_CONDITIONED[0] = False
    ref = ref_forward(specs, clean["state"], x_seen, case["training"]) if plain else None
    if ref is not None and ILL_CONDITIONED[0]:
        note("ill-conditioned (near-constant column into batch statistics): clean copy only")
        ref = None
    if ref is not None:
        _close_ref(Yc.astype(np.float64), ref[0], nd, "forward output vs numpy reference")
    if case.get("dy_dtype") is None:
        return "forward ok"
    if "bwd_error" in clean or "bwd_error" in weird:
        assert "bwd_error" in clean and "bwd_error" in weird, (
            weird.get("bwd_error"),
            clean.get("bwd_error"),
        )
        kind, msg = weird["bwd_error"]
        assert kind in ("ValueError", "TypeError"), (kind, msg)
        assert_names_layer_shape_dtype(msg, specs)
        assert tuple(case["dy_shape"]) != Y.shape, f"backward refused a correct dY: {msg}"
        return "ValueError(dY shape)"
    assert tuple(case["dy_shape"]) == Y.shape, "backward accepted a dY of the wrong shape"
    _close(weird["dX"], clean["dX"], nd, "dX vs clean copy")
    for k in clean["grads"]:
        _close(weird["grads"][k], clean["grads"][k], nd, f"grad {k} vs clean copy")
    dy_seen = clean_copy(
        np.asarray(
            clean_copy(
                make_array(
                    case["dy_seed"], case["dy_shape"], case["dy_dtype"], case["dy_layout"], None
                )
            ),
            dtype=nd,
        )
    )
    if ref is not None:
        dX_ref, g_ref, peak = ref_backward(specs, ref[1], dy_seen)
        _close_ref(clean["dX"].astype(np.float64), dX_ref, nd, "dX vs numpy reference", peak)
        for k, g in g_ref.items():
            _close_ref(
                clean["grads"][k].astype(np.float64), g, nd, f"grad {k} vs numpy reference", peak
            )
    return "forward+backward ok"


# ------------------------------------------------------------------ strategies
@st.composite
def stacks(draw, max_depth: int = 5, names_from: list[str] | None = None):
    names = draw(
        st.lists(st.sampled_from(names_from or LAYER_NAMES), min_size=1, max_size=max_depth)
    )
    widths = draw(st.lists(st.integers(1, 48), min_size=1 + len(names), max_size=1 + len(names)))
    return build_specs(names, widths), widths[0]


@st.composite
def cases(draw, backward: bool | None = None):
    specs, width = draw(stacks())
    batch = draw(st.one_of(st.integers(1, 8), st.integers(9, 512)))
    x_dtype = draw(
        st.sampled_from(REAL_DTYPES + BAD_DTYPES)
        if draw(st.booleans())
        else st.sampled_from(REAL_DTYPES[:2])
    )
    case: dict[str, Any] = {
        "specs": specs,
        "net_dtype": draw(st.sampled_from(["float32", "float64"])),
        "seed": draw(st.integers(0, 2**16)),
        "training": draw(st.booleans()),
        "x_seed": draw(st.integers(0, 2**16)),
        "x_shape": (batch, width),
        "x_dtype": x_dtype,
        "x_layout": draw(st.sampled_from(LAYOUTS)),
        "x_special": draw(st.sampled_from(SPECIALS)) if draw(st.booleans()) else None,
        "dy_dtype": None,
    }
    if case["x_layout"] == "list" and x_dtype in BAD_DTYPES + [">f8", ">f4", ">i4"]:
        case["x_layout"] = "C"  # a list forgets the dtype
    do_backward = draw(st.booleans()) if backward is None else backward
    if do_backward:
        case["training"] = True
        out_w = _out_width(specs, width)
        bad = draw(st.integers(0, 9)) == 0
        dy_shape = (batch, out_w)
        if bad:
            dy_shape = draw(
                st.sampled_from(
                    [(batch + 1, out_w), (batch, out_w + 1), (max(batch - 1, 1), out_w + 2)]
                )
            )
        case.update(
            dy_seed=draw(st.integers(0, 2**16)),
            dy_shape=dy_shape,
            dy_dtype=draw(st.sampled_from(REAL_DTYPES)),
            dy_layout=draw(st.sampled_from(LAYOUTS)),
        )
        if case["dy_layout"] == "list" and case["dy_dtype"] in (">f8", ">f4", ">i4"):
            case["dy_layout"] = "C"
    return case


def _out_width(specs, width: int) -> int:
    w = width
    for name, args in specs:
        if LAYER_KINDS[name] == "change":
            w = args[1]
    return w


_N = settings.default.max_examples
_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


# ------------------------------------------------------------------ tests
@settings(max_examples=_N, **_COMMON)
@given(case=cases())
def test_forward_backward_any_input_matches_clean_float64_copy(case):
    note(repr(case))
    outcome = check_case(case)
    note(outcome)


@settings(max_examples=_N, **_COMMON)
@given(case=cases(backward=True), bad=st.sampled_from(BAD_DTYPES + ["rank1", "rank3", "empty"]))
def test_bad_gradient_raises_naming_layer(case, bad):
    case = dict(case, dy_shape=(case["x_shape"][0], _out_width(case["specs"], case["x_shape"][1])))
    res = isolated(run_bad_grad, case, bad)
    if res is None:  # the forward itself legitimately failed (batch of 1 in BatchNorm)
        return
    kind, msg = res
    expect = "TypeError" if bad in BAD_DTYPES else "ValueError"
    assert kind == expect, (kind, msg)
    assert_names_layer_shape_dtype(msg, case["specs"])


def run_bad_grad(case: dict[str, Any], bad: str) -> tuple[str, str] | None:
    X = make_array(case["x_seed"], case["x_shape"], "float64", "C", None)
    net = build_net(case["specs"], case["net_dtype"], case["seed"])
    try:
        Y = net.forward(X, training=True)
    except ValueError:
        return None
    if bad in BAD_DTYPES:
        dY = make_array(1, Y.shape, bad, "C", None)
    elif bad == "rank1":
        dY = np.ones(Y.size)
    elif bad == "rank3":
        dY = np.ones(Y.shape + (1,))
    else:
        dY = np.ones((0, Y.shape[1]))
    try:
        net.backward(dY)
    except Exception as exc:
        return _err(exc)
    raise AssertionError(f"backward accepted a bad gradient ({bad})")


BAD_SHAPES = [
    "rank0",
    "rank1",
    "rank3",
    "empty_batch",
    "zero_width",
    "wrong_width",
    "scalar",
    "ragged",
    "none",
]


def run_bad_shape(specs, net_dtype: str, bad: str, batch: int, width: int, training: bool):
    net = build_net(specs, net_dtype, 0)
    X: Any = {
        "rank0": np.float64(1.5),
        "rank1": np.ones(width),
        "rank3": np.ones((batch, width, 1)),
        "empty_batch": np.ones((0, width)),
        "zero_width": np.ones((batch, 0)),
        "wrong_width": np.ones((batch, width + 1)),
        "scalar": 3.0,
        "ragged": [[1.0] * width, [1.0] * (width + 1)],
        "none": None,
    }[bad]
    try:
        net.forward(X, training=training)
    except Exception as exc:
        return _err(exc)
    return None


@settings(max_examples=_N, **_COMMON)
@given(
    stack=stacks(),
    net_dtype=st.sampled_from(["float32", "float64"]),
    bad=st.sampled_from(BAD_SHAPES),
    batch=st.integers(1, 16),
    training=st.booleans(),
)
def test_bad_shapes_raise_value_or_type_error(stack, net_dtype, bad, batch, training):
    specs, width = stack
    res = isolated(run_bad_shape, specs, net_dtype, bad, batch, width, training)
    # width-keeping layers accept any width: a wrong width fails only at a layer with a
    # fixed input width
    must_raise = bad != "wrong_width" or any(LAYER_KINDS[n] != "keep" for n, _ in specs)
    if res is None:
        assert not must_raise, f"{bad} input was accepted by {specs}"
        return
    kind, msg = res
    assert kind in ("ValueError", "TypeError"), (kind, msg)
    assert any(n in msg for n in _class_names(specs)), f"message names no layer: {msg}"
    assert "shape" in msg and "dtype" in msg, f"message quotes no shape/dtype: {msg}"


# --------------------------------------------------------- predict and fit
def run_predict(specs, net_dtype, seed, X_args, batch_size):
    X = make_array(*X_args)
    net = build_net(specs, net_dtype, seed)
    try:
        got = net.predict(X, batch_size=batch_size)
    except Exception as exc:
        return {"error": _err(exc)}
    want = np.array(build_net(specs, net_dtype, seed)(clean_copy(X)))
    return {"got": got, "want": want}


@settings(max_examples=_N, **_COMMON)
@given(
    stack=stacks(),
    net_dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 1000),
    batch=st.integers(1, 300),
    batch_size=st.integers(1, 64),
    x_dtype=st.sampled_from(REAL_DTYPES),
    layout=st.sampled_from(LAYOUTS[:-1]),
    special=st.sampled_from(SPECIALS),
)
def test_predict_any_layout_matches_forward_on_clean_copy(
    stack, net_dtype, seed, batch, batch_size, x_dtype, layout, special
):
    specs, width = stack
    res = isolated(
        run_predict,
        specs,
        net_dtype,
        seed,
        (seed, (batch, width), x_dtype, layout, special),
        batch_size,
    )
    if "error" in res:
        raise AssertionError(f"predict raised {res['error']}")
    got, want = res["got"], res["want"]
    assert got.dtype == np.dtype(net_dtype) and got.shape == want.shape
    _close(got, want, net_dtype, "predict vs forward on the clean copy")


def run_fit(specs, net_dtype, seed, X_args, batch_size):
    X = make_array(*X_args)
    import warnings

    Xc = clean_copy(X)
    nets: list[dict[str, Any]] = [{"finite": bool(np.isfinite(Xc).all())}]
    for data in (X, Xc):
        net = build_net(specs, net_dtype, seed)
        out = net.out_features or Xc.shape[1]
        if out >= 2:
            y: Any = (np.nan_to_num(Xc).sum(axis=1) > 0).astype(np.int64)
            loss = "softmax_cross_entropy"
        else:
            y = np.tanh(np.nan_to_num(Xc).sum(axis=1, keepdims=True))
            loss = "mse"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net.fit(data, y, loss=loss, epochs=2, batch_size=batch_size, progress=False)
        except Exception as exc:
            nets.append({"error": _err(exc)})
            continue
        nets.append({"params": net.state_dict()})
    return nets


@settings(max_examples=max(10, _N // 3), **_COMMON)
@given(
    stack=stacks(max_depth=4),
    net_dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 1000),
    batch=st.integers(2, 64),
    batch_size=st.integers(2, 16),
    x_dtype=st.sampled_from(REAL_DTYPES),
    layout=st.sampled_from(LAYOUTS),
    special=st.sampled_from([None, None, "nan", "inf"]),
)
def test_fit_any_layout_same_weights_as_clean_copy(
    stack, net_dtype, seed, batch, batch_size, x_dtype, layout, special
):
    specs, width = stack
    if layout == "list" and x_dtype in (">f8", ">f4", ">i4"):
        layout = "C"
    info, weird, clean = isolated(
        run_fit,
        specs,
        net_dtype,
        seed,
        (seed, (batch, width), x_dtype, layout, special),
        batch_size,
    )
    if not info["finite"]:
        # fit scans for NaN/Inf ("huge" is excluded: it may overflow to inf in float32)
        for r in (weird, clean):
            assert "error" in r and r["error"][0] == "ValueError", r
            assert "non-finite" in r["error"][1], r["error"][1]
        return
    if "error" in weird or "error" in clean:
        assert "error" in weird and "error" in clean, (weird.get("error"), clean.get("error"))
        assert weird["error"][0] == clean["error"][0], (weird["error"], clean["error"])
        assert weird["error"][0] in ("ValueError", "TypeError", "FloatingPointError"), weird[
            "error"
        ]
        return
    for k, v in clean["params"].items():
        _close(weird["params"][k], v, net_dtype, f"{k} after fit")


# ------------------------------------------------------- stateful sequences
SEQ_NAMES = [
    n
    for n in LAYER_NAMES
    if n in ("dense", "dense_nobias", "sigmoid", "batchnorm", "relu", "tanh", "leaky_relu")
]


def run_sequence(specs, net_dtype, seed, width, ops):
    """Apply forward/backward ops to one network; record what each returned."""
    net = build_net(specs, net_dtype, seed)
    state0 = net.state_dict()
    log = []
    for kind, batch, arg in ops:
        try:
            if kind == "forward":
                X = make_array(arg, (batch, width), "float64", "C", None)
                training = batch % 2 == 0 if batch > 1 else False
                log.append(("Y", np.array(net.forward(X, training=training)), training))
            else:
                dY = make_array(arg, (batch, net.out_features or width), "float64", "C", None)
                log.append(
                    (
                        "dX",
                        np.array(net.backward(dY)),
                        {k: v.copy() for k, v in net.grads().items()},
                    )
                )
        except Exception as exc:
            log.append(("error", _err(exc), None))
    return state0, log


@settings(max_examples=_N, **_COMMON)
@given(
    stack=stacks(max_depth=4, names_from=SEQ_NAMES),
    net_dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 1000),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["forward", "forward", "backward"]),
            st.integers(1, 40),
            st.integers(0, 99),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_interleaved_forward_backward_sequences(stack, net_dtype, seed, ops):
    """Buffers reused across calls of different batch sizes and modes never leak stale data."""
    specs, width = stack
    state0, log = isolated(run_sequence, specs, net_dtype, seed, width, ops)
    state = {k: v.astype(np.float64) for k, v in state0.items()}
    last_train = None  # caches of the last successful training forward
    for (kind, batch, arg), (tag, value, extra) in zip(ops, log, strict=True):
        if kind == "forward":
            assert tag == "Y", f"forward raised {value}"
            X = clean_copy(
                np.asarray(make_array(arg, (batch, width), "float64", "C", None), dtype=net_dtype)
            )
            Yr, caches = ref_forward(specs, state, X, extra)
            _close_ref(
                value.astype(np.float64), Yr, net_dtype, f"forward(batch={batch}, training={extra})"
            )
            if extra:
                last_train = (caches, Yr.shape)
                for i, (name, _) in enumerate(specs):
                    if name == "batchnorm":
                        Xi = caches[i][0]
                        n = Xi.shape[0]
                        m, v = Xi.mean(axis=0), Xi.var(axis=0) * n / (n - 1)
                        state[f"{i}.running_mean"] = 0.9 * state[f"{i}.running_mean"] + 0.1 * m
                        state[f"{i}.running_var"] = 0.9 * state[f"{i}.running_var"] + 0.1 * v
        else:
            out_w = _out_width(specs, width)
            if last_train is None:
                assert tag == "error" and value[0] == "RuntimeError", (tag, value)
                continue
            caches, yshape = last_train
            if (batch, out_w) != yshape:
                assert tag == "error" and value[0] == "ValueError", (tag, value, yshape, batch)
                continue
            assert tag == "dX", f"backward raised {value}"
            dY = clean_copy(
                np.asarray(make_array(arg, (batch, out_w), "float64", "C", None), dtype=net_dtype)
            )
            dXr, gr, peak = ref_backward(specs, caches, dY)
            _close_ref(value.astype(np.float64), dXr, net_dtype, "dX", peak)
            for k, g in gr.items():
                _close_ref(extra[k].astype(np.float64), g, net_dtype, f"grad {k}", peak)


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_every_registered_layer_is_fuzzed(name):
    """The strategies above draw from every registered layer with simple arguments."""
    assert LAYER_KINDS[name] in ("change", "feat", "keep")


# ------------------------------------------- regressions for bugs the fuzzing found
@pytest.mark.parametrize("name", [n for n in LAYER_NAMES if LAYER_KINDS[n] == "keep"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_width_input_of_the_network_dtype_is_refused(name, dtype):
    """The C-contiguous fast path of prepare_input accepted (batch, 0) arrays."""
    net = build_net([(name, ())], dtype, 0)
    with pytest.raises(ValueError, match=r"zero features.*\(4, 0\)"):
        net.forward(np.ones((4, 0), dtype=dtype))


def test_ragged_list_input_names_the_layer():
    """np.asarray's ValueError for a ragged list escaped without naming the layer."""
    net = build_net([("dense", (3, 2))], "float64", 0)
    with pytest.raises(ValueError, match=r"Dense\(.*list"):
        net.forward([[1.0, 2.0, 3.0], [1.0, 2.0]])
