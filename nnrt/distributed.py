"""Data-parallel training over MPI (optional extra ``nnrt[mpi]``: mpi4py + an MPI library).

Launch one process per rank, e.g. ``mpirun -n 4 python train.py`` (or
``python -m nnrt.distributed -n 4 train.py``, which adds the flags this
machine needs); docs/distributed.md has the commands, a hostfile example and
measurements.

Model (as torch's DistributedDataParallel). :func:`fit` is ``nnrt.engine.fit``
(the keywords and ``History`` of ``Sequential.fit``) with a
:class:`GradientAllreduce` strategy, which the engine's step calls between
backward and the optimizer step:

- Every rank holds the same network: the strategy broadcasts rank 0's
  parameters and buffers first, so ranks may build it with different seeds.
- Every rank walks the same sequence of *global* batches (the engine's one
  shuffle stream, seeded with rank 0's seed) and computes only its shard of
  each: rows ``np.array_split(batch, size)[rank]``.
- After the backward pass, ONE ``Allreduce`` (sum) over a single preallocated
  flat buffer carries every parameter gradient (plus the loss, the correct
  count, and the averaged float buffers, e.g. running statistics). Nothing is
  sent per parameter.
- Scaling. A mean-reduced loss gives ``dY`` with ``1/N_local``; the update on
  the global batch needs ``1/N_global``. So each rank multiplies ``dY`` by
  ``N_local / N_global`` *before* its backward pass; backward is linear in
  ``dY``, so every gradient (weights, and the bias, which is a batch sum) is
  then that shard's exact share and the allreduced sum is the single-process
  gradient of the global batch, also when the shards are of unequal size.
  Scaling ``dY`` (not the gradients afterwards) also keeps the cross-rank
  backward sums of a layer that uses the communicator consistent.
- Every rank then runs the same optimizer step on the same gradients, so the
  parameters stay identical without further messages. Only rank 0 writes
  checkpoints and shows progress. On one rank, ``fit`` gives bit for bit the
  weights of ``Sequential.fit``.

Layers with batch statistics across ranks (``uses_batch_statistics``):

- A layer that only declares ``uses_batch_statistics`` computes its statistics
  over its rank's shard, so the result depends on the number of ranks (as a
  torch layer under DDP); the strategy averages its float buffers (running
  statistics) over the ranks in the gradient allreduce, and the global batch
  needs two rows per rank.
- A layer that also declares the class attribute ``uses_communicator = True``
  talks to the other ranks itself, e.g. to reduce its statistics over the
  *global* batch (a synchronised batch-normalisation plugin).
  :class:`GradientAllreduce` sets such a layer's attribute ``comm`` to its
  communicator (an object with
  ``rank``, ``size`` and ``allreduce_sum(buf, what)``, which sums a
  C-contiguous float buffer over all ranks in place and returns it), leaves
  its buffers out of the averaging (the layer keeps them identical on every
  rank) and asks for two rows in the whole global batch. Every rank must call
  its forward/backward in step with the others.

Dead or stuck ranks: ``mpirun`` aborts the job when a rank dies. Against a
rank that hangs (or a launcher that does not abort), a watchdog thread of the
:class:`Communicator` ends the job (message, ``MPI_Abort``, exit code 3) when
one collective waits longer than ``timeout`` seconds: ``NNRT_MPI_TIMEOUT``,
600 when unset, ``0`` for no watchdog.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from nnrt.engine import History
from nnrt.engine import fit as _engine_fit

__all__ = [
    "Communicator",
    "DistributedError",
    "GradientAllreduce",
    "LocalCommunicator",
    "default_communicator",
    "fit",
    "mpirun_command",
    "shard_bounds",
]

_DEFAULT_TIMEOUT = 600.0


class DistributedError(RuntimeError):
    """A collective operation failed or timed out (a rank died or hangs)."""


def _env_timeout() -> float | None:
    raw = os.environ.get("NNRT_MPI_TIMEOUT")
    if raw is None or raw == "":
        return _DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"NNRT_MPI_TIMEOUT must be a number of seconds, got {raw!r}") from None
    return None if value <= 0 else value


# ---------------------------------------------------------------------------- communicators
class LocalCommunicator:
    """A communicator of one rank: every collective is the identity (no MPI needed)."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.allreduce_seconds = 0.0
        self.allreduce_calls = 0

    def allreduce_sum(self, buf: np.ndarray, what: str = "allreduce") -> np.ndarray:
        return buf

    def bcast(self, buf: np.ndarray, root: int = 0, what: str = "broadcast") -> np.ndarray:
        return buf

    def barrier(self) -> None:
        pass

    def reset_stats(self) -> None:
        self.allreduce_seconds = 0.0
        self.allreduce_calls = 0

    def __repr__(self) -> str:
        return "LocalCommunicator(rank=0, size=1)"


