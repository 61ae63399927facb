"""Benchmark: one training step and one inference forward of nnrt against torch and numpy.

    python benchmarks/run.py            # full run (a few minutes)
    python benchmarks/run.py --quick    # < 90 s on a quiet machine with --no-fit; the fit row adds ~1 min
    python benchmarks/run.py --json results.json --threads 1 --configs tiny,small
    python benchmarks/run.py --quick --threads 1,2 --no-fit   # both thread counts

The network: hidden blocks [dense_nobias -> batchnorm -> sigmoid] plus a final
dense layer, float32. A training step is forward (training mode), softmax
cross-entropy (mean), backward (no gradient for the input), plain SGD update;
inference is one forward in eval mode.

Contenders, all from the same initial weights (nnrt's, seed 0):
  nnrt    the library under test
  numpy   a plain-numpy textbook implementation (benchmarks/reference.py)
  torch   torch eager on the CPU, when importable ("not installed" otherwise)
  jax     jax.jit: the whole training step (forward, loss, grad, SGD update, running
          statistics) and the eval forward each one jitted function, when jax is
          importable (optional like torch; never installed by this script)
  floor   only the GEMMs the step needs, through numpy: forward X @ W for every
          dense layer, dW = X.T @ dY for every one, dX = dY @ W.T for all but
          the first (the input needs no gradient); inference: forward GEMMs only

The ``fit`` row: one epoch of ``net.fit`` (shuffled, SGD, ``FIT_STEPS`` batches
of the configuration's size, data in numpy arrays) per call, reported per step,
interleaved in the same rounds with
  step    the bare training step above, on one fixed batch (target: fit per step
          <= 1.05x this)
  loop    the bare step in a plain loop over the same shuffled batches (each
          one gathered with np.take), i.e. what fit adds beyond gathering data
  torch   torch's idiomatic epoch: randperm, index the tensors, forward, loss,
          zero_grad, backward, step, loss.item() (when importable)
  keras   Keras 3 ``model.fit`` on the jax backend, one epoch, same layers, batch
          and SGD (only when keras and jax are importable; never installed by
          this script). With --threads 1, XLA gets one thread (XLA_FLAGS, set
          before jax is imported) and keras is timed by the process's CPU time
          (target on small: nnrt fit <= 0.7x keras fit per step)

The serving table: inference at batch 1, 4, 16 and 64 of every configuration,
float32, running statistics from a few training batches:
  nnrt         the live network's eval forward (``net.forward(X, training=False)``)
  nnrt frozen  a frozen session (``nnrt.freeze(net)``: BatchNorm folded into the
               weights, bias + sigmoid fused, private read-only weights), the
               serving contender, against
  onnxruntime  an InferenceSession of nnrt's own ONNX export (nnrt.onnx.to_model), with
               intra/inter-op threads = --threads and sequential execution
  torch        the same model in ``torch.inference_mode()``, eval mode
  jax          the jitted eval forward
  numpy        the reference forward
each call given a numpy array, as a request arrives. Targets (issue 16): nnrt frozen
at most 0.5x onnxruntime at batch 1 on tiny and small, at most 1.0x everywhere else.

``--threads 1,2`` runs the whole benchmark once per thread count, each in its own
process (XLA reads its thread settings at import), and reports every run.

Before timing, nnrt (in float64) must match the numpy reference: loss, every
parameter gradient, the updated parameters and the running statistics, to
rtol 1e-9 (plus an atol of 1e-12 of each array's largest entry, for entries
that cancel to ~0). The run aborts otherwise.

Timing: BLAS thread counts are the same for every contender (``--threads``,
default 1: set through threadpoolctl for both OpenBLAS copies, numpy's and
scipy's, torch.set_num_threads, onnxruntime's session options and XLA's flags). Each BLAS copy is warmed with a large
GEMM first. Contenders are interleaved in rounds (the order rotates); each
timed sample is a loop of n calls preceded by an untimed pre-roll of the same
contender, with more than one thread at least 0.15 s long (idle OpenBLAS, OpenMP,
onnxruntime and XLA workers spin for ~0.1 s after a call and would slow the next
contender: in the fit row and the serving table too). Reported: median and min/max of the
per-call sample times, and ratios of medians from this one run; in the fit row, the
medians of each round's own ratio (fit's sample over the other contender's from the same
round), which a stretch of slow rounds shifts less, with fit/step's ratio of medians in
brackets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits


def _threads_arg(argv: list[str]) -> str | None:
    """The value of --threads in ``argv`` (XLA's flags must be set before jax loads)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return None


_T = _threads_arg(sys.argv[1:]) or "1"
if _T.isdigit():
    # XLA (jax) on the CPU: as many intra-op threads as the other contenders
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if _T == "1":
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
        # XLA's CPU runtime keeps a thread pool of its own that those flags do not
        # limit (measured: a jitted 1024^3 matmul ran on 1.8 cores with them): a
        # 1-thread run pins the whole process to one core, before any library sizes
        # its pools, so that no contender can use a second one
        if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from reference import Floor, NumpyMLP  # noqa: E402

import nnrt  # noqa: E402
import nnrt.losses  # noqa: E402
import nnrt.optim  # noqa: E402

try:
    import torch
except ImportError:  # torch is optional
    torch = None

try:
    import onnxruntime as ort
except ImportError:  # onnxruntime is optional (nnrt's test extra)
    ort = None


def _jax() -> Any:
    """The jax module, or None when it is not importable (optional contender)."""
    try:
        import jax
    except Exception:  # absent or broken
        return None
    return jax


CONFIGS: dict[str, tuple[int, list[int]]] = {
    "tiny": (32, [64, 64, 64, 10]),
    "small": (64, [784, 128, 128, 10]),
    "medium": (256, [784, 512, 512, 10]),
    "large": (1024, [1024, 1024, 1024, 1024, 10]),
}
# targets on the training step (inference at least as good): nnrt/torch, nnrt/floor
TARGETS: dict[str, dict[str, float]] = {
    "tiny": {"torch": 0.20},
    "small": {"torch": 0.50},
    "medium": {"torch": 0.90},
    "large": {"torch": 0.95, "floor": 1.10},
}
LR = 0.01
CONTENDERS = ("nnrt", "numpy", "torch", "jax", "floor")
SERVE_BATCHES = (1, 4, 16, 64)
SERVE_CONTENDERS = ("nnrt", "nnrt frozen", "onnxruntime", "torch", "jax", "numpy")
# the serving contender: nnrt.freeze(net) (nnrt/serve.py), against the peers below
SERVE_PEERS = ("onnxruntime", "torch", "jax", "numpy")
# nnrt frozen / onnxruntime, serving (issue 16): batch 1 on tiny and small, everything else
SERVE_TARGETS = {("tiny", 1): 0.5, ("small", 1): 0.5}
SERVE_TARGET = 1.0
# batches per epoch in the fit row (samples = FIT_STEPS * batch)
FIT_STEPS = {"tiny": 128, "small": 128, "medium": 32, "large": 8}
FIT_CONTENDERS = ("fit", "step", "loop", "torch", "keras")
FIT_TARGET = 1.05  # nnrt fit per step / bare step
FIT_KERAS_TARGETS = {"small": 0.70}  # nnrt fit / Keras 3 fit (jax backend), per step


# ------------------------------------------------------------------ networks
def build_nnrt(sizes: list[int], dtype: str) -> nnrt.Sequential:
    layers: list[nnrt.Layer] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=False):
        layers += [
            nnrt.layer("dense_nobias", a, b),
            nnrt.layer("batchnorm", b),
            nnrt.layer("sigmoid"),
        ]
    layers.append(nnrt.layer("dense", sizes[-2], sizes[-1]))
    return nnrt.Sequential(layers, seed=0, dtype=dtype)


