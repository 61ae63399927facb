"""Scaling of data-parallel training: time per global step on 1 and 2 MPI ranks.

    python benchmarks/distributed.py [--steps 40] [--json out.json]

Medium config of benchmarks/run.py: global batch 256, 784 -> 512 -> 512 -> 10
(hidden blocks dense_nobias -> BatchNorm -> sigmoid, then dense), float32,
softmax cross-entropy, SGD. For each rank count and BatchNorm kind
(``batchnorm``: per-shard statistics; ``sync_batchnorm``: global ones) the
driver starts ``mpirun -n k`` on this script in worker mode and reports, from
rank 0: the median time per global step, the time per step in the gradient
allreduce (one flat buffer, ~670k floats = 2.7 MB; inside a step it includes
waiting for the slower rank, so it is also timed alone after a barrier) and in
SyncBatchNorm's small allreduces. Configurations: 1 rank with 1 BLAS thread (the speed-up
baseline), 1 rank with all cores' threads, k ranks with cores // k threads each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

GLOBAL_BATCH = 256
SIZES = (784, 512, 512, 10)


def worker(args: argparse.Namespace) -> None:
    from threadpoolctl import threadpool_limits

    import nnrt
    from nnrt.distributed import Communicator, GradientAllreduce, shard_bounds
    from nnrt.engine import TrainStep
    from nnrt.optim import SGD

    comm = Communicator(timeout=None if args.blocking else 600)
    threads = args.threads or max(1, (os.cpu_count() or 1) // comm.size)
    threadpool_limits(threads)
    layers = []
    for a, b in zip(SIZES[:-2], SIZES[1:-1], strict=True):
        layers += [nnrt.layer("dense_nobias", a, b), nnrt.layer(args.bn, b), nnrt.layer("sigmoid")]
    layers.append(nnrt.layer("dense", SIZES[-2], SIZES[-1]))
    net = nnrt.Sequential(layers, seed=0, dtype="float32")
    sync = GradientAllreduce(net, comm)
    step = TrainStep(net, SGD(net, lr=0.01), sync=sync)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(GLOBAL_BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=GLOBAL_BATCH)
    lo, hi = shard_bounds(GLOBAL_BATCH, comm.size, comm.rank)
    Xl, yl = X[lo:hi].copy(), y[lo:hi].copy()
    for _ in range(5):
        step(Xl, yl, GLOBAL_BATCH)
    times, grad_ar, all_ar = [], [], []
    for _ in range(args.steps):
        comm.barrier()
        g0, a0 = sync.allreduce_seconds, comm.allreduce_seconds
        t0 = time.perf_counter()
        step(Xl, yl, GLOBAL_BATCH)
        times.append(time.perf_counter() - t0)
        grad_ar.append(sync.allreduce_seconds - g0)
        all_ar.append(comm.allreduce_seconds - a0)
    # the allreduce alone, after a barrier: its cost without waiting for a slower rank
    alone = []
    for _ in range(args.steps):
        comm.barrier()
        t0 = time.perf_counter()
        comm.allreduce_sum(sync.flat)
        alone.append(time.perf_counter() - t0)
    if comm.rank == 0:
        res = {
            "allreduce_alone_ms": 1e3 * float(np.median(alone)),
            "ranks": comm.size,
            "bn": args.bn,
            "threads_per_rank": threads,
            "blocking": bool(args.blocking),
            "step_ms_median": 1e3 * float(np.median(times)),
            "step_ms_min": 1e3 * float(np.min(times)),
            "grad_allreduce_ms": 1e3 * float(np.median(grad_ar)),
            "bn_allreduce_ms": max(0.0, 1e3 * float(np.median(np.subtract(all_ar, grad_ar)))),
            "flat_buffer_elements": int(sync.flat.size),
        }
        print("RESULT " + json.dumps(res), flush=True)


def run_config(ranks: int, bn: str, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    from nnrt.distributed import mpirun_command

    argv = [sys.executable, __file__, "--worker", "--bn", bn, "--steps", str(args.steps)]
    argv += ["--threads", str(threads)]
    if args.blocking:
        argv.append("--blocking")
    cmd = mpirun_command(ranks, argv)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bn", default="batchnorm")
    p.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (best kept)")
    p.add_argument("--blocking", action="store_true", help="blocking MPI calls (no watchdog)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    cores = os.cpu_count() or 1
    configs = [
        (bn, ranks, threads)
        for bn in ("batchnorm", "sync_batchnorm")
        for ranks, threads in ((1, 1), (1, cores), (2, max(1, cores // 2)))
    ]
    configs = list(dict.fromkeys(configs))
    best: dict[tuple[str, int, int], dict[str, Any]] = {}
    # NOTE: rounds interleave the configurations, so a burst of load from other
    # processes hits all of them; each keeps its best round (lowest median).
    for _ in range(args.rounds):
        for bn, ranks, threads in configs:
            r = run_config(ranks, bn, threads, args)
            key = (bn, ranks, threads)
            if key not in best or r["step_ms_median"] < best[key]["step_ms_median"]:
                best[key] = r
    results = [best[c] for c in configs]
    print(f"medium config, global batch {GLOBAL_BATCH}, float32, {os.cpu_count()} cores\n")
    print(
        "| BatchNorm | ranks | BLAS threads/rank | step (median) | step (min) "
        "| grad allreduce in step | same, alone | BN allreduces | speed-up vs 1 rank x 1 thread |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base: dict[str, float] = {}
    for r in results:
        if r["ranks"] == 1 and r["threads_per_rank"] == 1:
            base[r["bn"]] = r["step_ms_median"]
        print(
            f"| {r['bn']} | {r['ranks']} | {r['threads_per_rank']} "
            f"| {r['step_ms_median']:.2f} ms | {r['step_ms_min']:.2f} ms "
            f"| {r['grad_allreduce_ms']:.2f} ms | {r['allreduce_alone_ms']:.2f} ms "
            f"| {r['bn_allreduce_ms']:.2f} ms "
            f"| {base[r['bn']] / r['step_ms_median']:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