class Communicator:
    """A thin wrapper around an mpi4py communicator (``MPI.COMM_WORLD`` by default).

    Collectives are blocking MPI calls on C-contiguous numpy buffers, in place
    (no pickling). With ``timeout`` (seconds; default from ``NNRT_MPI_TIMEOUT``,
    600 when unset; ``None``/``0``: none) a watchdog thread ends the process
    when one collective has waited longer: it prints a message naming the
    operation, the rank and the buffer, calls ``MPI_Abort`` (which ends every
    rank) and, should that return, ``os._exit(3)``. So a dead or stuck peer
    fails the job instead of hanging it. ``allreduce_seconds`` /
    ``allreduce_calls`` count the time spent in allreduce (for benchmarks).
    """

    def __init__(self, comm: Any = None, timeout: float | None | str = "env") -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "nnrt.distributed needs mpi4py and an MPI library: "
                "apt-get install openmpi-bin libopenmpi-dev && pip install 'nnrt[mpi]'"
            ) from exc
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        if timeout == "env":
            self.timeout = _env_timeout()
        elif timeout is None or float(timeout) <= 0:
            self.timeout = None
        else:
            self.timeout = float(timeout)
        self.allreduce_seconds = 0.0
        self.allreduce_calls = 0
        # watchdog state: (start time, description) of the collective in progress
        self._current: tuple[float, str] | None = None
        self._watchdog: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, size={self.size}, timeout={self.timeout})"

    def reset_stats(self) -> None:
        self.allreduce_seconds = 0.0
        self.allreduce_calls = 0

    @staticmethod
    def _check_buffer(buf: np.ndarray, what: str) -> None:
        if not isinstance(buf, np.ndarray) or not buf.flags.c_contiguous or not buf.flags.writeable:
            raise TypeError(f"{what}: needs a writeable C-contiguous ndarray, got {type(buf)}")

    # NOTE: a watchdog thread rather than non-blocking calls polled with Test():
    # Iallreduce of a 2.7 MB gradient buffer took 1.5 ms here against 0.3 ms for
    # the blocking call, and mpi4py releases the GIL inside blocking calls, so
    # the thread runs while the main thread waits.
    def _arm(self, what: str, buf: np.ndarray) -> None:
        if self.timeout is None:
            return
        if self._watchdog is None:
            self._watchdog = threading.Thread(
                target=self._watch, name="nnrt-mpi-watchdog", daemon=True
            )
            self._watchdog.start()
        self._current = (
            time.monotonic(),
            f"{what} (buffer shape {buf.shape} dtype {buf.dtype})",
        )

    def _watch(self) -> None:
        assert self.timeout is not None
        period = min(1.0, self.timeout / 10)
        while True:
            time.sleep(period)
            current = self._current
            if current is None or time.monotonic() - current[0] < self.timeout:
                continue
            print(
                f"nnrt.distributed: {current[1]} on rank {self.rank} of {self.size} timed "
                f"out after {self.timeout:g} s: another rank died or stopped taking part; "
                f"aborting the job",
                file=sys.stderr,
                flush=True,
            )
            try:
                self.comm.Abort(3)
            finally:
                os._exit(3)

    def _failed(self, what: str, buf: np.ndarray, exc: Exception) -> DistributedError:
        return DistributedError(
            f"nnrt.distributed: {what} failed on rank {self.rank} of {self.size} "
            f"(buffer shape {buf.shape} dtype {buf.dtype}): {exc}"
        )

    def allreduce_sum(self, buf: np.ndarray, what: str = "allreduce") -> np.ndarray:
        """Sum ``buf`` over all ranks, in place; returns ``buf``."""
        self._check_buffer(buf, what)
        MPI = self._MPI
        t0 = time.perf_counter()
        self._arm(what, buf)
        try:
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        except MPI.Exception as exc:
            raise self._failed(what, buf, exc) from exc
        finally:
            self._current = None
        self.allreduce_seconds += time.perf_counter() - t0
        self.allreduce_calls += 1
        return buf

    def bcast(self, buf: np.ndarray, root: int = 0, what: str = "broadcast") -> np.ndarray:
        """Overwrite ``buf`` on every rank with rank ``root``'s, in place; returns ``buf``."""
        self._check_buffer(buf, what)
        MPI = self._MPI
        self._arm(what, buf)
        try:
            self.comm.Bcast(buf, root=root)
        except MPI.Exception as exc:
            raise self._failed(what, buf, exc) from exc
        finally:
            self._current = None
        return buf

    def barrier(self) -> None:
        self._arm("barrier", np.empty(0))
        try:
            self.comm.Barrier()
        finally:
            self._current = None