def build_torch(state: dict[str, np.ndarray], sizes: list[int], dtype: Any) -> Any:
    mods: list[Any] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=False):
        mods += [torch.nn.Linear(a, b, bias=False), torch.nn.BatchNorm1d(b), torch.nn.Sigmoid()]
    mods.append(torch.nn.Linear(sizes[-2], sizes[-1]))
    model = torch.nn.Sequential(*mods).to(dtype)
    with torch.no_grad():
        for i, m in enumerate(mods):
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.from_numpy(state[f"{i}.weight"].T.copy()))
                if m.bias is not None:
                    m.bias.copy_(torch.from_numpy(state[f"{i}.bias"]))
            elif isinstance(m, torch.nn.BatchNorm1d):
                m.weight.copy_(torch.from_numpy(state[f"{i}.gamma"]))
                m.bias.copy_(torch.from_numpy(state[f"{i}.beta"]))
                m.running_mean.copy_(torch.from_numpy(state[f"{i}.running_mean"]))
                m.running_var.copy_(torch.from_numpy(state[f"{i}.running_var"]))
    return model


def build_jax(state: dict[str, np.ndarray], sizes: list[int]) -> dict[str, Any] | None:
    """jitted ``train(X, y)`` (one SGD step, whole step jitted) and ``infer(X)`` (eval
    forward) of the benchmark MLP in jax from nnrt's state, or None without jax."""
    jax = _jax()
    if jax is None:
        return None
    jnp = jax.numpy
    n_hidden = len(sizes) - 2
    last = 3 * n_hidden
    stat_keys = ("running_mean", "running_var")
    params = {k: jnp.asarray(v) for k, v in state.items() if not k.endswith(stat_keys)}
    stats = {k: jnp.asarray(v) for k, v in state.items() if k.endswith(stat_keys)}

    def forward(p: Any, st: Any, X: Any, training: bool) -> Any:
        new = {}
        h = X
        for i in range(n_hidden):
            h = h @ p[f"{3 * i}.weight"]
            bn = f"{3 * i + 1}"
            if training:
                n = h.shape[0]
                mu = h.mean(axis=0)
                var = h.var(axis=0)
                new[f"{bn}.running_mean"] = 0.9 * st[f"{bn}.running_mean"] + 0.1 * mu
                new[f"{bn}.running_var"] = 0.9 * st[f"{bn}.running_var"] + 0.1 * var * (n / (n - 1))
            else:
                mu, var = st[f"{bn}.running_mean"], st[f"{bn}.running_var"]
            h = (h - mu) / jnp.sqrt(var + 1e-5) * p[f"{bn}.gamma"] + p[f"{bn}.beta"]
            h = jax.nn.sigmoid(h)
        return h @ p[f"{last}.weight"] + p[f"{last}.bias"], new

    def loss_fn(p: Any, st: Any, X: Any, y: Any) -> Any:
        logits, new = forward(p, st, X, True)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), new

    @jax.jit
    def step(p: Any, st: Any, X: Any, y: Any) -> Any:
        (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(p, st, X, y)
        p = jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)
        return p, new, loss

    infer_jit = jax.jit(lambda p, st, X: forward(p, st, X, False)[0])
    held = {"p": params, "s": stats}

    def train(X: Any, y: Any) -> None:
        p, st, loss = step(held["p"], held["s"], X, y)
        held["p"], held["s"] = p, st
        loss.block_until_ready()

    def infer(X: Any) -> Any:
        return infer_jit(held["p"], held["s"], X).block_until_ready()

    return {"train": train, "infer": infer, "module": jax}


