"""Every GEMM shape of benchmarks/run.py's training step and eval forward, at one
thread: nnrt's routes against jax.jit, torch and numpy.

Per dense layer (n_in -> n_out) at the config's batch B, a training step runs

  NN  forward      Y = X W          m = B,    n = n_out, k = n_in
  TN  weight grad  dW = X^T dY      m = n_in, n = n_out, k = B
  NT  input grad   dX = dY W^T      m = B,    n = n_in,  k = n_out (not the first layer)

and the eval forward runs the NN product through nnrt's eval kernel (nnrt/_smallm.h
``nnrt_smallm``). Contenders, float32, one thread:

  nnrt      the GEMM as nnrt/_blas.pyx runs it with the kernel route on: nnrt's kernel
            where the shape qualifies (n >= 32 and a multiple of 8; NN/TN outputs of 9-31
            columns padded, from 64K multiply-adds), else the backend
  eval      the eval path's kernel (NN rows only)
  blas      the BLAS backend nnrt uses (numpy's OpenBLAS by default), same C loop
  jax       jax.jit of the product (x @ w, x.T @ dy, dy @ w.T), block_until_ready
  torch     torch.matmul(..., out=) on the same operand layouts
  numpy     np.matmul(..., out=)

nnrt, eval and blas are timed in a C loop (nnrt._blas._time_calls); jax, torch and
numpy in a Python loop, whose few microseconds a call matter only on the tiny shapes.
Every sample is a loop of calls (about 20 ms) after an untimed pre-roll; rounds are
interleaved over contenders and shapes; the median of the rounds is reported, with
GFLOP/s and nnrt/peer ratios. The process pins itself to one core (as
``taskset -c 0``) and sets XLA's flags before jax is imported.

  python benchmarks/gemm_shapes.py [--configs medium,large] [--rounds 5]
      [--contenders nnrt,eval,blas,jax,torch,numpy] [--clock wall|cpu] [--aligned]
      [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import nnrt  # noqa: E402
from nnrt import _blas  # noqa: E402

CONFIGS = {
    "tiny": (32, [64, 64, 64, 10]),
    "small": (64, [784, 128, 128, 10]),
    "medium": (256, [784, 512, 512, 10]),
    "large": (1024, [1024, 1024, 1024, 1024, 10]),
}
CONTENDERS = ("nnrt", "eval", "blas", "jax", "torch", "numpy")
PEERS = ("jax", "torch", "numpy")
SAMPLE = 0.02  # seconds per timed sample
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def shapes(config: str) -> list[tuple[str, int, int, int, bool, bool]]:
    """(label, m, n, k, trans_a, trans_b) of every GEMM of ``config``'s step."""
    batch, sizes = CONFIGS[config]
    out = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        out.append((f"{config} L{i} NN", batch, n_out, n_in, False, False))
        out.append((f"{config} L{i} TN", n_in, n_out, batch, True, False))
        if i:
            out.append((f"{config} L{i} NT", batch, n_in, n_out, False, True))
    return out


