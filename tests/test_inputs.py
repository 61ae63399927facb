"""Input handling at the Python boundary, for layers and for Sequential.

Any real float/int/bool array works whatever its memory layout (Fortran order,
strides, negative strides, read-only, misaligned, non-native byte order) and
gives the same answer as a C-contiguous float64 copy; non-numeric arrays raise
TypeError and bad shapes ValueError, with the layer, shape and dtype quoted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import nnrt

B, F, OUT = 6, 6, 4

# name -> (factory, class name quoted in messages, output width)
LAYERS: dict[str, tuple[Callable[[], Any], str, int]] = {
    "dense": (lambda: nnrt.layer("dense", F, OUT), "Dense", OUT),
    "dense_nobias": (lambda: nnrt.layer("dense_nobias", F, OUT), "DenseNoBias", OUT),
    "sigmoid": (lambda: nnrt.layer("sigmoid"), "Sigmoid", F),
    "batchnorm": (lambda: nnrt.layer("batchnorm", F), "BatchNorm", F),
    "net32": (
        lambda: nnrt.Sequential(
            [
                nnrt.layer("dense_nobias", F, 5),
                nnrt.layer("batchnorm", 5),
                nnrt.layer("sigmoid"),
                nnrt.layer("dense", 5, OUT),
            ],
            seed=0,
            dtype="float32",
        ),
        "DenseNoBias",
        OUT,
    ),
    "net64": (
        lambda: nnrt.Sequential(
            [nnrt.layer("dense", F, 5), nnrt.layer("sigmoid"), nnrt.layer("dense", 5, OUT)],
            seed=0,
            dtype="float64",
        ),
        "Dense",
        OUT,
    ),
}


def _base(rng: np.random.Generator, rows: int = B, cols: int = F) -> np.ndarray:
    # multiples of 1/8 in [-4, 4]: exact in float16, so every cast is lossless
    return np.round(rng.uniform(-4, 4, (rows, cols)) * 8) / 8


def _misaligned(a: np.ndarray) -> np.ndarray:
    buf = np.zeros(a.nbytes + 1, dtype=np.uint8)
    out = np.frombuffer(buf[1:].data, dtype=a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


VARIANTS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "c_float64": lambda r: _base(r),
    "c_float32": lambda r: _base(r).astype(np.float32),
    "fortran": lambda r: np.asfortranarray(_base(r)),
    "fortran_float32": lambda r: np.asfortranarray(_base(r).astype(np.float32)),
    "transposed_view": lambda r: _base(r, F, B).T,
    "column_strided": lambda r: _base(r, B, 2 * F)[:, ::2],
    "row_strided": lambda r: _base(r, 2 * B, F)[::2],
    "both_strided_f32": lambda r: _base(r, 2 * B, 3 * F).astype(np.float32)[::2, 1::3],
    "negative_strides": lambda r: _base(r)[::-1, ::-1],
    "readonly": lambda r: _readonly(_base(r)),
    "readonly_float32": lambda r: _readonly(_base(r).astype(np.float32)),
    "broadcast_rows": lambda r: np.broadcast_to(_base(r, 1, F), (B, F)),
    "misaligned": lambda r: _misaligned(_base(r)),
    "big_endian": lambda r: _base(r).astype(">f8"),
    "big_endian_f32": lambda r: _base(r).astype(">f4"),
    "int64": lambda r: r.integers(-5, 6, (B, F)),
    "int32": lambda r: r.integers(-5, 6, (B, F)).astype(np.int32),
    "uint8": lambda r: r.integers(0, 9, (B, F)).astype(np.uint8),
    "int8_fortran": lambda r: np.asfortranarray(r.integers(-5, 6, (B, F)).astype(np.int8)),
    "bool": lambda r: r.integers(0, 2, (B, F)).astype(bool),
    "float16": lambda r: _base(r).astype(np.float16),
}


def _out_tol(Y: np.ndarray) -> dict[str, float]:
    return {"rtol": 1e-6, "atol": 1e-6} if Y.dtype == np.float32 else {"rtol": 1e-13, "atol": 0}


# ------------------------------------------------------------- good inputs
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("which", list(LAYERS))
def test_any_layout_and_real_dtype_matches_c_float64_copy(which, variant, rng):
    factory, _, out = LAYERS[which]
    X = VARIANTS[variant](rng)
    assert X.shape == (B, F)
    X_before = np.array(X, copy=True)
    ref_in = np.ascontiguousarray(X, dtype=np.float64)
    dY = np.ascontiguousarray(np.linspace(-1, 1, B * out).reshape(B, out))

    ref_model, model = factory(), factory()
    Y_ref = ref_model.forward(ref_in, training=True).copy()
    dX_ref = ref_model.backward(dY).copy()
    Ye_ref = ref_model.forward(ref_in, training=False).copy()

    Y = model.forward(X, training=True)
    assert Y.flags.c_contiguous and Y.dtype.kind == "f"
    assert_allclose(Y, Y_ref, **_out_tol(Y))
    dX = model.backward(dY)
    assert dX.shape == (B, F)
    assert_allclose(dX, dX_ref, **_out_tol(dX))
    for k, g in model.grads().items():
        assert_allclose(g, ref_model.grads()[k], **_out_tol(g), err_msg=k)
    Ye = model.forward(X, training=False)
    assert_allclose(Ye, Ye_ref, **_out_tol(Ye))
    # the caller's array is never written to
    assert_array_equal(X, X_before)
    assert X.dtype == X_before.dtype


DY_VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "fortran": np.asfortranarray,
    "strided": lambda d: np.repeat(d, 2, axis=1)[:, ::2],
    "readonly": _readonly,
    "float32": lambda d: d.astype(np.float32),
    "misaligned": _misaligned,
    "big_endian": lambda d: d.astype(">f8"),
    "int": lambda d: np.round(d * 4).astype(np.int64),
}


@pytest.mark.parametrize("variant", list(DY_VARIANTS))
@pytest.mark.parametrize("which", list(LAYERS))
def test_backward_accepts_any_layout_of_dY(which, variant, rng):
    factory, _, out = LAYERS[which]
    X = _base(rng)
    dY0 = np.round(rng.uniform(-2, 2, (B, out)) * 8) / 8
    dY = DY_VARIANTS[variant](dY0)
    ref_dY = np.ascontiguousarray(dY, dtype=np.float64)
    dY_before = np.array(dY, copy=True)
    ref_model, model = factory(), factory()
    ref_model.forward(X, training=True)
    dX_ref = ref_model.backward(ref_dY).copy()
    model.forward(X, training=True)
    dX = model.backward(dY)
    assert_allclose(dX, dX_ref, **_out_tol(dX))
    for k, g in model.grads().items():
        assert_allclose(g, ref_model.grads()[k], **_out_tol(g), err_msg=k)
    assert_array_equal(dY, dY_before)


# -------------------------------------------------------------- bad inputs
def _bad(kind: str) -> np.ndarray:
    good = np.arange(B * F, dtype=np.float64).reshape(B, F) / 10
    return {
        "complex": lambda: good.astype(np.complex128),
        "complex64": lambda: good.astype(np.complex64),
        "object": lambda: good.astype(object),
        "str": lambda: good.astype(str),
        "bytes": lambda: good.astype("S8"),
        "datetime": lambda: np.zeros((B, F), dtype="datetime64[s]"),
    }[kind]()


@pytest.mark.parametrize("kind", ["complex", "complex64", "object", "str", "bytes", "datetime"])
@pytest.mark.parametrize("which", list(LAYERS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_real_dtypes_raise_type_error(which, kind, training):
    factory, name, _ = LAYERS[which]
    X = _bad(kind)
    with pytest.raises(TypeError) as info:
        factory().forward(X, training=training)
    msg = str(info.value)
    assert name in msg, msg
    assert str(X.shape) in msg, msg
    assert str(X.dtype) in msg, msg


BAD_SHAPES = {
    "rank0": (),
    "rank1": (F,),
    "rank3": (2, B, F),
    "empty_batch": (0, F),
    "wrong_width": (B, F + 1),
    "narrow": (B, 1),
}


@pytest.mark.parametrize(
    "which,shape_name",
    [
        (w, s)
        for w in LAYERS
        for s in BAD_SHAPES
        if not (w == "sigmoid" and s in ("wrong_width", "narrow"))  # sigmoid keeps any width
    ],
)
@pytest.mark.parametrize("dt", [np.float64, np.float32, np.int64], ids=lambda d: d.__name__)
def test_bad_shapes_raise_value_error(which, shape_name, dt):
    factory, name, _ = LAYERS[which]
    shape = BAD_SHAPES[shape_name]
    X = np.ones(shape, dtype=dt)
    model = factory()
    for training in (True, False):
        with pytest.raises(ValueError) as info:
            model.forward(X, training=training)
        msg = str(info.value)
        assert name in msg, msg
        assert str(X.shape) in msg, msg
        assert str(X.dtype) in msg, msg


@pytest.mark.parametrize("which", list(LAYERS))
@pytest.mark.parametrize("delta", [(0, 1), (1, 0), (-1, 0), (0, -1)], ids=str)
def test_backward_wrong_dY_shape_raises_value_error(which, delta):
    factory, _, out = LAYERS[which]
    model = factory()
    model.forward(np.ones((B, F)), training=True)
    dY = np.ones((B + delta[0], out + delta[1]))
    with pytest.raises(ValueError) as info:
        model.backward(dY)
    msg = str(info.value)
    # the layer that received the bad gradient is the last one of a network
    last = model if isinstance(model, nnrt.Layer) else model[-1]
    assert type(last).__name__ in msg, msg
    assert str(dY.shape) in msg, msg


@pytest.mark.parametrize("which", list(LAYERS))
@pytest.mark.parametrize("bad", ["rank1", "rank3", "complex", "str"])
def test_backward_bad_dY_rank_or_dtype(which, bad):
    factory, _, out = LAYERS[which]
    model = factory()
    model.forward(np.ones((B, F)), training=True)
    last = model if isinstance(model, nnrt.Layer) else model[-1]
    if bad == "rank1":
        dY, exc = np.ones(B * out), ValueError
    elif bad == "rank3":
        dY, exc = np.ones((1, B, out)), ValueError
    elif bad == "complex":
        dY, exc = np.ones((B, out), dtype=complex), TypeError
    else:
        dY, exc = np.full((B, out), "1.0"), TypeError
    with pytest.raises(exc) as info:
        model.backward(dY)
    msg = str(info.value)
    assert type(last).__name__ in msg, msg
    assert str(dY.shape) in msg and str(dY.dtype) in msg, msg


def test_sequential_error_names_the_failing_layer_index():
    net = LAYERS["net32"][0]()
    with pytest.raises(ValueError, match="layer 0") as info:
        net.forward(np.ones((B, F + 2)))
    assert "(6, 8)" in str(info.value)


# ------------------------------------- returned buffers fed back in (aliasing)
# Outputs may be reused buffers (DESIGN.md), and a caller may pass one straight
# back in: y = f(f(x)). The layer must not write its output over that input.
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("view", [False, True], ids=["same", "view"])
def test_dense_output_fed_back_as_input(training, view, rng):
    layer = nnrt.layer("dense", 3, 3)
    W, b = layer.params()["weight"].copy(), layer.params()["bias"].copy()
    X = rng.standard_normal((4, 3))
    Y = layer.forward(X, training=training)
    Y_in = Y[:] if view else Y
    Y_saved = Y.copy()
    Z = layer.forward(Y_in, training=training)
    assert_allclose(Z, Y_saved @ W + b, rtol=1e-13, atol=1e-14)
    if training:
        dY = rng.standard_normal((4, 3))
        dX = layer.backward(dY)
        assert_allclose(layer.grads()["weight"], Y_saved.T @ dY, rtol=1e-13, atol=1e-14)
        assert_allclose(dX, dY @ W.T, rtol=1e-13, atol=1e-14)


def test_dense_gradient_fed_back_as_gradient(rng):
    layer = nnrt.layer("dense", 3, 3)
    W = layer.params()["weight"].copy()
    X = rng.standard_normal((4, 3))
    layer.forward(X, training=True)
    dX = layer.backward(rng.standard_normal((4, 3)))
    dX_saved = dX.copy()
    dX2 = layer.backward(dX)
    assert_allclose(dX2, dX_saved @ W.T, rtol=1e-13, atol=1e-14)
    assert_allclose(layer.grads()["weight"], X.T @ dX_saved, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name,args", [("batchnorm", (3,)), ("sigmoid", ())])
def test_elementwise_layer_output_fed_back_as_input(name, args, rng):
    X = rng.standard_normal((5, 3)) * 2 + 1
    dY = rng.standard_normal((5, 3))
    layer, ref = nnrt.layer(name, *args), nnrt.layer(name, *args)
    Y = layer.forward(X, training=True)
    Y_saved = Y.copy()
    ref.forward(X, training=True)
    Z_ref = ref.forward(Y_saved, training=True).copy()
    dX_ref = ref.backward(dY).copy()
    assert_allclose(layer.forward(Y, training=True), Z_ref, rtol=1e-13, atol=1e-14)
    assert_allclose(layer.backward(dY), dX_ref, rtol=1e-13, atol=1e-14)
    for k, g in layer.grads().items():
        assert_allclose(g, ref.grads()[k], rtol=1e-13, atol=1e-14, err_msg=k)


def test_sequential_output_fed_back_as_input(rng):
    net = nnrt.Sequential([nnrt.layer("dense", 3, 3)], seed=2, dtype="float64")
    W, b = net.params()["0.weight"], net.params()["0.bias"]
    X = rng.standard_normal((4, 3))
    Y = net(X)
    expected = (X @ W + b) @ W + b
    assert_allclose(net(Y), expected, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("which", list(LAYERS))
def test_too_many_elements_is_a_value_error_not_a_crash(which):
    # a zero-stride view: 2**31+ elements without the memory; C ints would overflow
    factory, name, _ = LAYERS[which]
    X = np.broadcast_to(np.zeros((1, F)), (2**31 // F + 1, F))
    with pytest.raises(ValueError) as info:
        factory().forward(X, training=False)
    assert name in str(info.value) and str(X.shape) in str(info.value)