def make_data(batch: int, sizes: list[int], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((batch, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], size=batch).astype(np.int64)
    return X, y


# ------------------------------------------------------------- correctness
def _close(name: str, got: np.ndarray, want: np.ndarray, cfg: str) -> None:
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    atol = 1e-12 * float(np.max(np.abs(want))) if want.size else 0.0
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-9, atol=atol):
        err = (
            np.max(np.abs(got - want) / (np.abs(want) + atol + 1e-300))
            if got.shape == want.shape
            else None
        )
        raise SystemExit(
            f"FLOAT64 CHECK FAILED [{cfg}] {name}: nnrt differs from the numpy reference "
            f"(shapes {got.shape} vs {want.shape}, max relative error {err})"
        )


def check_float64(cfg: str, batch: int, sizes: list[int]) -> dict[str, Any]:
    """nnrt in float64 against the numpy reference; exits on any mismatch."""
    n_hidden = len(sizes) - 2
    net = build_nnrt(sizes, "float64")
    ref = NumpyMLP(net.state_dict(), n_hidden, np.float64)
    X, y = make_data(batch, sizes, np.float64)
    opt = nnrt.optim.SGD(net, lr=LR)
    checked = 0
    for step in range(2):  # two steps: the second starts from updated weights
        out = net.forward(X, training=True)
        loss, dY = nnrt.losses.softmax_cross_entropy(out, y)
        ref_loss, ref_dY = ref.softmax_cross_entropy(ref.forward(X, True), y)
        _close(f"step {step} loss", np.array(loss), np.array(ref_loss), cfg)
        _close(f"step {step} dY", dY, ref_dY, cfg)
        # full backward (returns dX) and the input_grad=False opt-out must agree
        dX = net.backward(dY)
        full = {k: v.copy() for k, v in net.grads().items()}
        ref_dX = ref.backward(ref_dY, input_grad=True)
        assert ref_dX is not None
        _close(f"step {step} dX", dX, ref_dX, cfg)
        none = net.backward(dY, input_grad=False)
        if none is not None:
            raise SystemExit(f"[{cfg}] backward(dY, input_grad=False) returned {type(none)}")
        grads = net.grads()
        for k, g in grads.items():
            _close(f"step {step} grad {k}", g, ref.g[k], cfg)
            _close(f"step {step} grad {k} (input_grad=False vs full)", g, full[k], cfg)
            checked += 1
        opt.step()
        ref.sgd(LR)
        for k, v in net.state_dict().items():
            _close(f"step {step} updated {k}", v, ref.p[k], cfg)
    out_eval = net.forward(X, training=False)
    _close("eval forward", out_eval, ref.forward(X, False), cfg)
    result: dict[str, Any] = {"passed": True, "arrays_checked": checked}
    if torch is not None:
        # torch from the same weights, as a sanity check of the contenders' setup
        model = build_torch(build_nnrt(sizes, "float64").state_dict(), sizes, torch.float64)
        lt = torch.nn.functional.cross_entropy(model(torch.from_numpy(X)), torch.from_numpy(y))
        ref2 = NumpyMLP(build_nnrt(sizes, "float64").state_dict(), n_hidden, np.float64)
        l2, _ = ref2.softmax_cross_entropy(ref2.forward(X, True), y)
        if not np.isclose(lt.detach().item(), l2, rtol=1e-9):
            raise SystemExit(f"[{cfg}] torch loss {lt.detach().item()} != numpy reference {l2}")
        result["torch_loss_matches"] = True
    return result


# ---------------------------------------------------------------- contenders
Fn = Callable[[], Any]


