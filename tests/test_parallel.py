"""Two-thread element-wise kernels (nnrt/_parallel.h) and the default thread policy.

Above a size threshold the element-wise kernels (sigmoid, BatchNorm's element-wise
passes, softmax cross-entropy, SGD/Adam, Dense's bias gradient) run in contiguous
chunks on the caller and nnrt's helper thread. Every element is computed by the same
code as in one thread, so the 2-thread results must be bit-identical to the 1-thread
ones; they are also checked against float64 numpy references written here. The
policy is checked for its logic (what it picks), never for timing.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import nnrt
import nnrt.losses
import nnrt.optim
from nnrt import _parallel
from nnrt._kernels import softmax_cross_entropy


@pytest.fixture(autouse=True)
def _restore_policy() -> Iterator[None]:
    old = _parallel._set_thresholds()
    yield
    _parallel._set_thresholds(**old)
    nnrt.set_num_threads(None)


def _with_threads(n: int, fn: Callable[[], Any]) -> Any:
    # the element-wise split only (the BLAS keeps its count: the GEMMs stay the same)
    _parallel.set_user_threads(n)
    try:
        return fn()
    finally:
        _parallel.set_user_threads(None)


def _both(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """fn's results with 1 and with 2 element-wise threads; checks the 2-thread run
    went through the helper (job counter)."""
    one = _with_threads(1, fn)
    jobs = _parallel.stats()["jobs"]
    two = _with_threads(2, fn)
    assert _parallel.stats()["jobs"] > jobs, "no job was split over two threads"
    return one, two


def _same(a: Any, b: Any) -> None:
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True)


SIZES = [(1024, 512), (777, 333), (3, 5)]  # above the real thresholds; odd; tiny


def _thresholds_for(shape: tuple[int, int]) -> None:
    # the real thresholds for the large shape, every size split for the others
    if shape[0] * shape[1] < 500_000:
        _parallel._set_thresholds(stream=0, expf=0, exp=0, adam=0)


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sigmoid_two_threads_bit_identical_and_correct(shape: tuple[int, int], dtype: str) -> None:
    _thresholds_for(shape)
    rng = np.random.default_rng(0)
    X = (rng.standard_normal(shape) * 6).astype(dtype)
    dY = rng.standard_normal(shape).astype(dtype)
    layer = nnrt.layer("sigmoid").to_dtype(dtype)

    def run() -> tuple[np.ndarray, np.ndarray]:
        S = layer.forward(X, training=True).copy()
        return S, layer.backward(dY).copy()

    one, two = _both(run)
    _same(one, two)
    ref = _sigmoid64(X)
    tol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(two[0], ref, rtol=tol, atol=tol)
    S64 = two[0].astype(np.float64)
    np.testing.assert_allclose(two[1], dY * S64 * (1 - S64), rtol=tol * 4, atol=tol)


def _bn_reference(
    X: np.ndarray, dY: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X = X.astype(np.float64)
    dY = dY.astype(np.float64)
    n = X.shape[0]
    mean = X.mean(axis=0)
    var = X.var(axis=0)
    istd = 1 / np.sqrt(var + eps)
    xhat = (X - mean) * istd
    Y = gamma * xhat + beta
    dbeta = dY.sum(axis=0)
    dgamma = (dY * xhat).sum(axis=0)
    dX = gamma * istd / n * (n * dY - dbeta - xhat * dgamma)
    return Y, dX, dgamma, dbeta


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batchnorm_two_threads_bit_identical_and_correct(
    shape: tuple[int, int], dtype: str
) -> None:
    _thresholds_for(shape)
    rng = np.random.default_rng(1)
    n, f = shape
    X = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dY = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, f)
    beta = rng.standard_normal(f)

    def run() -> dict[str, np.ndarray]:
        bn = nnrt.layer("batchnorm", f).to_dtype(dtype)
        bn.params()["gamma"][...] = gamma
        bn.params()["beta"][...] = beta
        Y = bn.forward(X, training=True).copy()
        dX = bn.backward(dY).copy()
        Ye = bn.forward(X, training=False).copy()
        out = {"Y": Y, "dX": dX, "Ye": Ye}
        out.update({k: v.copy() for k, v in bn.grads().items()})
        out.update({k: v.copy() for k, v in bn.buffers().items()})
        return out

    one, two = _both(run)
    _same(one, two)
    Y, dX, dgamma, dbeta = _bn_reference(X, dY, gamma.astype(dtype), beta.astype(dtype), 1e-5)
    rtol, atol = (2e-4, 2e-4) if dtype == "float32" else (1e-9, 1e-10)
    np.testing.assert_allclose(two["Y"], Y, rtol=rtol, atol=atol)
    np.testing.assert_allclose(two["dX"], dX, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(two["gamma"], dgamma, rtol=rtol, atol=atol * n)
    np.testing.assert_allclose(two["beta"], dbeta, rtol=rtol, atol=atol * n)


def _mlp(dtype: str, width: int, seed: int = 0) -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 40, width),
            nnrt.layer("batchnorm", width),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", width, width),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", width, 10),
        ],
        seed=seed,
        dtype=dtype,
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", ["sgd", "sgd_nesterov", "adam", "adamw"])
def test_training_steps_two_threads_bit_identical(dtype: str, optimizer: str) -> None:
    # fused BatchNorm+sigmoid, sigmoid, softmax-CE, db, and the optimizer, at sizes
    # above the real thresholds (batch 1024 x 512 features)
    rng = np.random.default_rng(2)
    X = rng.standard_normal((1024, 40)).astype(dtype)
    y = rng.integers(0, 10, 1024)

    def run() -> dict[str, np.ndarray]:
        net = _mlp(dtype, 512)
        if optimizer == "sgd":
            opt: Any = nnrt.optim.SGD(net, lr=0.1, momentum=0.9, weight_decay=1e-4)
        elif optimizer == "sgd_nesterov":
            opt = nnrt.optim.SGD(net, lr=0.1, momentum=0.9, nesterov=True)
        elif optimizer == "adam":
            opt = nnrt.optim.Adam(net, lr=1e-3, weight_decay=1e-4)
        else:
            opt = nnrt.optim.AdamW(net, lr=1e-3)
        for _ in range(3):
            _step(net, opt, X, y)
        return net.state_dict()

    one, two = _both(run)
    _same(one, two)


def _step(net: nnrt.Sequential, opt: Any, X: np.ndarray, y: np.ndarray) -> None:
    out = net.forward(X, training=True)
    _, dY = nnrt.losses.softmax_cross_entropy(out, y)
    net.backward(dY, input_grad=False)
    opt.step()


@pytest.mark.parametrize("shape", [(4096, 10), (2048, 100), (33, 7)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_cross_entropy_two_threads_bit_identical_and_correct(
    shape: tuple[int, int], dtype: str
) -> None:
    if shape[0] < 100:
        _parallel._set_thresholds(exp=0)
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(shape) * 4).astype(dtype)
    labels = rng.integers(0, shape[1], shape[0])
    one, two = _both(lambda: softmax_cross_entropy(logits, labels))
    assert one[0] == two[0]  # the row losses are summed in row order either way
    _same(one[1], two[1])
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    n = shape[0]
    loss = float(np.mean(lse - x[np.arange(n), labels]))
    p = np.exp(x - lse[:, None])
    p[np.arange(n), labels] -= 1
    np.testing.assert_allclose(two[0], loss, rtol=1e-12)
    # float32: the label's entry p - 1 cancels: an absolute error of ~eps / n there
    rtol, atol = (1e-5, 1e-6 / n) if dtype == "float32" else (1e-11, 1e-14 / n)
    np.testing.assert_allclose(two[1], p / n, rtol=rtol, atol=atol)


def test_softmax_cross_entropy_bad_label_still_falls_back() -> None:
    _parallel._set_thresholds(exp=0)
    logits = np.zeros((64, 5))
    labels = np.arange(64) % 5
    labels[40] = 5
    _parallel.set_user_threads(2)
    assert softmax_cross_entropy(logits, labels) is None
    with pytest.raises(ValueError):
        nnrt.losses.softmax_cross_entropy(logits, labels)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_bias_gradient_two_threads(dtype: str) -> None:
    _parallel._set_thresholds(stream=0)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((301, 17)).astype(dtype)
    dY = rng.standard_normal((301, 259)).astype(dtype)
    layer = nnrt.layer("dense", 17, 259).to_dtype(dtype)

    def run() -> dict[str, np.ndarray]:
        layer.forward(X, training=True)
        layer.backward(dY)
        return {k: v.copy() for k, v in layer.grads().items()}

    one, two = _both(run)
    _same(one, two)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(two["bias"], dY.astype(np.float64).sum(axis=0), rtol=tol, atol=tol)


# ------------------------------------------------------------ the policy's logic
def test_policy_reports_auto_and_fixed() -> None:
    pol = _parallel.policy()
    assert pol["mode"] == "auto"
    nnrt.set_num_threads(1)
    assert _parallel.policy()["mode"] == "fixed"
    assert _parallel.policy()["threads"] == 1
    assert _parallel.split_threads("stream", 10**9) == 1
    assert _parallel.gemm_threads(4096, 4096, 4096) == 1
    nnrt.set_num_threads(2)
    # a ceiling, not a command: small GEMMs stay on one thread, a large one is learnt
    _parallel._gemm_forget()
    assert _parallel.gemm_threads(2, 2, 2) == 1
    for _ in range(2):
        _parallel._gemm_learn(4096, 4096, 4096, one=2.0, many=1.0)
    assert _parallel.gemm_threads(4096, 4096, 4096) == 2
    assert _parallel.split_threads("stream", 10**9) == 2
    assert _parallel.split_threads("stream", 3) == 1  # still below the threshold
    nnrt.set_num_threads(None)
    assert _parallel.policy()["mode"] == "auto"


def _auto_policy() -> dict[str, Any]:
    pol = _parallel.policy()
    if pol["blas"] is None:
        pytest.skip("nnrt does not control this BLAS's threads")
    if pol["blas_ceiling"] < 2:
        pytest.skip("the BLAS runs one thread (OPENBLAS_NUM_THREADS=1 or one core)")
    return pol


def test_auto_policy_small_gemms_one_thread_large_ones_learnt() -> None:
    pol = _auto_policy()
    ceiling = pol["blas_ceiling"]
    _parallel._gemm_forget()
    gmin = pol["gemm_min_macs"]
    # the size in multiply-adds plus gemm_weight_macs per weight: the smallest cube over
    side = int(np.ceil(gmin ** (1 / 3)))
    while (side - 1) ** 3 + pol["gemm_weight_macs"] * (side - 1) ** 2 >= gmin:
        side -= 1
    # below the size threshold: one thread, never tried with more
    assert _parallel.gemm_threads(1, 1, 1) == 1
    assert _parallel.gemm_threads(32, 64, 64) == 1  # the tiny benchmark net
    assert _parallel.gemm_threads(side - 2, side - 2, side - 2) == 1
    # above it: each option is tried twice, one thread first
    tried = [_parallel._gemm_next(side, side, side, seconds=1.0) for _ in range(4)]
    assert tried == [1, ceiling] * 2
    assert _parallel.gemm_threads(1024, 1024, 1024) == 1  # a new shape starts at 1
    # more threads measured faster: used, and the element-wise split is on
    _parallel._gemm_learn(1024, 1024, 1024, one=2.0, many=1.0)
    _parallel._gemm_learn(1024, 1024, 1024, one=2.0, many=1.0)
    assert _parallel.gemm_threads(1024, 1024, 1024) == ceiling
    assert _parallel.gemm_threads(1024, 1024, 1024, op=1) == 1  # another kind of call
    assert _parallel.policy()["gemm_verdict"] == "more threads"
    t = pol["split_min_elements"]["stream"]
    assert _parallel.split_threads("stream", t) == 2
    assert _parallel.split_threads("stream", t - 1) == 1
    assert _parallel.split_threads("stream", t // 4 + 1, 4) == 2
    # a small GEMM where one thread wins (a batch-1 GEMV streaming its weights) uses one
    # thread, but does not turn the element-wise split off
    for _ in range(4):
        _parallel._gemm_learn(1, 1024, 1024, one=0.5, many=3.0)
    assert _parallel.gemm_threads(1, 1024, 1024) == 1
    assert _parallel.policy()["gemm_verdict"] == "more threads"
    assert _parallel.split_threads("stream", 10**9) == 2
    # one thread measured faster (e.g. the other core is busy): GEMMs and kernels follow
    for _ in range(4):
        _parallel._gemm_learn(1024, 1024, 1024, one=0.5, many=3.0)
    assert _parallel.gemm_threads(1024, 1024, 1024) == 1
    assert _parallel.policy()["gemm_verdict"] == "one thread"
    assert _parallel.split_threads("stream", 10**9) == 1
    table = _parallel._gemm_table()
    assert any(r["m"] == 1024 and r["samples"][0] >= 6 for r in table)


def test_auto_policy_retries_the_slower_option_less_and_less_often() -> None:
    ceiling = _auto_policy()["blas_ceiling"]
    _parallel._gemm_forget()
    _parallel._set_thresholds(gemm_min_macs=1)
    for _ in range(2):
        _parallel._gemm_learn(64, 64, 64, one=1.0, many=1.5)
    picks = [_parallel._gemm_next(64, 64, 64) for _ in range(16 + 32 + 64)]
    retries = [i for i, p in enumerate(picks) if p == ceiling]
    assert retries == [15, 15 + 32, 15 + 32 + 64]
    # much slower (> 2x): the interval grows 8-fold
    for _ in range(2):
        _parallel._gemm_learn(96, 96, 96, one=1.0, many=5.0)
    picks = [_parallel._gemm_next(96, 96, 96) for _ in range(16 + 128 + 1024)]
    retries = [i for i, p in enumerate(picks) if p == ceiling]
    assert retries == [15, 15 + 128, 15 + 128 + 1024]
    # a first sample of each that differs more than twice: no second sample of the
    # slow option during exploration, the first re-try after 128 calls
    _parallel._gemm_forget()
    _parallel._gemm_learn(80, 80, 80, one=1.0, many=5.0)
    picks = [_parallel._gemm_next(80, 80, 80) for _ in range(128 + 1024)]
    retries = [i for i, p in enumerate(picks) if p == ceiling]
    assert retries == [127, 127 + 1024]


def _threadpoolctl_controls_nnrts_blas() -> bool:
    """Whether threadpoolctl sees the BLAS library nnrt's GEMMs use (threadpoolctl
    < 3.5 does not know the scipy-openblas file names that numpy's OpenBLAS has)."""
    import os

    import threadpoolctl

    path = nnrt.perf.blas_info().get("filepath") or ""
    return any(
        os.path.realpath(d.get("filepath", "")) == os.path.realpath(path)
        for d in threadpoolctl.threadpool_info()
    )