AnyComm = Communicator | LocalCommunicator

_default: AnyComm | None = None


def _launched_by_mpi() -> bool:
    env = os.environ
    return any(
        k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    )


def default_communicator() -> AnyComm:
    """``Communicator()`` over ``MPI.COMM_WORLD`` when this process was started by an MPI
    launcher (or mpi4py's MPI is already imported), else a :class:`LocalCommunicator`.

    Created once and cached.
    """
    global _default
    if _default is None:
        if _launched_by_mpi() or "mpi4py.MPI" in sys.modules:
            _default = Communicator()
        else:
            _default = LocalCommunicator()
    return _default


# ---------------------------------------------------------------------------- training
def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a global batch of ``n`` that ``rank`` of ``size`` computes
    (``np.array_split``: the first ``n % size`` ranks get one row more)."""
    q, r = divmod(n, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


class GradientAllreduce:
    """The data-parallel strategy ``nnrt.engine`` runs between backward and the optimizer step.

    ``GradientAllreduce(net, comm=None)`` broadcasts rank 0's parameters and
    buffers, sets ``layer.comm = comm`` on every layer that declares
    ``uses_communicator`` and preallocates one flat buffer in the network's
    dtype: every gradient, then two slots (the loss and the number of correct
    rows), then the float buffers of the other layers (e.g. running
    statistics, averaged over the ranks). Called
    after backward with this rank's share of the loss and correct count, it
    fills the buffer, runs ONE ``Allreduce`` (sum), copies the summed gradients
    and the averaged buffers back and returns the global loss and count.
    """

    def __init__(self, net: Any, comm: AnyComm | None = None) -> None:
        self.net = net
        self.comm: AnyComm = default_communicator() if comm is None else comm
        self.rank = self.comm.rank
        self.size = self.comm.size
        for layer in net.layers:
            if _uses_communicator(layer):
                layer.comm = self.comm
        self._grads = list(net.grads().values())
        sync_ids = {i for i, layer in enumerate(net.layers) if _uses_communicator(layer)}
        self._avg_buffers = [
            arr
            for key, arr in net.buffers().items()
            if int(key.split(".", 1)[0]) not in sync_ids and arr.dtype.kind == "f"
        ]
        n_grad = sum(g.size for g in self._grads)
        n_buf = sum(b.size for b in self._avg_buffers)
        self._slot = n_grad  # loss, then correct count
        self.flat = np.zeros(n_grad + 2 + n_buf, dtype=np.dtype(net.dtype))
        self._grad_views = _views(self.flat, 0, self._grads)
        self._buf_views = _views(self.flat, n_grad + 2, self._avg_buffers)
        self.allreduce_seconds = 0.0
        self.broadcast_state()

    def broadcast_state(self) -> None:
        """Copy rank 0's parameters and buffers to every rank (one broadcast per dtype)."""
        if self.size == 1:
            return
        arrays = list(self.net.params().values()) + list(self.net.buffers().values())
        by_dtype: dict[np.dtype, list[np.ndarray]] = {}
        for a in arrays:
            by_dtype.setdefault(a.dtype, []).append(a)
        for dt, group in by_dtype.items():
            flat = np.concatenate([a.ravel() for a in group]).astype(dt, copy=False)
            self.comm.bcast(flat, root=0, what="broadcast of the initial parameters")
            for a, v in zip(group, _views(flat, 0, group), strict=True):
                np.copyto(a, v)

    def shard(self, n: int) -> tuple[int, int]:
        """Rows of a global batch of ``n`` that this rank computes."""
        return shard_bounds(n, self.size, self.rank)

    def min_batch(self, net: Any) -> int:
        """The shortest global batch: two rows per rank for a layer with batch
        statistics over its shard, two in all for one that reduces them over the
        ranks (``uses_communicator``), else a row per rank."""
        batch_stats = [
            layer for layer in net.layers if getattr(type(layer), "uses_batch_statistics", False)
        ]
        local = any(not _uses_communicator(layer) for layer in batch_stats)
        synced = any(_uses_communicator(layer) for layer in batch_stats)
        return max(self.size * (2 if local else 1), 2 if synced else 1)

    def common_seed(self, seed: int | None) -> int | None:
        """Rank 0's shuffling seed, on every rank (None: rank 0 draws one)."""
        if self.size == 1:
            return seed
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)  # type: ignore[operator]
        buf = np.array([seed], dtype=np.int64)
        self.comm.bcast(buf, root=0, what="broadcast of the shuffling seed")
        return int(buf[0])

    def __call__(self, loss: float, correct: int) -> tuple[float, int]:
        flat = self.flat
        for view, g in zip(self._grad_views, self._grads, strict=True):
            np.copyto(view, g)
        flat[self._slot] = loss
        flat[self._slot + 1] = correct
        if self._buf_views:
            inv = 1.0 / self.size
            for view, b in zip(self._buf_views, self._avg_buffers, strict=True):
                np.multiply(b, inv, out=view)
        t0 = time.perf_counter()
        self.comm.allreduce_sum(flat, what="gradient allreduce")
        self.allreduce_seconds += time.perf_counter() - t0
        for view, g in zip(self._grad_views, self._grads, strict=True):
            np.copyto(g, view)
        for view, b in zip(self._buf_views, self._avg_buffers, strict=True):
            np.copyto(b, view)
        return float(flat[self._slot]), int(round(float(flat[self._slot + 1])))


