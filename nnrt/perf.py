"""Performance controls: BLAS thread count and a per-layer profiler.

``set_num_threads(n)`` sets the BLAS backend nnrt's GEMMs use (numpy's OpenBLAS,
MKL or scipy's OpenBLAS: ``nnrt._blas.info()``, docs/performance.md "BLAS
backends") through its own call, every other BLAS library loaded in the process
through threadpoolctl, and the threads of nnrt's element-wise kernels. Without it
the default thread policy (``nnrt._parallel``; docs/performance.md "Threads")
picks per GEMM size: one BLAS thread for small GEMMs, and for large ones one or
the backend's own count (one per core unless ``OPENBLAS_NUM_THREADS``/
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` say otherwise), whichever it measured
faster; it splits large element-wise kernels over two threads when a second
thread pays. ``set_num_threads(None)`` returns to that policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nnrt import optim
from nnrt.engine import TrainStep
from nnrt.registry import registry

__all__ = [
    "LayerProfile",
    "Profile",
    "blas_backend",
    "blas_info",
    "get_num_threads",
    "profile",
    "set_num_threads",
]


def _blas_controller() -> Any:
    # imported lazily: threadpoolctl scans the loaded libraries when created
    import scipy.linalg.cython_blas  # noqa: F401  (make sure scipy's OpenBLAS is loaded)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def set_num_threads(n: int | None) -> None:
    """Use up to ``n`` threads in nnrt's BLAS backend, in every other loaded BLAS library
    and in nnrt's GEMM kernel and element-wise kernels (split over 2 threads when
    ``n >= 2``).

    The backend in use (``nnrt._blas.info()["backend"]``: numpy's OpenBLAS, MKL or
    scipy's OpenBLAS) is set through its own call; every BLAS threadpoolctl finds
    loaded is limited too. Applies process-wide until changed again; ``n`` must be a
    positive int, or None to return to the default (the BLAS's own thread count as
    the ceiling). ``n`` is a ceiling, as torch's ``set_num_threads``: nnrt's per-size
    thread policy (docs/performance.md "Threads") still runs small GEMMs and small
    element-wise jobs on one thread, and larger GEMMs on one or ``n`` threads,
    whichever was measured faster for the shape; ``n = 1`` runs everything on one.
    Libraries loaded after the call (e.g. torch's) are not affected.
    """
    from nnrt import _parallel

    if n is None:
        _parallel.set_user_threads(None)
        return
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int or None, got {n!r}")
    import nnrt._blas as _blas

    _blas.set_threads(int(n))  # settles a pending backend choice first
    controller = _blas_controller()
    controller.select(user_api="blas").limit(limits=int(n))
    _parallel.set_user_threads(int(n))


def get_num_threads() -> int:
    """Threads of the BLAS backend nnrt's GEMMs use (``nnrt._blas.info()``)."""
    import nnrt._blas as _blas

    return int(_blas.threads())


def blas_backend() -> str:
    """Name of the BLAS backend nnrt's GEMMs use: ``openblas`` (numpy's), ``mkl``,
    ``scipy-openblas`` or ``scipy`` (docs/performance.md, "BLAS backends")."""
    return str(blas_info()["backend"])


def blas_info() -> dict[str, Any]:
    """The BLAS backend nnrt's GEMMs use, as ``nnrt info`` prints it: ``backend``,
    ``library`` (name and version), ``kernel``, ``threads``, ``int`` (LP64/ILP64),
    ``filepath``, ``reason`` (default, forced by ``NNRT_BLAS``, or calibrated) and
    ``calibration`` (the measured seconds, when MKL was calibrated against OpenBLAS)."""
    import nnrt._blas as _blas

    return dict(_blas.info())


@dataclass
class LayerProfile:
    """Median seconds per call for one layer of a profiled network.

    ``forward``/``backward`` are the layer's calls from Python (dispatch,
    validation and kernel); ``update`` is the optimizer's update of this
    layer's parameters. ``*_dispatch`` is the fixed per-call part: the same
    call on a 2-row batch (what does not scale with the batch: Python call,
    validation, buffer management, BLAS call set-up), capped at the full
    call; ``*_kernel`` is the rest.
    """

    index: int
    name: str
    forward: float
    backward: float
    update: float
    forward_dispatch: float
    backward_dispatch: float

    @property
    def forward_kernel(self) -> float:
        return self.forward - self.forward_dispatch

    @property
    def backward_kernel(self) -> float:
        return self.backward - self.backward_dispatch

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.update


@dataclass
class Profile:
    """What ``nnrt.profile`` measured; ``str(profile)`` is a table.

    ``total`` is the median time of the whole step as ``fit`` runs it
    (``nnrt.engine.TrainStep``: ``forward``, loss, ``backward(input_grad=False)``,
    ``optimizer.step()``; only ``forward(training=False)`` when profiling inference); the per-layer
    times and ``loss`` are measured one call at a time, so their sum
    (``layer_sum``) is close to but not exactly ``total``.
    """

    layers: list[LayerProfile]
    loss: float
    total: float
    batch: int
    training: bool
    repeat: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_sum(self) -> float:
        return sum(r.total for r in self.layers) + self.loss

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (seconds), JSON-able."""
        rows = []
        for r in self.layers:
            row = asdict(r)
            row["forward_kernel"] = r.forward_kernel
            row["backward_kernel"] = r.backward_kernel
            rows.append(row)
        return {
            "batch": self.batch,
            "training": self.training,
            "repeat": self.repeat,
            "total": self.total,
            "loss": self.loss,
            "layer_sum": self.layer_sum,
            "layers": rows,
        }

    def __str__(self) -> str:
        def us(t: float) -> str:
            return f"{t * 1e6:10.1f}"

        mode = "training step" if self.training else "inference forward"
        head = (
            f"nnrt.profile: {mode}, batch {self.batch}, median of {self.repeat} runs (µs)\n"
            f"{'#':>3} {'layer':<14}{'forward':>10}{'(disp)':>10}{'backward':>10}"
            f"{'(disp)':>10}{'update':>10}{'total':>10}"
        )
        lines = [head]
        for r in self.layers:
            lines.append(
                f"{r.index:>3} {r.name:<14}{us(r.forward)}{us(r.forward_dispatch)}"
                f"{us(r.backward)}{us(r.backward_dispatch)}{us(r.update)}{us(r.total)}"
            )
        if self.training:
            lines.append(f"    {'loss':<14}{'':>50}{us(self.loss)}")
        lines.append(f"    {'sum of parts':<14}{'':>50}{us(self.layer_sum)}")
        lines.append(f"    {'measured step':<14}{'':>50}{us(self.total)}")
        return "\n".join(lines)


def _median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def profile(
    net: Any,
    X: Any,
    y: Any = None,
    loss: Any = "softmax_cross_entropy",
    optimizer: Any = None,
    repeat: int = 20,
    warmup: int = 3,
) -> Profile:
    """Time a training step (``y`` given) or an inference forward (``y=None``) layer by layer.

    Returns a :class:`Profile`: per layer the forward, backward and optimizer
    update times, each call split into dispatch (fixed per-call cost) and
    kernel; the loss; and the measured time of the whole step. ``optimizer``
    defaults to ``SGD(net, lr=0.0)`` (the update runs, nothing changes).
    The network's parameters and buffers are restored afterwards; a given
    optimizer's state is not (it takes ``warmup + repeat`` extra steps).
    """
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"profile: repeat must be a positive int, got {repeat!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"profile: warmup must be an int >= 0, got {warmup!r}")
    training = y is not None
    saved = net.state_dict()
    layers = list(net.layers)
    try:
        Xa = net.layers[0].prepare_input(X) if layers else np.asarray(X)
        batch = int(Xa.shape[0])
        rows_2 = min(2, batch)
        loss_fn = registry.resolve_loss(loss) if training else None
        opt = optimizer
        if training and opt is None:
            opt = optim.SGD(net, lr=0.0)

        # inputs of every layer and gradients arriving at every layer
        ins: list[np.ndarray] = []
        h: Any = Xa
        for layer in layers:
            ins.append(h)
            h = np.array(layer.forward(h, training), copy=True)
        grads_in: list[np.ndarray | None] = [None] * len(layers)
        loss_time = 0.0
        if training:
            assert loss_fn is not None
            out = net.forward(Xa, training=True)
            loss_time = _median_time(lambda: loss_fn(out, y), repeat)
            _, g = loss_fn(out, y)
            g = np.array(g, copy=True)
            for i in range(len(layers) - 1, -1, -1):
                grads_in[i] = g
                if i > 0:
                    layers[i].forward(ins[i], True)
                    g = np.array(layers[i].backward(g), copy=True)
        first = net._first_trainable() if training else len(layers)

        train_step = TrainStep(net, opt, loss) if training else None

        def step() -> None:
            if train_step is not None:
                train_step(Xa, y)  # the training step of fit: nnrt.engine.TrainStep
            else:
                net.forward(Xa, training=False)

        for _ in range(warmup):
            step()
        total = _median_time(step, repeat)

        results = []
        for i, layer in enumerate(layers):
            x_i = ins[i]
            fwd = _time_layer_forward(layer, x_i, training, repeat, warmup)
            fwd2 = _time_layer_forward(layer, np.array(x_i[:rows_2]), training, repeat, warmup)
            bwd = bwd2 = upd = 0.0
            if training and i >= first:
                g_i = grads_in[i]
                assert g_i is not None
                params_only = i == first and hasattr(layer, "backward_params")
                bwd = _time_layer_backward(layer, x_i, g_i, params_only, repeat, warmup)
                bwd2 = _time_layer_backward(
                    layer,
                    np.array(x_i[:rows_2]),
                    np.array(g_i[:rows_2]),
                    params_only,
                    repeat,
                    warmup,
                )
                if layer.params():
                    layer.forward(x_i, True)
                    layer.backward(g_i)
                    lopt = optim.SGD(layer, lr=0.0) if optimizer is None else None
                    if lopt is not None:
                        for _ in range(warmup):
                            lopt.step()
                        upd = _median_time(lopt.step, repeat)
            results.append(
                LayerProfile(
                    index=i,
                    name=type(layer).__name__,
                    forward=fwd,
                    backward=bwd,
                    update=upd,
                    forward_dispatch=min(fwd2, fwd),
                    backward_dispatch=min(bwd2, bwd),
                )
            )
        if training and optimizer is not None:
            # a user's optimizer updates all layers at once: attribute by parameter count
            t_opt = _median_time(opt.step, repeat)
            sizes = [sum(p.size for p in layer.params().values()) for layer in layers]
            n_all = max(1, sum(sizes))
            for r, size in zip(results, sizes, strict=True):
                r.update = t_opt * size / n_all
        # leave the layers' buffers sized for the real batch again
        net.forward(Xa, training=training)
        return Profile(results, loss_time, total, batch, training, repeat)
    finally:
        net.load_state_dict(saved)


def _time_layer_forward(
    layer: Any, x: np.ndarray, training: bool, repeat: int, warmup: int
) -> float:
    for _ in range(max(1, warmup)):
        layer.forward(x, training)
    return _median_time(lambda: layer.forward(x, training), repeat)


def _time_layer_backward(
    layer: Any, x: np.ndarray, g: np.ndarray, params_only: bool, repeat: int, warmup: int
) -> float:
    layer.forward(x, True)
    fn = layer.backward_params if params_only else layer.backward
    for _ in range(max(1, warmup)):
        fn(g)
    return _median_time(lambda: fn(g), repeat)
