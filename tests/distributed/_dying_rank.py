"""Script for tests/test_distributed.py: rank 1 dies (or freezes) mid-training.

    mpirun -n 2 python tests/distributed/_dying_rank.py kill|stop [timeout_s]

``kill``: rank 1 sends itself SIGKILL at step 5; mpirun must end the job.
``stop``: rank 1 sends itself SIGSTOP (alive, silent); rank 0's allreduce
watchdog must time out, print a clear error and abort the job.
Rank 0 never finishes normally: it prints UNEXPECTED-FINISH if it does.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

import nnrt
from nnrt.distributed import Communicator, GradientAllreduce, shard_bounds
from nnrt.engine import TrainStep
from nnrt.optim import SGD


def main() -> None:
    mode = sys.argv[1]
    timeout = float(sys.argv[2]) if len(sys.argv) > 2 else 600.0
    comm = Communicator(timeout=timeout)
    net = nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 16, 32),
            nnrt.layer("sync_batchnorm", 32),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 32, 4),
        ],
        seed=0,
    )
    step_fn = TrainStep(net, SGD(net, lr=0.1), sync=GradientAllreduce(net, comm))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 16))
    y = rng.integers(0, 4, size=64)
    lo, hi = shard_bounds(64, comm.size, comm.rank)
    for step in range(2000):
        if step == 5 and comm.rank == 1:
            print(f"rank 1: sending myself {mode.upper()} at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        step_fn(X[lo:hi], y[lo:hi], 64)
    print(f"UNEXPECTED-FINISH on rank {comm.rank}", flush=True)


if __name__ == "__main__":
    main()