def make_contenders(batch: int, sizes: list[int]) -> dict[str, dict[str, Any]]:
    """name -> {"train": fn, "infer": fn, "before_train": fn, "before_infer": fn}."""
    n_hidden = len(sizes) - 2
    X, y = make_data(batch, sizes, np.float32)
    net = build_nnrt(sizes, "float32")
    state = net.state_dict()
    out: dict[str, dict[str, Any]] = {}

    opt = nnrt.optim.SGD(net, lr=LR)
    sce = nnrt.losses.softmax_cross_entropy

    def nnrt_train() -> None:
        logits = net.forward(X, training=True)
        _, dY = sce(logits, y)
        net.backward(dY, input_grad=False)
        opt.step()

    def nnrt_infer() -> None:
        net.forward(X, training=False)

    out["nnrt"] = {"train": nnrt_train, "infer": nnrt_infer}

    ref = NumpyMLP(state, n_hidden, np.float32)
    out["numpy"] = {
        "train": lambda: ref.train_step(X, y, LR),
        "infer": lambda: ref.forward(X, False),
    }

    if torch is not None:
        model = build_torch(state, sizes, torch.float32)
        topt = torch.optim.SGD(model.parameters(), lr=LR)
        Xt = torch.from_numpy(X)
        yt = torch.from_numpy(y)
        ce = torch.nn.functional.cross_entropy

        def torch_train() -> None:
            loss = ce(model(Xt), yt)
            topt.zero_grad()
            loss.backward()
            topt.step()

        def torch_infer() -> None:
            with torch.inference_mode():
                model(Xt)

        out["torch"] = {
            "train": torch_train,
            "infer": torch_infer,
            "before_train": model.train,
            "before_infer": model.eval,
        }

    jx = build_jax(state, sizes)
    if jx is not None:
        Xj = jx["module"].numpy.asarray(X)
        yj = jx["module"].numpy.asarray(y.astype(np.int32))
        out["jax"] = {"train": lambda: jx["train"](Xj, yj), "infer": lambda: jx["infer"](Xj)}

    fl = Floor(sizes, batch, np.float32)
    out["floor"] = {"train": fl.step, "infer": fl.infer}
    return out


def _keras(threads: int) -> Any:
    """Keras 3 on the jax backend, or None (never installed here).

    The backend is chosen and XLA's CPU threads are set before keras and jax are
    first imported (``KERAS_BACKEND=jax``; with one thread, Eigen's thread pool off
    and one intra-op thread through ``XLA_FLAGS``), as the user of a 1-thread
    comparison would; an earlier import of jax keeps its own settings.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    if threads == 1 and "jax" not in sys.modules:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    try:
        import jax  # noqa: F401
        import keras
    except Exception:  # optional contender: absent or broken
        return None
    if keras.backend.backend() != "jax":
        return None
    return keras


def make_fit_contenders(cfg: str, threads: int = 1) -> dict[str, Fn]:
    """name -> one epoch over FIT_STEPS batches (see the module docstring)."""
    batch, sizes = CONFIGS[cfg]
    steps = FIT_STEPS[cfg]
    X, y = make_data(batch * steps, sizes, np.float32)
    Xb, yb = X[:batch].copy(), y[:batch].copy()
    net = build_nnrt(sizes, "float32")
    state = net.state_dict()
    opt = nnrt.optim.SGD(net, lr=LR)
    sce = nnrt.losses.softmax_cross_entropy
    rng = np.random.default_rng(0)
    Xg = np.empty_like(Xb)
    yg = np.empty_like(yb)

    def fit() -> None:
        net.fit(X, y, optimizer=opt, epochs=1, batch_size=batch, progress=False)

    def step() -> None:
        for _ in range(steps):
            logits = net.forward(Xb, training=True)
            _, dY = sce(logits, yb)
            net.backward(dY, input_grad=False)
            opt.step()

    def loop() -> None:
        order = rng.permutation(len(X))
        for b in range(steps):
            idx = order[b * batch : (b + 1) * batch]
            np.take(X, idx, axis=0, out=Xg)
            np.take(y, idx, axis=0, out=yg)
            logits = net.forward(Xg, training=True)
            _, dY = sce(logits, yg)
            net.backward(dY, input_grad=False)
            opt.step()

    out: dict[str, Fn] = {"fit": fit, "step": step, "loop": loop}
    if torch is not None:
        model = build_torch(state, sizes, torch.float32)
        topt = torch.optim.SGD(model.parameters(), lr=LR)
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        ce = torch.nn.functional.cross_entropy

        def torch_epoch() -> None:
            model.train()
            perm = torch.randperm(len(Xt))
            total = 0.0
            for b in range(steps):
                idx = perm[b * batch : (b + 1) * batch]
                loss = ce(model(Xt[idx]), yt[idx])
                topt.zero_grad()
                loss.backward()
                topt.step()
                total += loss.item()

        out["torch"] = torch_epoch
    keras = _keras(threads)
    if keras is not None:
        kl = keras.layers
        mods: list[Any] = [keras.Input((sizes[0],))]
        for b in sizes[1:-1]:
            mods += [kl.Dense(b, use_bias=False), kl.BatchNormalization(momentum=0.9,
                     epsilon=1e-5), kl.Activation("sigmoid")]  # fmt: skip
        mods.append(kl.Dense(sizes[-1]))
        kmodel = keras.Sequential(mods)
        kmodel.compile(
            optimizer=keras.optimizers.SGD(LR),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )

        def keras_epoch() -> None:
            kmodel.fit(X, y, batch_size=batch, epochs=1, shuffle=True, verbose=0)

        out["keras"] = keras_epoch
    return out


def time_fit(cfg: str, rounds: int, sample_s: float, threads: int) -> dict[str, Any]:
    """Per-step times of one epoch of each fit contender, interleaved in rounds.

    With one thread the clock is the thread's CPU time (``time.thread_time``:
    nnrt, numpy and torch compute in the calling thread), which time spent
    waiting for the shared cores does not inflate; with more, wall time. Keras
    computes on XLA's threads, not the calling one: with one thread it is timed
    by the CPU time of the whole process (``time.process_time``: every thread
    it uses, its Python thread included), else by the wall.
    """
    clock = time.thread_time if threads == 1 else time.perf_counter
    keras_clock = time.process_time if threads == 1 else time.perf_counter
    steps = FIT_STEPS[cfg]
    cons = make_fit_contenders(cfg, threads)
    names = list(cons)
    ns = {name: calibrate(cons[name], sample_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            preroll(cons[name], 1, threads)
            tick = keras_clock if name == "keras" else clock
            t0 = tick()
            for _ in range(ns[name]):
                cons[name]()
            samples[name].append((tick() - t0) / ns[name] / steps)
    res: dict[str, Any] = {
        "steps": steps,
        "clock": clock.__name__,
        "keras_clock": keras_clock.__name__,
    }
    for name in FIT_CONTENDERS:
        s = np.array(samples.get(name, []))
        res[name] = (
            None
            if not len(s)
            else {
                "median_us": float(np.median(s) * 1e6),
                "min_us": float(s.min() * 1e6),
                "max_us": float(s.max() * 1e6),
                "samples": len(s),
            }
        )
    # NOTE: the ratios are medians of the rounds' own ratios (fit's sample over the
    # other's, from the same round, mostly timed back to back), not ratios of the
    # medians: on this 2-core host the whole process sometimes runs ~1.5x slower for
    # a stretch of rounds (every contender at once, torch's and keras's too), and a
    # median of fit's samples and one of step's could then fall on different sides
    # of the change (2-thread small: fit 130-243 us, step 127-214 us in one run).
    # Both are reported; the targets apply to the paired ones.
    med = {k: v["median_us"] for k, v in res.items() if isinstance(v, dict)}
    res["ratios"] = {
        f"fit/{k}": (
            float(np.median(np.array(samples["fit"]) / np.array(samples[k]))) if k in med else None
        )
        for k in ("step", "loop", "torch", "keras")
    }
    res["ratios_of_medians"] = {
        f"fit/{k}": (med["fit"] / med[k] if k in med else None)
        for k in ("step", "loop", "torch", "keras")
    }
    return res


def _loop(fn: Fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


PREROLL_S = 0.15  # with threads: longer than idle BLAS/OpenMP/XLA workers spin


def preroll(fn: Fn, calls: int, threads: int) -> None:
    """Untimed calls of ``fn`` before a timed sample: ``calls`` of them, and with more
    than one thread for at least PREROLL_S, so that the previous contender's idle
    worker threads (OpenBLAS's, torch's OpenMP pool, onnxruntime's and XLA's) have
    stopped spinning on the other core before this one is timed. The rounds rotate
    the order, so each contender always follows the same one: without this the
    one after a threaded peer paid for its spinning in every round (the fit row's
    nnrt fit, which follows keras: 2-thread fit/step 1.11-1.12 on tiny)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if threads > 1:
        while time.perf_counter() - t0 < PREROLL_S:
            fn()