def test_auto_policy_sets_blas_threads_per_gemm_and_follows_threadpoolctl() -> None:
    if not _threadpoolctl_controls_nnrts_blas():
        pytest.skip("this threadpoolctl cannot see (so cannot limit) nnrt's BLAS library")
    _auto_policy()
    _parallel._gemm_forget()
    small = nnrt.layer("dense", 8, 8)
    big = nnrt.layer("dense", 512, 512)
    Xs = np.ones((4, 8))
    Xb = np.ones((256, 512))
    _parallel._set_thresholds(gemm_min_macs=1_000_000)
    for _ in range(2):  # more threads "measured" faster for the big forward GEMM
        _parallel._gemm_learn(256, 512, 512, one=1.0, many=1e-9)
    with threadpool_limits(2, user_api="blas"):
        big.forward(Xb)
        assert _parallel.policy()["blas_ceiling"] == 2
        assert nnrt.get_num_threads() == 2
        small.forward(Xs)
        assert nnrt.get_num_threads() == 1  # the policy lowered it for the small GEMM
        big.forward(Xb)
        assert nnrt.get_num_threads() == 2
    with threadpool_limits(1, user_api="blas"):
        big.forward(Xb)  # someone else set 1: that is the ceiling now
        assert _parallel.policy()["blas_ceiling"] == 1
        assert nnrt.get_num_threads() == 1
        assert _parallel.split_threads("stream", 10**9) == 1


