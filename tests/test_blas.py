"""The BLAS backends of nnrt's GEMM/GEMV helpers (nnrt/_blas.pyx, nnrt/blas.pxd).

Every backend that loads on this machine (numpy's OpenBLAS, scipy's, MKL and the
scipy-openblas64 wheel when installed; the others are skipped) runs the same
checks: ``gemm_rm``/``gemv_rm`` called from a separately compiled module (the test
suite's Cython module, as a third-party plugin would) and Dense's forward and
backward, against float64 numpy references written here (rtol 1e-9 in float64).
nnrt's own GEMM kernel (the route ``NNRT_GEMM_KERNEL``/``use_kernel`` selects) runs
the same float64 reference checks over every backend, with the shapes that must fall
back to the BLAS. The selection (``NNRT_BLAS``, the default, the calibrations) is
checked in fresh interpreters; thread control and ``nnrt info`` against
threadpoolctl's independent view of the libraries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from _cytests import load

import nnrt
from nnrt import _blas

cy = load("_cy_layer_tests")

AVAILABLE = _blas.available()


@pytest.fixture(params=_blas.BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    name = request.param
    if name not in AVAILABLE:
        pytest.skip(f"BLAS backend {name} not available here: {_blas.info()['unavailable']}")
    previous = _blas.use(name)
    try:
        yield name
    finally:
        _blas.use(previous)


def _seen_by_threadpoolctl(path: str) -> list[dict] | None:
    """threadpoolctl's entries for the library at ``path`` (its independent view), or
    None when this threadpoolctl predates the scipy-openblas builds (< 3.5 does not
    know their file names) and lists no such library."""
    import threadpoolctl

    infos = threadpoolctl.threadpool_info()
    mine = [d for d in infos if os.path.realpath(d.get("filepath", "")) == os.path.realpath(path)]
    old = tuple(int(p) for p in threadpoolctl.__version__.split(".")[:2]) < (3, 5)
    if not mine and old and "scipy_openblas" in os.path.basename(path):
        return None
    return mine


def _close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    # plus an atol of a fraction of the largest entry, for entries that cancel to ~0
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=(1e-12 if rtol < 1e-6 else rtol) * scale)


def test_scipy_and_numpy_openblas_are_always_there() -> None:
    assert "scipy" in AVAILABLE  # the fallback every pointer starts from
    if _blas.find_numpy_openblas() is not None:
        assert "openblas" in AVAILABLE


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_gemm_rm_matches_numpy(backend: str, dtype: type, ta: bool, tb: bool) -> None:
    rng = np.random.default_rng(7)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    for m, n, k in ((1, 1, 1), (1, 37, 64), (5, 3, 8), (33, 17, 65), (64, 128, 100)):
        for pad in (0, 3):
            opA, opB = rng.standard_normal((m, k)), rng.standard_normal((k, n))
            C0 = rng.standard_normal((m, n))
            stA, stB = (opA.T if ta else opA), (opB.T if tb else opB)
            A = np.full((stA.shape[0], stA.shape[1] + pad), np.nan, dtype=dtype)
            B = np.full((stB.shape[0], stB.shape[1] + pad), np.nan, dtype=dtype)
            C = np.full((m, n + pad), 7.0, dtype=dtype)
            A[:, : stA.shape[1]], B[:, : stB.shape[1]], C[:, :n] = stA, stB, C0
            cy.gemm_rm_call(ta, tb, m, n, k, 1.5, A, B, -0.5, C)
            # reference in float64 from the values actually stored
            a64 = A[:, : stA.shape[1]].astype(np.float64)
            b64 = B[:, : stB.shape[1]].astype(np.float64)
            want = 1.5 * (a64.T if ta else a64) @ (b64.T if tb else b64)
            want += -0.5 * C0.astype(dtype).astype(np.float64)
            _close(C[:, :n].astype(np.float64), want, rtol)
            assert np.all(C[:, n:] == 7.0), "wrote outside C"


def test_gemm_rm_beta_zero_does_not_read_c(backend: str) -> None:
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((6, 5)), rng.standard_normal((5, 4))
    C = np.full((6, 4), np.nan)
    cy.gemm_rm_call(False, False, 6, 4, 5, 1.0, A, B, 0.0, C)
    _close(C, A @ B, 1e-9)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("trans", [False, True])
def test_gemv_rm_matches_numpy(backend: str, dtype: type, trans: bool) -> None:
    rng = np.random.default_rng(11)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    for m, n in ((1, 1), (1, 50), (50, 1), (7, 13), (300, 257)):
        for pad in (0, 5):
            A = np.full((m, n + pad), np.nan, dtype=dtype)
            A[:, :n] = rng.standard_normal((m, n))
            x = rng.standard_normal(m if trans else n).astype(dtype)
            y0 = rng.standard_normal(n if trans else m).astype(dtype)
            y = y0.copy()
            cy.gemv_rm_call(trans, m, n, 2.0, A, x, 0.25, y)
            a64 = A[:, :n].astype(np.float64)
            want = 2.0 * ((a64.T if trans else a64) @ x.astype(np.float64))
            want += 0.25 * y0.astype(np.float64)
            _close(y.astype(np.float64), want, rtol)
            # beta = 0 must not read y
            y[:] = np.nan
            cy.gemv_rm_call(trans, m, n, 1.0, A, x, 0.0, y)
            _close(y.astype(np.float64), want / 2.0 - 0.125 * y0.astype(np.float64), rtol)


def test_dense_float64_reference(backend: str) -> None:
    """Dense forward and backward in float64 against numpy, rtol 1e-9."""
    rng = np.random.default_rng(5)
    layer = nnrt.layer("dense", 37, 23)
    X = rng.standard_normal((19, 37))
    dY = rng.standard_normal((19, 23))
    params = layer.params()
    W, b = np.array(params["weight"]), np.array(params["bias"])
    Y = np.array(layer.forward(X, True))
    _close(Y, X @ W + b, 1e-9)
    dX = np.array(layer.backward(dY))
    _close(dX, dY @ W.T, 1e-9)
    grads = layer.grads()
    _close(np.array(grads["weight"]), X.T @ dY, 1e-9)
    _close(np.array(grads["bias"]), dY.sum(axis=0), 1e-9)


def test_perf_reports_the_backend_in_use(backend: str) -> None:
    from nnrt.perf import blas_backend, blas_info

    assert blas_backend() == backend
    info = blas_info()
    assert info["backend"] == backend and os.path.exists(info["filepath"])
    assert info["int"] == ("LP64" if backend == "scipy" else "ILP64")


def test_use_rejects_unknown_names() -> None:
    before = _blas.info()["backend"]
    with pytest.raises(ValueError, match="unknown BLAS backend"):
        _blas.use("atlas")
    assert _blas.info()["backend"] == before


def test_threads_follow_set_num_threads(backend: str) -> None:
    before = nnrt.get_num_threads()
    path = _blas.info()["filepath"]
    try:
        for n in (1, 2):
            nnrt.set_num_threads(n)
            assert nnrt.get_num_threads() == n
            assert _blas.info()["threads"] == n
            # threadpoolctl's independent view of the library in use
            mine = _seen_by_threadpoolctl(path)
            if mine is not None:
                assert [d["num_threads"] for d in mine] == [n]
    finally:
        nnrt.set_num_threads(before)


def test_c_thread_controls_set_the_backend_in_use(backend: str) -> None:
    before = nnrt.get_num_threads()
    path = os.path.realpath(_blas.info()["filepath"])
    try:
        for n in (1, 2):
            got = cy.blas_threads_call(n)
            if got == -1:  # this backend has no C thread control
                assert _blas.thread_control_addresses() is None
                return
            assert got == n and nnrt.get_num_threads() == n
            mine = _seen_by_threadpoolctl(path)
            if mine is not None:
                assert [d["num_threads"] for d in mine] == [n]
    finally:
        nnrt.set_num_threads(before)


def test_info_kernel_and_version_match_threadpoolctl(backend: str) -> None:
    info = _blas.info()
    assert info["backend"] == backend and info["reason"].startswith("set by")
    text = subprocess_info(env={"NNRT_BLAS": backend})
    assert text["gemm"]["backend"] == backend
    assert text["gemm"]["reason"] == f"forced by NNRT_BLAS={backend}"
    mine = _seen_by_threadpoolctl(info["filepath"])
    if mine is None:
        pytest.skip("this threadpoolctl does not know scipy-openblas libraries")
    assert len(mine) == 1, info["filepath"]
    lib = mine[0]
    assert lib["internal_api"] == ("mkl" if backend == "mkl" else "openblas")
    assert lib["version"] and lib["version"].split("-")[0] in info["library"]
    if "architecture" in lib:
        assert info["kernel"] == lib["architecture"]


# --------------------------------------------------------------- fresh interpreters
def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("NNRT_BLAS", "NNRT_GEMM_KERNEL")}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120
    )


def subprocess_info(env: dict[str, str] | None = None) -> dict:
    proc = _run("import json, nnrt.config as c; print(json.dumps(c.config_info()))", env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_default_is_numpy_openblas_unless_calibration_picks_mkl() -> None:
    info = subprocess_info()["gemm"]
    if _blas.find_numpy_openblas() is None:
        assert info["backend"] == "scipy" and "fallback" in info["reason"]
    elif _blas.find_mkl() is None:
        assert info["backend"] == "openblas" and info["reason"].startswith("default")
        assert info["calibration"] is None
    else:
        cal = info["calibration"]
        ratio = cal["seconds"]["mkl"] / cal["seconds"]["openblas"]
        assert info["backend"] == ("mkl" if ratio <= cal["margin"] else "openblas")
        assert info["reason"].startswith("calibrated")


def test_bad_nnrt_blas_warns_and_uses_the_default() -> None:
    proc = _run(
        "import warnings; warnings.simplefilter('always')\n"
        "import nnrt, nnrt._blas as b; print(b.info()['backend'])",
        {"NNRT_BLAS": "atlas"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" in proc.stderr and "NNRT_BLAS='atlas'" in proc.stderr
    default = "openblas" if _blas.find_numpy_openblas() else "scipy"
    assert proc.stdout.split()[-1] in (default, "mkl")


def test_unavailable_forced_backend_warns() -> None:
    missing = [name for name in _blas.BACKENDS if name not in AVAILABLE]
    if not missing:
        pytest.skip("every backend is installed here")
    proc = _run(
        "import nnrt, nnrt._blas as b; print(b.info()['backend'])", {"NNRT_BLAS": missing[0]}
    )
    assert proc.returncode == 0, proc.stderr
    assert f"NNRT_BLAS={missing[0]}" in proc.stderr and "unavailable" in proc.stderr
    assert proc.stdout.split()[-1] != missing[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_import_does_not_load_mkl_until_the_first_gemm() -> None:
    if _blas.find_mkl() is None:
        pytest.skip("MKL is not installed")
    code = (
        "import nnrt, numpy as np\n"
        "maps = lambda: open('/proc/self/maps').read()\n"
        "print('before', 'libmkl_rt' in maps())\n"
        "nnrt.layer('dense', 4, 3).forward(np.ones((2, 4)))\n"
        "import nnrt._blas as b\n"
        "print('after', 'libmkl_rt' in maps(), b._state['calibration'] is not None)\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "before False" in proc.stdout and "after True True" in proc.stdout, proc.stdout


def test_nnrt_info_prints_the_backend() -> None:
    name = "openblas" if "openblas" in AVAILABLE else "scipy"
    env = {k: v for k, v in os.environ.items() if k != "NNRT_BLAS"}
    env["NNRT_BLAS"] = name
    proc = subprocess.run(
        [sys.executable, "-m", "nnrt.config"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    block = proc.stdout.split("blas backend (nnrt's GEMMs):", 1)[1].split("blas / threads")[0]
    lines = dict(line.split(None, 1) for line in block.strip().splitlines())
    assert lines["backend"].startswith(f"{name}: OpenBLAS ")
    assert lines["chosen"] == f"forced by NNRT_BLAS={name}"
    assert int(lines["threads"]) >= 1
    previous = _blas.use(name)
    try:
        here = _blas.info()
    finally:
        _blas.use(previous)
    assert lines["filepath"] == here["filepath"] and lines["kernel"] == str(here["kernel"])


# ----------------------------------------------------------- nnrt's own GEMM kernel


@pytest.fixture
def kernel_on(backend: str) -> Iterator[str]:
    """The kernel route forced on (every route, both dtypes) over ``backend``, whose
    threads are set to one (the kernel serves one-thread GEMMs only)."""
    before_threads = _blas.threads()
    previous = _blas.use_kernel("on")
    _blas.set_threads(1)
    try:
        yield backend
    finally:
        _blas.use_kernel(previous)
        _blas.set_threads(before_threads)


def _stored(rng: np.random.Generator, op: np.ndarray, trans: bool, pad: int, dtype: type):
    """``op`` stored as the GEMM reads it (transposed when ``trans``) in rows padded
    with ``pad`` NaN entries; returns (array, the values as float64 op)."""
    st = op.T if trans else op
    a = np.full((st.shape[0], st.shape[1] + pad), np.nan, dtype=dtype)
    a[:, : st.shape[1]] = st
    v = a[:, : st.shape[1]].astype(np.float64)
    return a, (v.T if trans else v)


# (m, n, k): n a multiple of 8 and >= 32 (the kernel's shapes), rows and depths that are
# not multiples of its blocks, one row, one step of k, k deeper than one block of k
KERNEL_SHAPES = ((1, 32, 1), (5, 40, 8), (33, 64, 65), (130, 96, 257), (9, 1024, 3))
# outputs narrower than 32 columns (a classifier's last layer): from 9 columns and 64K
# multiply-adds up, NN and TN run the kernel on padded copies; smaller ones, 8 columns
# and fewer, and NT stay with the BLAS
NARROW_SHAPES = ((33, 10, 257), (130, 17, 257), (70, 31, 40), (5, 10, 8), (200, 8, 100),
                 (300, 2, 300), (1, 10, 784))  # fmt: skip


def _narrow_served(m: int, n: int, k: int, ta: bool, tb: bool) -> bool:
    return not tb and n > 8 and m * n * k >= 65536


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_kernel_route_matches_numpy(kernel_on: str, dtype: type, ta: bool, tb: bool) -> None:
    rng = np.random.default_rng(17)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    for m, n, k in KERNEL_SHAPES + NARROW_SHAPES:
        for pad, beta in ((0, 0.0), (3, 0.0), (0, 1.0), (3, 1.0)):
            A, a64 = _stored(rng, rng.standard_normal((m, k)), ta, pad, dtype)
            B, b64 = _stored(rng, rng.standard_normal((k, n)), tb, pad, dtype)
            C0 = rng.standard_normal((m, n)).astype(dtype)
            C = np.full((m, n + pad), 7.0, dtype=dtype)
            # beta = 0: C is not read (NaN stays out); beta = 1: C + op(A) op(B)
            C[:, :n] = C0 if beta else np.nan
            before = _blas._kernel_calls()
            cy.gemm_rm_call(ta, tb, m, n, k, 1.0, A, B, beta, C)
            served = _blas._kernel_calls() - before
            # TT is not a kernel route; every other combination is (narrow: see above)
            want_served = not (ta and tb) and (n >= 32 or _narrow_served(m, n, k, ta, tb))
            assert served == want_served, (m, n, k, ta, tb, pad, beta)
            want = a64 @ b64 + (C0.astype(np.float64) if beta else 0.0)
            _close(C[:, :n].astype(np.float64), want, rtol)
            assert np.all(C[:, n:] == 7.0), "wrote outside C"


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_kernel_route_falls_back_to_the_blas(kernel_on: str, ta: bool, tb: bool) -> None:
    """alpha != 1, beta != 0, outputs narrower than 32 or not a multiple of 8: the BLAS
    runs them, with its full alpha/beta semantics."""
    rng = np.random.default_rng(23)
    cases = [  # (m, n, k, alpha, beta)
        (7, 64, 9, 1.5, 0.0),
        (7, 64, 9, 1.0, -0.5),
        (7, 64, 9, 2.0, 1.0),
        (7, 37, 9, 1.0, 0.0),
        (7, 24, 9, 1.0, 0.0),
        (7, 100, 9, 1.0, 0.0),
        (1, 1, 1, 1.0, 0.0),
    ]
    for m, n, k, alpha, beta in cases:
        A, a64 = _stored(rng, rng.standard_normal((m, k)), ta, 2, np.float64)
        B, b64 = _stored(rng, rng.standard_normal((k, n)), tb, 2, np.float64)
        C0 = rng.standard_normal((m, n))
        C = np.full((m, n + 2), 7.0)
        C[:, :n] = C0 if beta != 0 else np.nan
        before = _blas._kernel_calls()
        cy.gemm_rm_call(ta, tb, m, n, k, alpha, A, B, beta, C)
        assert _blas._kernel_calls() == before, (m, n, k, alpha, beta)
        want = alpha * (a64 @ b64) + (beta * C0 if beta != 0 else 0.0)
        _close(C[:, :n], want, 1e-9)
        assert np.all(C[:, n:] == 7.0)


@pytest.mark.parametrize("tb", [False, True])
def test_kernel_route_two_threads_bit_identical(kernel_on: str, tb: bool) -> None:
    """With two threads the kernel's rows are split over nnrt's helper thread: each row's
    sums are the same, so the result equals the one-thread result bit for bit."""
    rng = np.random.default_rng(29)
    m, n, k = 517, 264, 300
    A = rng.standard_normal((m, k)).astype(np.float32)
    B = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    out = {}
    try:
        for threads in (1, 2):
            nnrt.set_num_threads(threads)
            C = np.full((m, n), np.nan, dtype=np.float32)
            before = _blas._kernel_calls()
            for _ in range(3):  # the helper may be asleep at the first
                cy.gemm_rm_call(False, tb, m, n, k, 1.0, A, B, 0.0, C)
            assert _blas._kernel_calls() == before + 3
            out[threads] = C
    finally:
        nnrt.set_num_threads(None)
    np.testing.assert_array_equal(out[1], out[2])
    b64 = B.astype(np.float64)
    _close(out[2].astype(np.float64), A.astype(np.float64) @ (b64.T if tb else b64), 2e-4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dense_through_the_kernel_route(kernel_on: str, dtype: type) -> None:
    """Dense forward (NN), weight gradient (TN) and input gradient (NT) through the
    kernel, against float64 numpy from the stored values."""
    rng = np.random.default_rng(31)
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    layer = nnrt.layer("dense", 40, 64)
    layer.to_dtype(dtype)
    X = rng.standard_normal((19, 40)).astype(dtype)
    dY = rng.standard_normal((19, 64)).astype(dtype)
    params = layer.params()
    W = np.array(params["weight"], dtype=np.float64)
    b = np.array(params["bias"], dtype=np.float64)
    X64, dY64 = X.astype(np.float64), dY.astype(np.float64)
    before = _blas._kernel_calls()
    Y = np.array(layer.forward(X, True), dtype=np.float64)
    _close(Y, X64 @ W + b, rtol)
    dX = np.array(layer.backward(dY), dtype=np.float64)
    _close(dX, dY64 @ W.T, rtol)
    _close(np.array(layer.grads()["weight"], dtype=np.float64), X64.T @ dY64, rtol)
    # forward (n = 64) and dW (n = 64) qualify; dX (n = 40) is a multiple of 8 >= 32 too
    assert _blas._kernel_calls() - before == 3


def test_kernel_route_is_thread_safe(kernel_on: str) -> None:
    """NT GEMMs (each with its own scratch copy of B) from several Python threads at
    once, every result checked."""
    import threading

    rng = np.random.default_rng(37)
    jobs = []
    for i in range(4):
        m, n, k = 20 + i, 64 + 8 * i, 50 + 3 * i
        A = rng.standard_normal((m, k))
        B = rng.standard_normal((n, k))
        jobs.append((m, n, k, A, B, A @ B.T))
    errors: list[BaseException] = []

    def work(job: tuple) -> None:
        m, n, k, A, B, want = job
        try:
            for _ in range(30):
                C = np.full((m, n), np.nan)
                cy.gemm_rm_call(False, True, m, n, k, 1.0, A, B, 0.0, C)
                _close(C, want, 1e-9)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_use_kernel_rejects_unknown_modes() -> None:
    before = _blas.info()["gemm_kernel"]["mode"]
    with pytest.raises(ValueError, match="GEMM kernel mode"):
        _blas.use_kernel("fast")
    assert _blas.info()["gemm_kernel"]["mode"] == before


def test_kernel_auto_calibrates_at_the_first_gemm() -> None:
    code = (
        "import json, nnrt, numpy as np, nnrt._blas as b\n"
        "print(json.dumps({'pending': b._kstate['pending']}))\n"
        "nnrt.layer('dense', 4, 3).forward(np.ones((2, 4)))\n"
        "print(json.dumps(b.info()['gemm_kernel']))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    first, info = (json.loads(line) for line in proc.stdout.strip().splitlines()[-2:])
    assert info["mode"] == "auto" and info["requested"] is None
    assert info["float64"] == {"NN": False, "TN": False, "NT": False}
    if info["isa"] == "baseline":
        assert not first["pending"] and info["ratios"] is None
        assert not any(info["float32"].values())
        return
    assert first["pending"], "calibrated at import, not at the first GEMM"
    ratios = info["ratios"]
    assert set(ratios) == {"NN", "TN", "NT"} and all(r > 0 for r in ratios.values())
    for route, ratio in ratios.items():
        assert info["float32"][route] == (ratio <= 0.95), (route, ratio)
    assert info["against"] in _blas.BACKENDS and "calibrated" in info["reason"]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_nnrt_gemm_kernel_forces_the_route(mode: str) -> None:
    proc = _run(
        "import json, nnrt._blas as b; print(json.dumps(b.info()['gemm_kernel']))",
        {"NNRT_GEMM_KERNEL": mode},
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    routes = {"NN": mode == "on", "TN": mode == "on", "NT": mode == "on"}
    assert info["mode"] == mode and info["float32"] == routes and info["float64"] == routes
    assert info["ratios"] is None and info["reason"] == f"forced by NNRT_GEMM_KERNEL={mode}"


def test_bad_nnrt_gemm_kernel_warns_and_uses_auto() -> None:
    proc = _run(
        "import warnings; warnings.simplefilter('always')\n"
        "import nnrt._blas as b; print(b.info()['gemm_kernel']['mode'])",
        {"NNRT_GEMM_KERNEL": "fast"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" in proc.stderr and "NNRT_GEMM_KERNEL='fast'" in proc.stderr
    assert proc.stdout.split()[-1] == "auto"


# ------------------------------------- the kernel's blocking, copies and transposes
# nnrt/_smallm.h: outputs wider than 512 columns run in panels of 288 (and a ragged
# last panel); from 512 rows a W that is not 64-byte aligned, or whose rows are an
# even number of cache lines apart, is copied into an aligned buffer first; the NT
# route transposes W with 8 x 8 (float) / 4 x 4 (double) register blocks and the
# ragged edges element by element. None of it may change a sum.


def _misaligned(values: np.ndarray, offset: int) -> np.ndarray:
    """A C-contiguous copy of ``values`` starting ``offset`` elements past a 64-byte
    boundary (numpy aligns to 16 bytes only, so the kernel sees every alignment)."""
    item = values.dtype.itemsize
    buf = np.empty(values.size + 64 // item + offset, dtype=values.dtype)
    start = (-buf.ctypes.data % 64) // item + offset
    out = buf[start : start + values.size].reshape(values.shape)
    out[...] = values
    assert out.ctypes.data % 64 == offset * item and out.flags.c_contiguous
    return out


# (m, n, k): panels of 288 columns with a ragged last one (n = 600, 1032), transposes
# with ragged edges (n, k not multiples of 8 or 4), one step of k, 512 rows and more
# (the aligned copy of W), a single row
BLOCK_SHAPES = (
    (3, 600, 5),
    (2, 1032, 9),
    (37, 40, 13),
    (11, 72, 1),
    (520, 48, 7),
    (513, 600, 3),
    (1, 1032, 17),
)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("route", ["NN", "TN", "NT"])
def test_kernel_blocks_and_copies_match_numpy(kernel_on: str, dtype: type, route: str) -> None:
    """Every route over shapes that reach the panels, the copies and the transpose
    edges, with W at each alignment within a vector, beta 0 (C not read: NaN stays
    out) and beta 1; float64 to rtol 1e-9 against numpy in float64."""
    rng = np.random.default_rng(41)
    ta, tb = route == "TN", route == "NT"
    rtol = 1e-9 if dtype == np.float64 else 2e-4
    for (m, n, k), offset in zip(BLOCK_SHAPES, (0, 1, 2, 3, 1, 2, 3), strict=True):
        a64 = rng.standard_normal((m, k))
        b64 = rng.standard_normal((k, n))
        A = np.ascontiguousarray((a64.T if ta else a64).astype(dtype))
        B = _misaligned(np.ascontiguousarray((b64.T if tb else b64).astype(dtype)), offset)
        for beta in (0.0, 1.0):
            C0 = rng.standard_normal((m, n)).astype(dtype)
            C = C0.copy() if beta else np.full((m, n), np.nan, dtype=dtype)
            before = _blas._kernel_calls()
            cy.gemm_rm_call(ta, tb, m, n, k, 1.0, A, B, beta, C)
            assert _blas._kernel_calls() == before + 1, (route, m, n, k)
            # the reference from the stored values, in float64
            a_st, b_st = A.astype(np.float64), B.astype(np.float64)
            want = (a_st.T if ta else a_st) @ (b_st.T if tb else b_st)
            _close(C.astype(np.float64), want + (C0.astype(np.float64) if beta else 0.0), rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("route", ["NN", "TN", "NT"])
def test_kernel_rows_do_not_depend_on_blocking(kernel_on: str, dtype: type, route: str) -> None:
    """A row of C is the same, bit for bit, whether it comes from a call of 600 rows
    (W copied to an aligned buffer, 288-column panels), of 7 rows or of one, and
    whatever the alignment of W: the blocking and the copies move operands, never the
    order of a sum."""
    rng = np.random.default_rng(43)
    ta, tb = route == "TN", route == "NT"
    m, n, k = 600, 616, 19
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)

    def run(rows: slice, offset: int) -> np.ndarray:
        part = a[rows]
        A = np.ascontiguousarray(part.T) if ta else np.ascontiguousarray(part)
        C = np.full((part.shape[0], n), np.nan, dtype=dtype)
        cy.gemm_rm_call(ta, tb, part.shape[0], n, k, 1.0, A, _misaligned(b, offset), 0.0, C)
        return C

    whole = run(slice(0, m), 0)
    for offset in (1, 3):
        np.testing.assert_array_equal(run(slice(0, m), offset), whole)
    for lo, hi in ((0, 1), (5, 12), (599, 600), (100, 611)):
        np.testing.assert_array_equal(run(slice(lo, hi), 2), whole[lo:hi])
    want = a.astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    _close(whole.astype(np.float64), want, 1e-9 if dtype == np.float64 else 2e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_kernel_rows_identical_through_the_aligned_copy(dtype: type) -> None:
    """The eval path's kernel (nnrt_smallm) copies W to an aligned buffer from 512
    rows and blocks 1024 columns in panels: a row gives the same output alone, in a
    few rows and in a batch of 600 (bit for bit), equal to float64 numpy."""
    from nnrt import dense

    dense._set_eval_kernel("small")
    try:
        layer = nnrt.layer("dense", 21, 1024).to_dtype(dtype)
        rng = np.random.default_rng(47)
        X = rng.standard_normal((600, 21)).astype(dtype)
        whole = np.array(layer.forward(X, False))
        for lo, hi in ((0, 1), (3, 10), (599, 600)):
            np.testing.assert_array_equal(np.array(layer.forward(X[lo:hi], False)), whole[lo:hi])
    finally:
        dense._set_eval_kernel("auto")
    p = layer.params()
    want = X.astype(np.float64) @ p["weight"].astype(np.float64) + p["bias"]
    _close(whole.astype(np.float64), want, 1e-9 if dtype == np.float64 else 2e-4)


def test_gemm_shapes_benchmark_runs() -> None:
    """benchmarks/gemm_shapes.py (nnrt's routes against the other libraries per GEMM
    shape) runs and reports every shape of a configuration."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gemm_shapes.py")
    proc = subprocess.run(
        [
            sys.executable,
            script,
            "--configs",
            "tiny",
            "--rounds",
            "1",
            "--contenders",
            "nnrt,eval,blas,numpy",
            "--clock",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("tiny L")]
    assert len(rows) == 8, proc.stdout  # 3 layers: NN, TN each, NT for the last two


# ----------------------------------------------------------- background prefetch
def test_prefetch_queue_drains_under_kernel_gemms_and_changes_nothing(kernel_on: str) -> None:
    """fit queues its next batch's rows for the kernel to prefetch while a batch trains
    (nnrt/_smallm.h): the queue counts cache lines, drains as kernel GEMMs run, and a
    GEMM's result is the same bits with or without it."""
    import threading

    _blas.prefetch_clear()
    rng = np.random.default_rng(3)
    src = rng.standard_normal((300, 1000)).astype(np.float32)  # rows of 4000 bytes
    rows = np.array([5, 299, 0, 17, 17], dtype=np.intp)
    lines = _blas.prefetch_rows(src, rows)
    assert lines == len(rows) * -(-4000 // 64)
    assert _blas.prefetch_left() == lines
    # a queue is per thread: another thread's is empty, and setting it leaves this one
    seen: list[int] = []
    t = threading.Thread(
        target=lambda: seen.extend([_blas.prefetch_left(), _blas.prefetch_rows(src, rows[:1])])
    )
    t.start()
    t.join()
    assert seen == [0, 63] and _blas.prefetch_left() == lines
    # bad arguments raise and leave the queue as it was
    for args, exc in (
        ((list(src), rows), TypeError),
        ((np.asfortranarray(src), rows), ValueError),
        ((src, rows.astype(np.int32)), ValueError),
        ((src, rows.reshape(5, 1)), ValueError),
        ((src, np.array([300], dtype=np.intp)), IndexError),
        ((src, np.array([-1], dtype=np.intp)), IndexError),
    ):
        with pytest.raises(exc):
            _blas.prefetch_rows(*args)
        assert _blas.prefetch_left() == lines
    # the kernel's GEMMs drain it; the results are those of an empty queue, bit for bit
    m, n, k = 64, 256, 1024
    A = rng.standard_normal((m, k)).astype(np.float32)
    B = rng.standard_normal((k, n)).astype(np.float32)
    with_queue = np.empty((m, n), dtype=np.float32)
    before = _blas._kernel_calls()
    cy.gemm_rm_call(False, False, m, n, k, 1.0, A, B, 0.0, with_queue)
    assert _blas._kernel_calls() == before + 1
    assert _blas.prefetch_left() == 0
    plain = np.empty((m, n), dtype=np.float32)
    cy.gemm_rm_call(False, False, m, n, k, 1.0, A, B, 0.0, plain)
    assert with_queue.tobytes() == plain.tobytes()
    _close(plain.astype(np.float64), A.astype(np.float64) @ B.astype(np.float64), 2e-4)
    # a queue whose source is gone is harmless: only prefetched, never read
    big = rng.standard_normal((64, 4096)).astype(np.float32)
    assert _blas.prefetch_rows(big, np.arange(64, dtype=np.intp)) == 64 * 256
    del big
    cy.gemm_rm_call(False, False, m, n, k, 1.0, A, B, 0.0, with_queue)
    assert with_queue.tobytes() == plain.tobytes()
    _blas.prefetch_clear(release=True)
    assert _blas.prefetch_left() == 0
    assert _blas.prefetch_rows(src[:0], np.zeros(0, dtype=np.intp)) == 0