def _uses_communicator(layer: Any) -> bool:
    """The layer talks to the other ranks itself (class attribute ``uses_communicator``)."""
    return bool(getattr(type(layer), "uses_communicator", False))


def _views(flat: np.ndarray, start: int, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for a in arrays:
        out.append(flat[start : start + a.size].reshape(a.shape))
        start += a.size
    return out


def fit(
    net: Any,
    X: Any,
    y: Any,
    *,
    comm: AnyComm | None = None,
    **kwargs: Any,
) -> History:
    """``Sequential.fit`` over all ranks of ``comm`` (default: MPI.COMM_WORLD under
    ``mpirun``, else one process): the same keywords and ``History``, run by
    ``nnrt.engine.fit`` with a :class:`GradientAllreduce`.

    Every rank passes the same ``X``/``y`` (a ``np.load(..., mmap_mode="r")``
    array keeps each rank's memory at its rows); ``batch_size`` is the GLOBAL
    batch; rank ``r`` computes rows ``shard_bounds(len(batch), size, r)`` of
    each. ``seed`` defaults to rank 0's network seed. Only rank 0 draws the
    progress bar and writes ``nnrt.Checkpoint`` files; every rank evaluates
    the whole validation set (so all get the same logs and early-stopping
    decisions). On one rank the weights are bit-identical to ``net.fit``'s.
    """
    sync = GradientAllreduce(net, comm)
    if sync.rank != 0:
        kwargs["progress"] = False
    return _engine_fit(net, X, y, sync=sync, **kwargs)


# ---------------------------------------------------------------------------- launcher
def mpirun_command(
    n: int,
    argv: Sequence[str],
    hostfile: str | None = None,
    mpirun: str = "mpirun",
    extra: Sequence[str] = (),
    bind_to: str = "none",
) -> list[str]:
    """The ``mpirun`` command line that starts ``argv`` on ``n`` ranks.

    Adds ``--oversubscribe`` (more ranks than cores is allowed), ``--bind-to
    none`` (``bind_to``: ranks keep all cores for their BLAS threads) and, for
    root (containers), ``--allow-run-as-root``; with a ``hostfile`` the ranks are
    spread over its machines. Open MPI flags; other MPIs take ``extra`` only.
    """
    cmd = [mpirun, "-n", str(int(n))]
    is_openmpi = _is_openmpi(mpirun)
    if is_openmpi:
        # NOTE: Open MPI pins each rank to one core when n <= 2; a rank's BLAS
        # threads then share that core and a step gets many times slower.
        cmd += ["--oversubscribe", "--bind-to", bind_to]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    if hostfile is not None:
        cmd += ["--hostfile", os.fspath(hostfile)]
    cmd += list(extra)
    cmd += list(argv)
    return cmd


def _is_openmpi(mpirun: str) -> bool:
    import subprocess

    path = shutil.which(mpirun)
    if path is None:
        return True
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    return "Open MPI" in (out.stdout + out.stderr) or "OpenRTE" in (out.stdout + out.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nnrt.distributed -n 2 [--hostfile H] script.py [args...]``: run
    ``python script.py args`` on ``n`` ranks via mpirun with this machine's flags."""
    parser = argparse.ArgumentParser(
        prog="python -m nnrt.distributed",
        description="Run a Python training script on several MPI ranks.",
    )
    parser.add_argument("-n", "--np", type=int, default=2, help="number of ranks (default 2)")
    parser.add_argument("--hostfile", help="MPI hostfile listing the machines")
    parser.add_argument("--timeout", type=float, help="NNRT_MPI_TIMEOUT for the ranks (s)")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")
    parser.add_argument("script", help="Python script (or -m module) to run")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    target = ["-m", *ns.args] if ns.script == "-m" else [ns.script, *ns.args]
    cmd = mpirun_command(ns.np, [sys.executable, *target], hostfile=ns.hostfile)
    if ns.timeout is not None:
        os.environ["NNRT_MPI_TIMEOUT"] = str(ns.timeout)
        if _is_openmpi("mpirun"):
            cmd[1:1] = ["-x", "NNRT_MPI_TIMEOUT"]
    print(" ".join(cmd), flush=True)
    if ns.dry_run:
        return 0
    if shutil.which(cmd[0]) is None:
        print(
            "mpirun not found: install Open MPI (apt-get install openmpi-bin libopenmpi-dev)",
            file=sys.stderr,
        )
        return 127
    os.execvp(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