def test_set_num_threads_none_restores_the_policy() -> None:
    nnrt.set_num_threads(1)
    big = nnrt.layer("dense", 512, 512)
    big.forward(np.ones((256, 512)))
    assert nnrt.get_num_threads() == 1  # fixed: the policy leaves the BLAS alone
    nnrt.set_num_threads(None)
    assert _parallel.policy()["mode"] == "auto"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_user_threads_rejects_bad_values(bad: Any) -> None:
    with pytest.raises(ValueError, match="positive int"):
        _parallel.set_user_threads(bad)


def test_set_thresholds_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown job kind"):
        _parallel._set_thresholds(nope=1)


# ---------------------------------------------- thread-count changes and callers
def test_thread_count_changes_while_other_threads_train() -> None:
    # two networks trained in two Python threads (the helper serves one caller at a
    # time; the other runs alone) while a third flips the thread count
    _parallel._set_thresholds(stream=0, expf=0, exp=0, adam=0)
    rng = np.random.default_rng(5)
    X = rng.standard_normal((96, 40))
    y = rng.integers(0, 10, 96)

    def train(seed: int) -> dict[str, np.ndarray]:
        net = _mlp("float64", 24, seed)
        opt = nnrt.optim.SGD(net, lr=0.1, momentum=0.9)
        for _ in range(30):
            _step(net, opt, X, y)
        return net.state_dict()

    expected = [_with_threads(1, lambda s=s: train(s)) for s in (0, 1)]
    stop = threading.Event()

    def flip() -> None:
        i = 0
        while not stop.is_set():
            _parallel.set_user_threads(1 + i % 2)
            i += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    results: list[Any] = [None, None]
    try:
        workers = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, train(i))) for i in (0, 1)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
        assert not any(w.is_alive() for w in workers)
    finally:
        stop.set()
        flipper.join()
    for got, want in zip(results, expected, strict=True):
        _same(got, want)