def qualifies(m: int, n: int, k: int, trans_b: bool) -> bool:
    """nnrt/_blas.pyx's kernel route takes outputs >= 32 wide and a multiple of 8, and
    (NN, TN) outputs of 9-31 columns on padded copies from 64K multiply-adds."""
    if n >= 32:
        return n % 8 == 0
    return not trans_b and n > 8 and m * n * k >= 65536


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """``a`` copied to memory that starts on a 64-byte boundary (numpy aligns to 16)."""
    buf = np.empty(a.nbytes + 64, dtype=np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


ALIGNED = False  # --aligned: every operand 64-byte aligned (as nnrt's weights are)


class Shape:
    def __init__(self, label: str, m: int, n: int, k: int, ta: bool, tb: bool) -> None:
        self.label, self.m, self.n, self.k, self.ta, self.tb = label, m, n, k, ta, tb
        self.flops = 2.0 * m * n * k
        self.ops = _blas._Operands("float32", m, n, k, ta, tb)
        rng = np.random.default_rng(0)
        self.A = rng.standard_normal(self.ops.A.shape).astype(np.float32)
        self.B = rng.standard_normal(self.ops.B.shape).astype(np.float32)
        self.ops.A[...] = self.A
        self.ops.B[...] = self.B
        self.C = np.empty((m, n), np.float32)
        if ALIGNED:
            self.ops.A, self.ops.B = aligned_copy(self.ops.A), aligned_copy(self.ops.B)
            self.ops.C = aligned_copy(self.ops.C)
            self.A, self.B, self.C = (
                aligned_copy(self.A),
                aligned_copy(self.B),
                aligned_copy(self.C),
            )
        self.calls = max(1, int(SAMPLE * 100e9 / self.flops))  # ~20 ms at 100 GFLOP/s

    def route(self) -> str:
        ok = qualifies(self.m, self.n, self.k, self.tb) and not (self.ta and self.tb)
        return "kernel" if ok else "blas"


def make_runner(
    name: str, sh: Shape, backend: str, mods: dict[str, Any]
) -> Callable[[int], float] | None:
    """A function timing ``calls`` products (seconds), or None where ``name`` does not
    run this shape."""
    if name in ("nnrt", "eval", "blas"):
        kernel = name == "nnrt" and sh.route() == "kernel"
        if name == "eval" and (sh.ta or sh.tb):
            return None
        smallm = name == "eval"

        def run_c(calls: int) -> float:
            t0 = clock()
            if smallm:
                _blas._time_calls(backend, sh.ops, calls, smallm=True)
            else:
                _blas._time_calls(backend, sh.ops, calls, kernel=kernel)
            return clock() - t0

        return run_c
    if name == "numpy":
        a = sh.A.T if sh.ta else sh.A
        b = sh.B.T if sh.tb else sh.B

        def run_np(calls: int) -> float:
            t0 = clock()
            for _ in range(calls):
                np.matmul(a, b, out=sh.C)
            return clock() - t0

        return run_np
    if name == "torch":
        torch = mods.get("torch")
        if torch is None:
            return None
        ta_, tb_ = torch.from_numpy(sh.A), torch.from_numpy(sh.B)
        a, b = (ta_.T if sh.ta else ta_), (tb_.T if sh.tb else tb_)
        c = torch.empty((sh.m, sh.n), dtype=torch.float32)

        def run_torch(calls: int) -> float:
            t0 = clock()
            for _ in range(calls):
                torch.matmul(a, b, out=c)
            return clock() - t0

        return run_torch
    if name == "jax":
        jax = mods.get("jax")
        if jax is None:
            return None
        if sh.ta:
            f = jax.jit(lambda x, y: x.T @ y)
        elif sh.tb:
            f = jax.jit(lambda x, y: x @ y.T)
        else:
            f = jax.jit(lambda x, y: x @ y)
        a, b = jax.device_put(sh.A), jax.device_put(sh.B)
        f(a, b).block_until_ready()

        def run_jax(calls: int) -> float:
            t0 = clock()
            for _ in range(calls):
                r = f(a, b)
            r.block_until_ready()
            return clock() - t0

        return run_jax
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--configs", default="tiny,small,medium,large")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--json", default=None, help="write the per-shape medians here")
    ap.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the process's CPU time (all its threads, on the "
        "one core it is pinned to), which other processes on a busy machine "
        "do not inflate",
    )
    ap.add_argument(
        "--aligned",
        action="store_true",
        help="operands on 64-byte boundaries (default: as numpy allocates)",
    )
    args = ap.parse_args(argv)
    global clock, ALIGNED
    clock = CLOCKS[args.clock]
    ALIGNED = args.aligned
    configs = [c for c in args.configs.split(",") if c]
    names = [c for c in args.contenders.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}")
    for c in names:
        if c not in CONTENDERS:
            ap.error(f"unknown contender {c!r}")

    mods: dict[str, Any] = {}
    if "torch" in names:
        try:
            import torch

            torch.set_num_threads(1)
            mods["torch"] = torch
        except ImportError:
            pass
    if "jax" in names:
        try:
            import jax

            mods["jax"] = jax
        except ImportError:
            pass

    nnrt.set_num_threads(1)
    _blas.resolve()
    backend = _blas.info()["backend"]
    _blas.set_threads(1)
    limits = threadpool_limits(1)
    try:
        shs = [Shape(*s) for c in configs for s in shapes(c)]
        runners = {(sh.label, n): make_runner(n, sh, backend, mods) for sh in shs for n in names}
        # warm-up: a large GEMM on every BLAS copy, then a pre-roll of each runner
        big = Shape("warm", 512, 512, 512, False, False)
        for n in names:
            r = make_runner(n, big, backend, mods)
            if r is not None:
                r(20)
        times: dict[tuple[str, str], list[float]] = {k: [] for k, r in runners.items() if r}
        for _ in range(args.rounds):
            for sh in shs:
                for n in names:
                    r = runners[(sh.label, n)]
                    if r is None:
                        continue
                    r(max(1, sh.calls // 4))  # untimed pre-roll
                    times[(sh.label, n)].append(r(sh.calls) / sh.calls)
    finally:
        limits.restore_original_limits()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info = _blas.info()
    print(
        f"# float32, 1 thread (pinned), backend {backend} ({info.get('kernel')}), "
        f"kernel isa {info['gemm_kernel']['isa']}, rounds {args.rounds}, {args.clock} "
        f"clock, {'64-byte aligned' if ALIGNED else 'numpy-aligned'} operands, load {load:.2f}"
    )
    present = [n for n in names if any(k[1] == n for k in times)]
    peers = [p for p in PEERS if p in present]
    head = f"{'shape':<18} {'m':>5} {'n':>5} {'k':>5} {'route':<6}"
    head += "".join(f" {n + ' us':>10}" for n in present)
    head += "".join(f" {n + ' GF/s':>10}" for n in ("nnrt", "eval") if n in present)
    head += "".join(f" {'/' + p:>7}" for p in peers) + f" {'/best':>7}"
    print(head)
    rows = []
    tot: dict[str, float] = {}
    for sh in shs:
        med = {
            n: statistics.median(times[(sh.label, n)]) for n in present if (sh.label, n) in times
        }
        for n, t in med.items():
            tot[n] = tot.get(n, 0.0) + t
        line = f"{sh.label:<18} {sh.m:>5} {sh.n:>5} {sh.k:>5} {sh.route():<6}"
        line += "".join(f" {med[n] * 1e6:>10.1f}" if n in med else f" {'-':>10}" for n in present)
        line += "".join(
            f" {sh.flops / med[n] / 1e9:>10.1f}" if n in med else f" {'-':>10}"
            for n in ("nnrt", "eval")
            if n in present
        )
        nn = med.get("nnrt")
        best = min((med[p] for p in peers if p in med), default=None)
        line += "".join(f" {nn / med[p]:>7.3f}" if nn and p in med else f" {'-':>7}" for p in peers)
        line += f" {nn / best:>7.3f}" if nn and best else f" {'-':>7}"
        print(line)
        rows.append(
            {
                "shape": sh.label,
                "m": sh.m,
                "n": sh.n,
                "k": sh.k,
                "route": sh.route(),
                "seconds": med,
            }
        )
    print("sum of medians (us): " + ", ".join(f"{n} {t * 1e6:.1f}" for n, t in tot.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "backend": backend, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
