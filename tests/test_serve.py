"""The eval (inference) path: GEMV / small-batch kernel / GEMM, and the fused
dense -> per-feature affine -> sigmoid epilogue (nnrt/dense.pyx, nnrt/_smallm.h,
the eval chain in nnrt/_kernels.pyx).

References are float64 numpy written here; the kernel choice and the fusion are
forced both ways so every path is checked against the same reference.
"""

from __future__ import annotations

import numpy as np
import pytest

import nnrt
import nnrt._kernels as kernels
import nnrt.dense as dense

MODES = ("auto", "gemm", "small")
# a dense layer with a bias before BatchNorm is tested on purpose (the bias path)
pytestmark = pytest.mark.filterwarnings("ignore::nnrt.BiasBeforeBatchNormWarning")


@pytest.fixture(autouse=True)
def _restore_defaults():
    yield
    dense._set_eval_kernel("auto")
    kernels._set_eval_fusion(True)


def build(sizes, dtype, seed=0, bias_hidden=False):
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=False):
        layers += [
            nnrt.layer("dense" if bias_hidden else "dense_nobias", a, b),
            nnrt.layer("batchnorm", b),
            nnrt.layer("sigmoid"),
        ]
    layers.append(nnrt.layer("dense", sizes[-2], sizes[-1]))
    net = nnrt.Sequential(layers, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    for layer in net.layers:
        for name, arr in {**layer.params(), **layer.buffers()}.items():
            if name == "running_var":
                arr[...] = rng.uniform(0.3, 3.0, arr.shape)
            elif name in ("running_mean", "gamma", "beta"):
                arr[...] = rng.normal(0, 0.7, arr.shape)
    return net


def reference(net, X):
    """Eval forward in float64 numpy, from the network's current state."""
    Y = np.asarray(X, dtype=np.float64)
    for layer in net.layers:
        p = {k: v.astype(np.float64) for k, v in layer.params().items()}
        b = {k: v.astype(np.float64) for k, v in layer.buffers().items()}
        if "running_var" in b:
            scale = p["gamma"] / np.sqrt(b["running_var"] + layer.eps)
            Y = (Y - b["running_mean"]) * scale + p["beta"]
        elif "weight" in p:
            Y = Y @ p["weight"] + p.get("bias", 0.0)
        else:
            Y = 1.0 / (1.0 + np.exp(-Y))
    return Y


SIZES = [
    [64, 64, 64, 10],
    [5, 37, 24, 3],
    [40, 48, 96, 7],
    [17, 130, 1],
]
BATCHES = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 100]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", SIZES)
def test_eval_float64_matches_reference(mode, sizes):
    dense._set_eval_kernel(mode)
    net = build(sizes, "float64")
    rng = np.random.default_rng(3)
    for batch in BATCHES:
        X = rng.normal(size=(batch, sizes[0]))
        got = net(X)
        np.testing.assert_allclose(got, reference(net, X), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", SIZES)
def test_eval_float32_close_to_reference(mode, sizes):
    dense._set_eval_kernel(mode)
    net = build(sizes, "float32")
    rng = np.random.default_rng(4)
    for batch in BATCHES:
        X = rng.normal(size=(batch, sizes[0])).astype(np.float32)
        got = net.forward(X, training=False)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, reference(net, X), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_and_unfused_agree(dtype):
    net = build([30, 48, 40, 6], dtype, bias_hidden=True)
    X = np.random.default_rng(5).normal(size=(13, 30)).astype(dtype)
    fused = net(X).copy()
    kernels._set_eval_fusion(False)
    unfused = net(X).copy()
    tol = 1e-13 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(fused, unfused, rtol=tol, atol=tol)


def test_fused_path_is_taken_and_skips_the_middle_buffers():
    net = build([8, 16, 4], "float64")
    X = np.random.default_rng(6).normal(size=(3, 8))
    net(X)
    # fused: dense_nobias writes the sigmoid's output itself; the sigmoid's eval buffer
    # is never allocated
    assert net[2]._S_eval is None
    kernels._set_eval_fusion(False)
    net2 = build([8, 16, 4], "float64")
    net2(X)
    assert net2[2]._S_eval is not None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_directly_before_sigmoid(dtype):
    net = nnrt.Sequential(
        [nnrt.layer("dense", 12, 40), nnrt.layer("sigmoid"), nnrt.layer("dense", 40, 3)],
        dtype=dtype,
    )
    X = np.random.default_rng(7).normal(size=(6, 12)).astype(dtype)
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(net(X), reference(net, X), rtol=tol, atol=tol)
    assert net[1]._S_eval is None  # fused into the dense layer's pass


def test_python_subclasses_are_not_fused():
    Sigmoid = type(nnrt.layer("sigmoid"))
    BatchNorm = type(nnrt.layer("batchnorm", 2))
    calls = []

    class CountingSigmoid(Sigmoid):
        def forward(self, X, training=False):
            calls.append("sigmoid")
            return super().forward(X, training)

    class ShiftedBN(BatchNorm):
        # a subclass that changes what eval computes: never replaced by the fused path
        def forward(self, X, training=False):
            calls.append("bn")
            return super().forward(X, training) + 1.0

    net = nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 6, 16),
            ShiftedBN(16),
            CountingSigmoid(),
            nnrt.layer("dense", 16, 2),
        ],
        dtype="float64",
    )
    X = np.random.default_rng(8).normal(size=(4, 6))
    got = net(X)
    assert calls == ["bn", "sigmoid"]
    Y = X @ net[0].params()["weight"]
    b = net[1].buffers()
    p = net[1].params()
    Y = (Y - b["running_mean"]) / np.sqrt(b["running_var"] + net[1].eps) * p["gamma"] + p["beta"]
    Y = 1.0 / (1.0 + np.exp(-(Y + 1.0)))
    Y = Y @ net[3].params()["weight"] + net[3].params()["bias"]
    np.testing.assert_allclose(got, Y, rtol=1e-12, atol=1e-13)


