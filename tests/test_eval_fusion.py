"""The live eval forward's own kernels (nnrt/_eval.h, nnrt/dense.pyx dense_eval): the
epilogue (bias, a following normalisation's affine, sigmoid) in AVX-512 intrinsics, the
masked-vector kernel of narrow outputs, and the two-thread split by rows.

References: float64 numpy written here, and the same layers called one by one (the
fused epilogue must give their bits: every operation rounds as theirs do).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_serve import reference as _reference  # the float64 eval forward in numpy

import nnrt
import nnrt._kernels as kernels
import nnrt.dense as dense
from nnrt import _parallel

pytestmark = pytest.mark.filterwarnings("ignore::nnrt.BiasBeforeBatchNormWarning")


@pytest.fixture(autouse=True)
def _restore_defaults():
    old = dense._set_eval_split()
    yield
    dense._set_eval_kernel("auto")
    dense._set_eval_split(*old)
    kernels._set_eval_fusion(True)
    nnrt.set_num_threads(None)


def _state(net: nnrt.Sequential, seed: int, spread: float = 0.7) -> None:
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        for name, arr in {**layer.params(), **layer.buffers()}.items():
            if name == "running_var":
                arr[...] = rng.uniform(0.3, 3.0, arr.shape)
            elif name in ("running_mean", "beta"):
                arr[...] = rng.normal(0, spread, arr.shape)
            elif name == "gamma":
                arr[...] = rng.normal(0, spread, arr.shape) * 3.0


def _one_by_one(net: nnrt.Sequential, X: np.ndarray) -> np.ndarray:
    h = X
    for layer in net.layers:
        h = layer.forward(h, False)
    return np.array(h)


# ------------------------------------------------------------------- the epilogue
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("width", [5, 16, 17, 63, 64, 65, 100, 130])
@pytest.mark.parametrize(
    "block",
    [
        ["dense_nobias", "batchnorm", "sigmoid"],  # affine + sigmoid
        ["dense", "batchnorm", "sigmoid"],  # bias, affine, sigmoid
        ["dense", "sigmoid"],  # bias + sigmoid
        ["dense_nobias", "sigmoid"],  # sigmoid alone
        ["dense_nobias", "batchnorm"],  # affine alone
        ["dense", "batchnorm"],  # bias + affine
    ],
)
def test_fused_epilogue_gives_the_bits_of_the_layers_one_by_one(
    dtype: str, width: int, block: list[str]
) -> None:
    # every width: whole 64-column chunks, single vectors and a masked tail
    layers: list[Any] = []
    n_in = 12
    for name in block:
        if name.startswith("dense"):
            layers.append(nnrt.layer(name, n_in, width))
        elif name == "batchnorm":
            layers.append(nnrt.layer(name, width))
        else:
            layers.append(nnrt.layer(name))
    layers.append(nnrt.layer("dense", width, 3))
    net = nnrt.Sequential(layers, seed=1, dtype=dtype)
    _state(net, 2)
    X = np.random.default_rng(3).normal(size=(37, n_in)).astype(dtype) * 4.0
    fused = net(X).copy()
    if block[-1] == "sigmoid":
        assert net[len(block) - 1]._S_eval is None  # fused into the dense layer's pass
    np.testing.assert_array_equal(fused, _one_by_one(net, X))
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(fused, _reference(net, X), rtol=tol, atol=tol)


def test_fused_sigmoid_bits_on_every_kind_of_float32_input() -> None:
    # dense_nobias (1 -> 70, W = 1: each output is its row's x, exactly) -> batchnorm
    # (identity affine) -> sigmoid, fused, against the same layers one by one, on 2^16
    # random bit patterns (NaNs, infinities, subnormals, both signs) and the clamp's edge
    net = nnrt.Sequential(
        [nnrt.layer("dense_nobias", 1, 70), nnrt.layer("batchnorm", 70), nnrt.layer("sigmoid")],
        dtype="float32",
    )
    net[0].params()["weight"][...] = 1.0
    net[1].buffers()["running_var"][...] = 1.0 - net[1].eps  # scale 1/sqrt(1) = 1
    bits = np.random.default_rng(4).integers(0, 2**32, size=2**16, dtype=np.uint64)
    x = bits.astype(np.uint32).view(np.float32)
    edges = np.array(
        [0.0, -0.0, np.inf, -np.inf, 87.2, 87.3, 87.4, 88.8, 1e-45, 1e30, 16.6, 0.5],
        dtype=np.float32,
    )
    x = np.concatenate([x, edges, -edges, np.nextafter(edges, np.float32(0))])
    X = x.reshape(-1, 1)
    fused = net(X).copy()
    np.testing.assert_array_equal(fused, _one_by_one(net, X))
    finite = np.isfinite(x)
    assert np.isnan(fused[~np.isnan(x)]).sum() == 0  # NaN only from NaN
    with np.errstate(over="ignore"):
        ref = 1.0 / (1.0 + np.exp(-x[finite].astype(np.float64)))
    # below -87.3 the float32 sigmoid flushes to 0 (nnrt/_vmath.h): sigmoid < 1.2e-38
    np.testing.assert_allclose(fused[finite, 0], ref, rtol=1e-6, atol=1.5e-38)


# ------------------------------------------------------------- narrow outputs
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 3, 8, 10, 15, 16, 17, 24, 31])
@pytest.mark.parametrize("k", [1, 7, 300, 530])
def test_narrow_output_matches_reference_and_rows_are_independent(
    dtype: str, n: int, k: int
) -> None:
    layer = nnrt.layer("dense", k, n).to_dtype(dtype)
    rng = np.random.default_rng(5)
    W = layer.params()["weight"].astype(np.float64)
    b = layer.params()["bias"].astype(np.float64)
    X = rng.normal(size=(140, k)).astype(dtype)
    whole = layer.forward(X).copy()
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(whole, X.astype(np.float64) @ W + b, rtol=tol, atol=tol)
    # a row gives the same bits alone, in any slice, in the whole batch
    for lo, hi in [(0, 1), (3, 5), (7, 16), (9, 41), (100, 140)]:
        np.testing.assert_array_equal(layer.forward(X[lo:hi]), whole[lo:hi])
    # the BLAS GEMM (forced) agrees to rounding
    dense._set_eval_kernel("gemm")
    np.testing.assert_allclose(layer.forward(X), whole, rtol=tol, atol=tol)


# ------------------------------------------------------------------ two threads
@pytest.mark.skipif(not dense.SMALL_M_ENABLED, reason="GEMM serves every layer on this CPU")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sizes", [[200, 256, 96, 10], [256, 512, 10]])
def test_two_threads_split_rows_and_give_the_same_bits(dtype: str, sizes: list[int]) -> None:
    # from 32 rows the two threads take pieces of rows, each its GEMM and its epilogue;
    # [256, 512, 10] from 512 rows first copies W to an aligned buffer (its rows 2 KB apart;
    # the copy split over the two threads too)
    layers: list[Any] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=False):
        layers += [nnrt.layer("dense_nobias", a, b), nnrt.layer("batchnorm", b)]
        layers.append(nnrt.layer("sigmoid"))
    layers.append(nnrt.layer("dense", sizes[-2], sizes[-1]))
    net = nnrt.Sequential(layers, seed=7, dtype=dtype)
    _state(net, 8)
    X = np.random.default_rng(9).normal(size=(600, sizes[0])).astype(dtype)
    nnrt.set_num_threads(1)
    one = net(X).copy()
    parts = {m: net(X[:m]).copy() for m in (17, 32, 130, 512)}
    nnrt.set_num_threads(2)
    jobs = _parallel.stats()["jobs"]
    two = net(X).copy()
    assert _parallel.stats()["jobs"] > jobs  # the split did run
    np.testing.assert_array_equal(two, one)
    for m, part in parts.items():
        np.testing.assert_array_equal(net(X[:m]), part)
        np.testing.assert_array_equal(part, one[:m])
    # other piece counts, and columns instead of rows: the same bits
    for rows_min, pieces in [(16, 2), (16, 7), (10**6, 4)]:
        dense._set_eval_split(rows_min, pieces)
        np.testing.assert_array_equal(net(X), one)
        np.testing.assert_array_equal(net(X[:130]), one[:130])
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(one, _reference(net, X), rtol=tol, atol=tol)


def test_eval_split_settings_are_checked() -> None:
    old = dense._set_eval_split()
    assert dense._set_eval_split(64, 3) == old
    assert dense._set_eval_split() == (64, 3)
    with pytest.raises(ValueError, match="rows_min"):
        dense._set_eval_split(8)
    with pytest.raises(ValueError, match="pieces"):
        dense._set_eval_split(-1, 1)
    with pytest.raises(ValueError, match="pieces"):
        dense._set_eval_split(-1, 65)