def calibrate(fn: Fn, target_s: float) -> int:
    fn()
    t = _loop(fn, 1)
    if t < target_s / 20:
        t = _loop(fn, max(1, int(target_s / 20 / max(t, 1e-7))))
    return max(1, int(round(target_s / max(t, 1e-9))))


def time_config(cfg: str, rounds: int, sample_s: float, threads: int) -> dict[str, Any]:
    batch, sizes = CONFIGS[cfg]
    cons = make_contenders(batch, sizes)
    results: dict[str, Any] = {}
    for mode in ("train", "infer"):
        names = list(cons)
        for name in names:
            before = cons[name].get(f"before_{mode}")
            if before is not None:
                before()
        ns = {name: calibrate(cons[name][mode], sample_s) for name in names}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                fn = cons[name][mode]
                n = ns[name]
                preroll(fn, max(1, n // 4), threads)
                samples[name].append(_loop(fn, n))
        res: dict[str, Any] = {}
        for name in CONTENDERS:
            if name not in samples:
                res[name] = None
                continue
            s = np.array(samples[name])
            res[name] = {
                "median_us": float(np.median(s) * 1e6),
                "min_us": float(s.min() * 1e6),
                "max_us": float(s.max() * 1e6),
                "calls_per_sample": ns[name],
                "samples": len(s),
            }
        med = {k: v["median_us"] for k, v in res.items() if v is not None}
        res["ratios"] = {
            f"nnrt/{k}": (med["nnrt"] / med[k] if k in med else None)
            for k in ("torch", "jax", "numpy", "floor")
        }
        results[mode] = res
    results["batch"] = batch
    results["sizes"] = sizes
    return results


# ------------------------------------------------------------------- serving
def serving_net(sizes: list[int]) -> nnrt.Sequential:
    """The float32 benchmark net with running statistics from a few training batches."""
    net = build_nnrt(sizes, "float32")
    rng = np.random.default_rng(5)
    for _ in range(3):
        net.forward(rng.standard_normal((64, sizes[0])).astype(np.float32), training=True)
    return net


def make_serve_contenders(sizes: list[int], threads: int) -> dict[str, Callable[[Any], Any]]:
    """name -> predict(X) for a numpy float32 batch X (see the module docstring)."""
    net = serving_net(sizes)
    state = net.state_dict()
    out: dict[str, Callable[[Any], Any]] = {"nnrt": lambda X: net.forward(X, training=False)}
    out["nnrt frozen"] = nnrt.freeze(net)
    if ort is not None:
        from nnrt.onnx import to_model

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(
            to_model(net).SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        name = sess.get_inputs()[0].name
        out["onnxruntime"] = lambda X: sess.run(None, {name: X})[0]
    if torch is not None:
        model = build_torch(state, sizes, torch.float32).eval()

        def torch_predict(X: Any) -> Any:
            with torch.inference_mode():
                return model(torch.from_numpy(X))

        out["torch"] = torch_predict
    jx = build_jax(state, sizes)
    if jx is not None:
        out["jax"] = jx["infer"]
    ref = NumpyMLP(state, len(sizes) - 2, np.float32)
    out["numpy"] = lambda X: ref.forward(X, False)
    return out


def time_serving(cfg: str, rounds: int, sample_s: float, threads: int) -> dict[str, Any]:
    """Median per-call times of every serving contender at each batch, interleaved.

    One thread: thread CPU time (every contender but jax computes in the calling
    thread); more threads, and jax always: wall time. Each contender's output is
    checked against nnrt's first (float32, rtol 1e-3): the run aborts otherwise.
    """
    sizes = CONFIGS[cfg][1]
    cons = make_serve_contenders(sizes, threads)
    names = list(cons)
    clock = time.thread_time if threads == 1 else time.perf_counter
    res: dict[str, Any] = {"sizes": sizes, "clock": clock.__name__, "batches": {}}
    rng = np.random.default_rng(6)
    for batch in SERVE_BATCHES:
        X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
        want = np.array(cons["nnrt"](X), dtype=np.float64)
        for name in names:
            got = np.asarray(cons[name](X), dtype=np.float64)
            if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-4):
                raise SystemExit(f"SERVING CHECK FAILED [{cfg} batch {batch}] {name} != nnrt")
        fns = {name: (lambda f=cons[name], X=X: f(X)) for name in names}
        ns = {name: calibrate(fns[name], sample_s) for name in names}
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn, n = fns[name], ns[name]
                preroll(fn, max(1, n // 4), threads)
                tick = time.perf_counter if name == "jax" else clock
                t0 = tick()
                for _ in range(n):
                    fn()
                samples[name].append((tick() - t0) / n)
        row: dict[str, Any] = {}
        for name in SERVE_CONTENDERS:
            v = np.array(samples.get(name, []))
            row[name] = None if not len(v) else float(np.median(v) * 1e6)
        row["ratios"] = {
            f"frozen/{k}": (row["nnrt frozen"] / row[k] if row.get(k) else None)
            for k in SERVE_PEERS
        }
        ort_t = row.get("onnxruntime")
        row["ratios"]["nnrt/onnxruntime"] = row["nnrt"] / ort_t if ort_t else None
        res["batches"][batch] = row
    return res


def format_serve_table(results: dict[str, Any]) -> str:
    lines = [
        "| config | batch | nnrt | nnrt frozen | onnxruntime | torch | jax | numpy | nnrt/ort "
        "| frozen/ort | frozen/torch | frozen/jax | frozen/numpy | target frozen/ort |",
        "|" + "---|" * 14,
    ]
    for cfg, res in results["configs"].items():
        r = res.get("serve")
        if r is None:
            continue
        for batch, row in r["batches"].items():
            cells = [
                "not installed" if row[n] is None else _fmt_t(row[n]) for n in SERVE_CONTENDERS
            ]
            ratios = [_fmt_ratio(row["ratios"]["nnrt/onnxruntime"])]
            ratios += [_fmt_ratio(row["ratios"][f"frozen/{k}"]) for k in SERVE_PEERS]
            t = SERVE_TARGETS.get((cfg, int(batch)), SERVE_TARGET)
            v = row["ratios"]["frozen/onnxruntime"]
            verdict = "n/a" if v is None else ("ok" if v <= t else "MISSED")
            lines.append(
                f"| {cfg} | {batch} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(ratios)
                + f" | ≤ {t:.1f} {verdict} |"
            )
    return "\n".join(lines)


# -------------------------------------------------------------------- report
def cpu_info() -> dict[str, Any]:
    """Vendor, model and vector ISA of the host CPU (from /proc/cpuinfo on Linux)."""
    info: dict[str, Any] = {"vendor": None, "model": platform.processor() or platform.machine()}
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "vendor_id" and info["vendor"] is None:
                    info["vendor"] = val
                elif key == "model name":
                    info["model"] = val
                elif key == "cpu family":
                    info["family"] = int(val)
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16") if f in flags]
    isa += [f for f in ("amx_tile", "amx_bf16", "amx_int8") if f in flags]
    info["isa"] = isa
    return info


def blas_backend() -> dict[str, Any]:
    """nnrt's GEMM backend and small-batch kernel, read defensively (names may move)."""
    import nnrt.dense as dense

    out: dict[str, Any] = {}
    for mod in (nnrt, dense, getattr(nnrt, "perf", None), getattr(nnrt, "config", None)):
        if mod is None:
            continue
        for attr in ("BLAS_IN_USE", "BLAS_BACKEND", "blas_backend"):
            v = getattr(mod, attr, None)
            if v is not None and "backend" not in out:
                out["backend"] = v() if callable(v) else v
    out.setdefault("backend", "unknown")
    out["small_batch_kernel"] = getattr(dense, "SMALL_M_ISA", "n/a")
    out["small_batch_enabled"] = getattr(dense, "SMALL_M_ENABLED", None)
    return out


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    blas = [
        {
            "api": d.get("internal_api"),
            "version": d.get("version"),
            "architecture": d.get("architecture"),
            "threads": d.get("num_threads"),
            "library": os.path.basename(d.get("filepath", "")),
        }
        for d in threadpool_info()
    ]
    jax = _jax()
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_info": cpu_info(),
        "nnrt_blas": blas_backend(),
        "onnxruntime": ort.__version__ if ort is not None else "not installed",
        "jax": jax.__version__ if jax is not None else "not installed",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "nnrt": nnrt.__version__,
        "torch": torch.__version__ if torch is not None else "not installed",
        "threads": threads,
        "blas": blas,
        "env": {
            k: os.environ[k]
            for k in (
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
            )
            if k in os.environ
        },
    }
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def _fmt_t(us: float) -> str:
    if us >= 10000:
        return f"{us / 1000:.1f} ms"
    if us >= 1000:
        return f"{us / 1000:.2f} ms"
    return f"{us:.0f} µs"


def format_table(results: dict[str, Any]) -> str:
    lines = []
    head = (
        "| config | mode | nnrt | numpy | torch | jax | floor | nnrt/torch | nnrt/jax "
        "| nnrt/numpy | nnrt/floor | target |"
    )
    lines.append(head)
    lines.append("|" + "---|" * 12)
    for cfg, res in results["configs"].items():
        b, sizes = res["batch"], res["sizes"]
        label = f"{cfg} b{b} {'→'.join(map(str, sizes))}"
        for mode in ("train", "infer"):
            r = res[mode]
            cells = []
            for name in CONTENDERS:
                v = r[name]
                cells.append(
                    "not installed"
                    if v is None
                    else f"{_fmt_t(v['median_us'])} ({_fmt_t(v['min_us'])}–{_fmt_t(v['max_us'])})"
                )
            ratios = []
            for k in ("torch", "jax", "numpy", "floor"):
                v = r["ratios"][f"nnrt/{k}"]
                ratios.append("not installed" if v is None else f"{v:.3f}")
            tgt = TARGETS[cfg]
            target = ", ".join(f"/{k} ≤ {t:.2f}" for k, t in tgt.items())
            verdict = []
            for k, t in tgt.items():
                v = r["ratios"][f"nnrt/{k}"]
                if v is not None:
                    verdict.append("ok" if v <= t else "MISSED")
            target += " " + ("/".join(verdict) if verdict else "n/a")
            step = "train step" if mode == "train" else "inference"
            lines.append(
                f"| {label} | {step} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(ratios)
                + f" | {target} |"
            )
    return "\n".join(lines)


def format_fit_table(results: dict[str, Any]) -> str:
    lines = [
        "| config | nnrt fit | bare step | bare loop | torch loop | keras fit | fit/step "
        "| fit/loop | fit/torch | fit/keras | target fit/step | target fit/keras |",
        "|" + "---|" * 12,
    ]
    for cfg, res in results["configs"].items():
        r = res.get("fit")
        if r is None:
            continue
        label = f"{cfg} b{res['batch']} × {r['steps']} steps"
        cells = []
        for name in FIT_CONTENDERS:
            v = r[name]
            cells.append(
                "not installed"
                if v is None
                else f"{_fmt_t(v['median_us'])} ({_fmt_t(v['min_us'])}–{_fmt_t(v['max_us'])})"
            )
        ratios = [_fmt_ratio(r["ratios"][f"fit/{k}"]) for k in ("step", "loop", "torch", "keras")]
        of_medians = r.get("ratios_of_medians", {}).get("fit/step")
        if of_medians is not None:
            ratios[0] += f" ({_fmt_ratio(of_medians)})"
        v = r["ratios"]["fit/step"]
        verdict = "ok" if v is not None and v <= FIT_TARGET else "MISSED"
        kt = FIT_KERAS_TARGETS.get(cfg)
        kv = r["ratios"]["fit/keras"]
        keras_cell = (
            "–"
            if kt is None
            else f"≤ {kt:.2f} " + ("no keras" if kv is None else "ok" if kv <= kt else "MISSED")
        )
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(ratios)
            + f" | ≤ {FIT_TARGET:.2f} {verdict} | {keras_cell} |"
        )
    return "\n".join(lines)


def warm_blas() -> None:
    """One large GEMM through each BLAS copy (numpy's, scipy's, torch's)."""
    import scipy.linalg.blas as sblas

    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    for _ in range(2):
        a @ a
        sblas.sgemm(1.0, a, a)
        if torch is not None:
            t = torch.from_numpy(a)
            t @ t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, shorter rounds (< 90 s)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument(
        "--threads",
        default="1",
        help="threads for every contender (BLAS, torch, onnxruntime, XLA): N, or a "
        "comma-separated list (e.g. 1,2: one run per count, each in its own process)",
    )
    ap.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated subset of " + ",".join(CONFIGS),
    )
    ap.add_argument("--rounds", type=int, help="override the number of rounds")
    ap.add_argument("--no-fit", action="store_true", help="skip the fit row")
    ap.add_argument("--no-serve", action="store_true", help="skip the serving table")
    args = ap.parse_args(argv)
    cfgs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in cfgs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c!r}; known: {', '.join(CONFIGS)}")
    try:
        counts = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads takes N or a list like 1,2, got {args.threads!r}")
    if not counts or min(counts) < 1:
        ap.error(f"--threads takes positive counts, got {args.threads!r}")
    if len(counts) > 1:
        return run_each_thread_count(argv if argv is not None else sys.argv[1:], counts, args)
    args.threads = counts[0]

    t_start = time.perf_counter()
    threadpool_limits(args.threads)
    nnrt.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)

    info = machine_info(args.threads)
    ci, nb = info["cpu_info"], info["nnrt_blas"]
    print(
        f"machine: {ci['vendor']} {ci['model']} (family {ci.get('family', '?')}; "
        f"{', '.join(ci['isa']) or 'no AVX2'}), {info['cores']} cores; python "
        f"{info['python']}, numpy {info['numpy']}, torch {info['torch']}, onnxruntime "
        f"{info['onnxruntime']}, jax {info['jax']}, nnrt {info['nnrt']}"
    )
    print(
        f"nnrt BLAS backend: {nb['backend']}; small-batch eval kernel: "
        f"{nb['small_batch_kernel']} ({'in use' if nb['small_batch_enabled'] else 'not used'})"
    )
    for b in info["blas"]:
        print(
            f"  {b['api']} {b['version']} ({b['architecture']}) {b['library']}: "
            f"{b['threads']} threads"
        )
    print(
        f"threads: BLAS {args.threads}, torch "
        f"{info.get('torch_threads', 'n/a')}; env {info['env'] or '{}'}"
    )
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        print(f"process runs on {len(cpus)} core(s): {cpus}")

    print("float64 check (nnrt vs numpy reference, rtol 1e-9) ...", flush=True)
    checks = {c: check_float64(c, *CONFIGS[c]) for c in cfgs}
    print(
        "  passed: "
        + ", ".join(f"{c} ({v['arrays_checked']} gradient arrays)" for c, v in checks.items())
    )

    warm_blas()
    results: dict[str, Any] = {
        "machine": info,
        "quick": args.quick,
        "checks": checks,
        "configs": {},
    }
    for c in cfgs:
        if args.rounds:
            rounds = args.rounds
        elif args.quick:
            rounds = 5 if c != "large" else 3
        else:
            rounds = 15 if c != "large" else 9
        sample_s = 0.02 if args.quick else 0.05
        t0 = time.perf_counter()
        results["configs"][c] = time_config(c, rounds, sample_s, args.threads)
        if not args.no_fit:
            results["configs"][c]["fit"] = time_fit(c, rounds, sample_s, args.threads)
        if not args.no_serve:
            results["configs"][c]["serve"] = time_serving(c, rounds, sample_s / 2, args.threads)
        r = results["configs"][c]
        print(
            f"{c}: {rounds} rounds in {time.perf_counter() - t0:.1f} s; train nnrt/torch "
            f"{_fmt_ratio(r['train']['ratios']['nnrt/torch'])}, nnrt/floor "
            f"{_fmt_ratio(r['train']['ratios']['nnrt/floor'])}",
            flush=True,
        )
    results["seconds"] = time.perf_counter() - t_start
    print()
    print(format_table(results))
    if not args.no_fit:
        print()
        clock = "thread CPU time" if args.threads == 1 else "wall time"
        print(f"fit: one epoch of net.fit and the other contenders, per step ({clock})")
        print(format_fit_table(results))
    if not args.no_serve:
        print()
        clock = "thread CPU time; jax: wall" if args.threads == 1 else "wall time"
        print(f"serving: eval forward per call, float32, threads {args.threads} ({clock})")
        print(format_serve_table(results))
    print(
        f"\ntotal {results['seconds']:.0f} s; times are medians per call (min–max over "
        f"samples); ratios are of medians from this run"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def run_each_thread_count(argv: list[str], counts: list[int], args: Any) -> int:
    """Run this script once per thread count (child processes: XLA and the BLAS pools
    are configured at import); each prints its report; --json gets all of them."""
    import subprocess
    import tempfile

    base: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--threads", "--json"):
            skip = True
            continue
        if a.startswith(("--threads=", "--json=")):
            continue
        base.append(a)
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            path = os.path.join(tmp, f"threads{n}.json")
            print(f"\n======== threads {n} ========", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--threads", str(n)]
            rc = subprocess.call([*cmd, "--json", path])
            if rc != 0:
                return rc
            with open(path) as fh:
                runs[str(n)] = json.load(fh)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": counts, "runs": runs}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def _fmt_ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