def test_running_statistics_changed_in_place_are_used():
    net = build([10, 24, 5], "float64")
    X = np.random.default_rng(9).normal(size=(7, 10))
    first = net(X).copy()
    bn = net[1]
    bn.buffers()["running_var"][...] *= 4.0
    bn.buffers()["running_mean"][...] += 0.5
    bn.params()["gamma"][...] *= -1.0
    second = net(X)
    np.testing.assert_allclose(second, reference(net, X), rtol=1e-12, atol=1e-13)
    assert not np.allclose(first, second)


def test_training_forward_then_eval_uses_updated_statistics():
    net = build([10, 24, 5], "float32")
    rng = np.random.default_rng(10)
    net.forward(rng.normal(size=(32, 10)).astype(np.float32), training=True)
    X = rng.normal(size=(3, 10)).astype(np.float32)
    np.testing.assert_allclose(net(X), reference(net, X), rtol=2e-4, atol=2e-5)


def test_reshaped_running_var_raises_in_fused_path():
    net = build([6, 8, 2], "float64")
    rv = net[1].buffers()["running_var"]
    rv.shape = (2, 4)  # the live array, reshaped in place
    with pytest.raises(RuntimeError, match="running_var"):
        net(np.ones((3, 6)))
    rv.shape = (8,)
    np.testing.assert_allclose(
        net(np.ones((3, 6))), reference(net, np.ones((3, 6))), rtol=1e-12, atol=1e-13
    )


def test_reshaped_weight_raises_in_eval_kernels():
    net = build([6, 8, 2], "float32")
    W = net[0].params()["weight"]
    W.shape = (8, 6)
    for batch in (1, 3, 100):
        with pytest.raises(RuntimeError, match="weight"):
            net(np.ones((batch, 6), dtype=np.float32))


def test_output_fed_back_as_input():
    # the eval buffer of the last call may be passed back in: it is not overwritten
    # while it is read
    net = nnrt.Sequential(
        [nnrt.layer("dense", 16, 16), nnrt.layer("batchnorm", 16), nnrt.layer("sigmoid")],
        dtype="float64",
    )
    X = np.random.default_rng(11).normal(size=(5, 16))
    Y1 = net(X)
    Y2 = net(Y1)
    want = reference(net, reference(net, X))
    np.testing.assert_allclose(Y2, want, rtol=1e-12, atol=1e-13)


def test_predict_returns_a_fresh_array():
    net = build([12, 32, 4], "float32")
    X = np.random.default_rng(12).normal(size=(9, 12)).astype(np.float32)
    a = net.predict(X)
    b = net.predict(X)
    buf = net(X)
    assert a is not b
    assert not np.shares_memory(a, b)
    assert not np.shares_memory(a, buf)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k,n", [(1, 1), (3, 5), (17, 40), (64, 48), (100, 96), (300, 200)])