def _child_sigmoid(q: Any) -> None:
    _parallel._set_thresholds(expf=0)
    _parallel.set_user_threads(2)
    X = np.linspace(-8, 8, 100_003, dtype=np.float32).reshape(1, -1)
    S = nnrt.layer("sigmoid").to_dtype("float32").forward(X)
    q.put((S.tobytes(), _parallel.stats()["started"]))


def test_helper_thread_works_in_a_forked_child() -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    # start the helper in the parent first: the child must start its own
    _parallel._set_thresholds(expf=0)
    X = np.linspace(-8, 8, 100_003, dtype=np.float32).reshape(1, -1)
    want = _with_threads(2, lambda: nnrt.layer("sigmoid").to_dtype("float32").forward(X))
    assert _parallel.stats()["started"]
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_sigmoid, args=(q,))
    p.start()
    got, started = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0
    assert started
    assert got == want.tobytes()


# ------------------------------------------------------- the GEMM kernel's split
@pytest.fixture
def kernel_two_threads() -> Iterator[None]:
    """nnrt's GEMM kernel on for every route and dtype; GEMMs of any size may be split."""
    from nnrt import _blas

    previous = _blas.use_kernel("on")
    split = _blas._set_split()
    _parallel._gemm_forget()
    _parallel._set_thresholds(gemm_min_macs=1)
    try:
        yield
    finally:
        _blas.use_kernel(previous)
        _blas._set_split(*split)
        _parallel._gemm_forget()


def _dense_pass(layer: Any, X: np.ndarray, dY: np.ndarray) -> list[np.ndarray]:
    Y = layer.forward(X, True).copy()
    dX = layer.backward(dY).copy()
    grads = layer.grads()
    return [Y, dX] + [grads[k].copy() for k in sorted(grads)]


def _prefer(m: int, n: int, k: int, op: int, many: bool) -> None:
    # "measured": the ceiling's threads (or one thread) faster for this shape
    for _ in range(2):
        _parallel._gemm_learn(m, n, k, one=1.0 if many else 1e-9, many=1e-9 if many else 1.0, op=op)


# (rows, n_in, n_out): split by rows (many rows), by columns (too few rows for pieces
# of 8), odd row counts; widths multiples of 8 (every GEMM qualifies for the kernel)
SPLIT_SHAPES = [(517, 296, 264), (9, 200, 128), (67, 136, 72)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SPLIT_SHAPES)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_kernel_gemm_split_bit_identical_and_correct(
    kernel_two_threads: None, dtype: str, shape: tuple[int, int, int], mode: int
) -> None:
    # forward X W (NN), weight gradient X^T dY (TN) and input gradient dY W^T (NT, W
    # transposed into scratch on both threads) through the kernel, on one thread and
    # split over two: bit for bit the same, and right against float64 numpy
    from nnrt import _blas

    rows, n_in, n_out = shape
    _blas._set_split(mode, 4)
    rng = np.random.default_rng(41)
    layer = nnrt.layer("dense", n_in, n_out)
    layer.to_dtype(dtype)
    X = rng.standard_normal((rows, n_in)).astype(dtype)
    dY = rng.standard_normal((rows, n_out)).astype(dtype)
    _prefer(rows, n_out, n_in, 0, True)
    _prefer(n_in, n_out, rows, 1, True)
    nnrt.set_num_threads(1)
    one = _dense_pass(layer, X, dY)
    nnrt.set_num_threads(2)
    jobs = _parallel.stats()["jobs"]
    two = [_dense_pass(layer, X, dY) for _ in range(3)]  # the helper may be asleep at first
    assert _parallel.stats()["jobs"] > jobs, "no GEMM was split over two threads"
    for got in two:
        _same(one, got)
    W = layer.params()["weight"].astype(np.float64)
    b = layer.params()["bias"].astype(np.float64)
    X64, dY64 = X.astype(np.float64), dY.astype(np.float64)
    tol = 2e-4 if dtype == "float32" else 1e-9
    Y, dX, db, dW = two[-1]
    np.testing.assert_allclose(Y, X64 @ W + b, rtol=tol, atol=tol * np.abs(X64 @ W).max())
    np.testing.assert_allclose(dX, dY64 @ W.T, rtol=tol, atol=tol * np.abs(dY64 @ W.T).max())
    np.testing.assert_allclose(dW, X64.T @ dY64, rtol=tol, atol=tol * np.abs(X64.T @ dY64).max())
    np.testing.assert_allclose(db, dY64.sum(axis=0), rtol=tol, atol=tol * rows)