def test_small_batch_kernel_any_shape(dtype, k, n):
    # the small-M kernel on its own (forced), every row and column remainder
    dense._set_eval_kernel("small")
    layer = nnrt.layer("dense", k, n).to_dtype(dtype)
    rng = np.random.default_rng(13)
    W = layer.params()["weight"].astype(np.float64)
    b = layer.params()["bias"].astype(np.float64)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for batch in list(range(1, 20)) + [31, 63, 65, 130]:
        X = rng.normal(size=(batch, k)).astype(dtype)
        got = layer.forward(X)
        np.testing.assert_allclose(got, X.astype(np.float64) @ W + b, rtol=tol, atol=tol)


def test_eval_kernel_names():
    with pytest.raises(ValueError, match="eval kernel"):
        dense._set_eval_kernel("fast")
    assert dense.SMALL_M_ISA in ("avx512", "avx2", "baseline")
    assert dense.SMALL_M_ENABLED in (True, False)


@pytest.mark.skipif(not dense.SMALL_M_ENABLED, reason="GEMM serves every layer on this CPU")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("sizes", [[784, 128, 128, 64], [30, 40, 72, 48], [64, 64, 64, 32]])
def test_rows_do_not_depend_on_the_batch(dtype, sizes):
    # bit for bit on the small-M kernel's layers: a row gives the same output alone, in
    # any slice, or in the whole batch (predict in batches equals one forward). (BLAS
    # GEMM, used for other widths, makes no such promise.)
    net = build(sizes, dtype)
    X = np.random.default_rng(14).normal(size=(300, sizes[0])).astype(dtype)
    whole = net(X).copy()
    for lo, hi in [(0, 1), (5, 6), (7, 9), (10, 13), (20, 37), (40, 104), (100, 300)]:
        np.testing.assert_array_equal(net(X[lo:hi]), whole[lo:hi])
    np.testing.assert_array_equal(net.predict(X, batch_size=7), whole)


@pytest.mark.skipif(not dense.SMALL_M_ENABLED, reason="GEMM serves every layer on this CPU")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_two_threads_split_columns_and_give_the_same_bits(dtype):
    # with two threads the small-M layers' columns (and their fused epilogue) are split
    # over nnrt's helper thread from 16 rows on (fewer rows run on one thread): every
    # path gives the same bits as the one-thread forward, and the float64 reference
    from nnrt import _parallel

    net = build([300, 1040, 200, 48], dtype, bias_hidden=True)  # every layer small-M
    X = np.random.default_rng(15).normal(size=(40, 300)).astype(dtype)
    tol = 1e-10 if dtype == "float64" else 1e-4
    try:
        nnrt.set_num_threads(1)
        one = net(X).copy()
        ones = [net(X[i : i + 1]).copy() for i in (0, 7, 39)]
        nnrt.set_num_threads(2)
        jobs = _parallel.stats()["jobs"]
        two = net(X).copy()
        twos = [net(X[i : i + 1]).copy() for i in (0, 7, 39)]
        assert _parallel.stats()["jobs"] > jobs  # the split did run
        for lo, hi in [(0, 3), (3, 11), (11, 40)]:
            np.testing.assert_array_equal(net(X[lo:hi]), one[lo:hi])
    finally:
        nnrt.set_num_threads(None)
    np.testing.assert_array_equal(two, one)
    for i, a, b in zip((0, 7, 39), ones, twos, strict=True):
        np.testing.assert_array_equal(a, one[i : i + 1])
        np.testing.assert_array_equal(b, one[i : i + 1])
    np.testing.assert_allclose(one, reference(net, X), rtol=tol, atol=tol)


@pytest.mark.skipif(not dense.SMALL_M_ENABLED, reason="GEMM serves every layer on this CPU")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_few_rows_on_a_large_weight_stream_it_and_give_the_same_bits(dtype):
    # 2-4 rows of a W beyond L2 (530 x 1000: 2-4 MB; 1000 columns = 62.5 vectors of 16,
    # so the float32 build also runs its scalar tail) stream W in order instead of the
    # blocked small-M kernel: the same bits as one row, as a larger batch, and the reference
    net = build([530, 1000, 48], dtype, bias_hidden=True)
    X = np.random.default_rng(16).normal(size=(30, 530)).astype(dtype)
    tol = 1e-10 if dtype == "float64" else 1e-4
    try:
        nnrt.set_num_threads(1)
        whole = net(X).copy()
        for lo in range(0, 20, 3):
            for m in (1, 2, 3, 4, 5, 6, 7, 8):
                np.testing.assert_array_equal(net(X[lo : lo + m]), whole[lo : lo + m])
    finally:
        nnrt.set_num_threads(None)
    np.testing.assert_allclose(whole, reference(net, X), rtol=tol, atol=tol)