def test_kernel_gemm_split_follows_the_learnt_choice(kernel_two_threads: None) -> None:
    # with nnrt.set_num_threads(2) a GEMM is split only where two threads were measured
    # faster; under the size threshold, or where one thread won, it runs on one
    rows, n_in, n_out = 256, 128, 128
    layer = nnrt.layer("dense", n_in, n_out)
    X = np.ones((rows, n_in))
    nnrt.set_num_threads(2)

    def split_jobs() -> int:
        before = _parallel.stats()["jobs"]
        for _ in range(3):
            layer.forward(X, True)
        return int(_parallel.stats()["jobs"] - before)

    _prefer(rows, n_out, n_in, 0, True)
    assert split_jobs() > 0
    _prefer(rows, n_out, n_in, 0, False)
    _prefer(rows, n_out, n_in, 0, False)
    assert split_jobs() == 0
    _parallel._set_thresholds(gemm_min_macs=10 * rows * n_in * n_out)
    _parallel._gemm_forget()
    _prefer(rows, n_out, n_in, 0, True)
    assert split_jobs() == 0  # below the size threshold: never tried on two
    nnrt.set_num_threads(1)
    _parallel._set_thresholds(gemm_min_macs=1)
    assert split_jobs() == 0  # one thread: never split


def test_kernel_gemm_outside_a_dense_call_runs_on_one_thread(kernel_two_threads: None) -> None:
    # a GEMM a plugin calls itself (nnrt/blas.pxd) has no policy bracket: one thread,
    # whatever the Dense call before it picked
    from _cytests import load

    cy = load("_cy_layer_tests")
    rows, n_in, n_out = 256, 128, 128
    layer = nnrt.layer("dense", n_in, n_out)
    nnrt.set_num_threads(2)
    _prefer(rows, n_out, n_in, 0, True)
    before = _parallel.stats()["jobs"]
    layer.forward(np.ones((rows, n_in)), True)
    assert _parallel.stats()["jobs"] > before
    A = np.ones((rows, n_in))
    B = np.ones((n_in, n_out))
    C = np.zeros((rows, n_out))
    before = _parallel.stats()["jobs"]
    cy.gemm_rm_call(False, False, rows, n_out, n_in, 1.0, A, B, 0.0, C)
    assert _parallel.stats()["jobs"] == before
    np.testing.assert_array_equal(C, np.full((rows, n_out), float(n_in)))


def test_split_settings_reject_bad_values() -> None:
    from nnrt import _blas

    with pytest.raises(ValueError, match="mode"):
        _blas._set_split(3)
    with pytest.raises(ValueError, match="chunks"):
        _blas._set_split(None, 1)


def test_split_gemms_from_several_python_threads(kernel_two_threads: None) -> None:
    # Dense passes whose GEMMs the policy splits, from four Python threads at once: one
    # at a time gets the helper (the others run their GEMM, and the NT route's
    # transpose, alone and in their own scratch), every result as in one thread
    rng = np.random.default_rng(43)
    rows, n_in, n_out = 96, 136, 264
    layers = []
    for _ in range(4):
        layer = nnrt.layer("dense", n_in, n_out)
        layer.to_dtype("float32")
        layers.append(layer)
    X = rng.standard_normal((rows, n_in)).astype(np.float32)
    dY = rng.standard_normal((rows, n_out)).astype(np.float32)
    _prefer(rows, n_out, n_in, 0, True)
    _prefer(n_in, n_out, rows, 1, True)
    nnrt.set_num_threads(1)
    want = [_dense_pass(layer, X, dY) for layer in layers]
    nnrt.set_num_threads(2)
    got: list[Any] = [None] * 4
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                got[i] = _dense_pass(layers[i], X, dY)
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    for g, w in zip(got, want, strict=True):
        _same(w, g)


def test_policy_a_faster_retry_of_the_slower_option_wins_at_once() -> None:
    # an unlucky first sample (helper asleep, another library's threads spinning) must
    # not keep two threads out for thousands of calls: a re-try replaces it
    _parallel._gemm_forget()
    _parallel._set_thresholds(gemm_min_macs=1)
    nnrt.set_num_threads(2)
    _parallel._gemm_learn(80, 80, 80, one=1.0, many=5.0)  # lopsided: exploration over
    assert _parallel.gemm_threads(80, 80, 80) == 1
    _parallel._gemm_learn(80, 80, 80, one=1.0, many=0.1)  # the re-try: two threads faster
    assert _parallel.gemm_threads(80, 80, 80) == 2
    # exploration keeps the faster of its two samples
    _parallel._gemm_learn(96, 96, 96, one=1.0, many=0.9)
    _parallel._gemm_learn(96, 96, 96, one=1.0, many=1.5)
    assert _parallel.gemm_threads(96, 96, 96) == 2
