"""Steady-state memory: a training step and an inference forward allocate no batch-sized arrays.

numpy reports its data allocations to tracemalloc, so after a warm-up the
traced peak of one more step, relative to the memory in use before it, shows
every temporary array the step made, and the growth over many steps shows
anything kept. The hidden width (256) is much larger than the number of
classes (10): the only batch-sized array a step may create is the loss's
``dY`` of shape (batch, classes), which the loss returns by design.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import nnrt

BATCH, N_IN, HIDDEN, N_OUT = 128, 64, 256, 10


def _net(dtype: Any) -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", N_IN, HIDDEN),
            nnrt.layer("batchnorm", HIDDEN),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense_nobias", HIDDEN, HIDDEN),
            nnrt.layer("batchnorm", HIDDEN),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", HIDDEN, N_OUT),
        ],
        seed=0,
        dtype=dtype,
    )


def _measure(fn: Callable[[], Any], steps: int = 50) -> tuple[int, int]:
    """(peak above the starting point during the steps, growth after them), in bytes."""
    tracemalloc.start()
    try:
        for _ in range(5):  # warm-up inside the trace, so buffers freed later were traced
            fn()
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(steps):
            fn()
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - start, end - start


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_momentum", "adam"])
def test_training_step_allocates_no_batch_sized_arrays(dtype: np.dtype, optimizer: str) -> None:
    rng = np.random.default_rng(0)
    net = _net(dtype)
    X = rng.standard_normal((BATCH, N_IN)).astype(dtype)
    y = rng.integers(0, N_OUT, size=BATCH)
    opt: Any
    if optimizer == "sgd":
        opt = nnrt.optim.SGD(net, lr=0.01)
    elif optimizer == "sgd_momentum":
        opt = nnrt.optim.SGD(net, lr=0.01, momentum=0.9)
    else:
        opt = nnrt.optim.Adam(net, lr=1e-3)

    def step() -> None:
        out = net.forward(X, training=True)
        _, dY = nnrt.losses.softmax_cross_entropy(out, y)
        net.backward(dY, input_grad=False)
        opt.step()

    peak, growth = _measure(step)
    itemsize = np.dtype(dtype).itemsize
    hidden_array = BATCH * HIDDEN * itemsize  # one activation of a hidden layer
    loss_out = BATCH * N_OUT * itemsize  # the loss's returned dY
    # nothing kept: growth is a few small Python objects at most
    assert growth < 4096, growth
    # temporaries: the loss's dY (plus small per-call objects), never an activation
    assert peak < loss_out + 16384, (peak, loss_out)
    assert peak < hidden_array, (peak, hidden_array)


def test_forward_backward_with_given_gradient_allocate_nothing(dtype: np.dtype) -> None:
    rng = np.random.default_rng(1)
    net = _net(dtype)
    X = rng.standard_normal((BATCH, N_IN)).astype(dtype)
    dY = rng.standard_normal((BATCH, N_OUT)).astype(dtype)
    opt = nnrt.optim.SGD(net, lr=0.01)

    def step() -> None:
        net.forward(X, training=True)
        net.backward(dY)
        opt.step()

    peak, growth = _measure(step)
    smallest_batch_array = BATCH * N_OUT * np.dtype(dtype).itemsize
    assert growth < 4096, growth
    assert peak < smallest_batch_array, (peak, smallest_batch_array)


def test_inference_forward_allocates_nothing(dtype: np.dtype) -> None:
    rng = np.random.default_rng(2)
    net = _net(dtype)
    X = rng.standard_normal((BATCH, N_IN)).astype(dtype)
    net.forward(X, training=True)  # a training forward first: eval must not clobber it

    peak, growth = _measure(lambda: net.forward(X, training=False))
    smallest_batch_array = BATCH * N_OUT * np.dtype(dtype).itemsize
    assert growth < 4096, growth
    assert peak < smallest_batch_array, (peak, smallest_batch_array)


def test_buffers_follow_a_new_batch_size_without_growing(dtype: np.dtype) -> None:
    # alternating batch sizes reallocates (buffers are per batch size) but keeps
    # nothing beyond the current buffers: memory in use does not grow
    rng = np.random.default_rng(3)
    net = _net(dtype)
    Xa = rng.standard_normal((BATCH, N_IN)).astype(dtype)
    Xb = rng.standard_normal((BATCH // 2, N_IN)).astype(dtype)

    def step() -> None:
        net.forward(Xa, training=True)
        net.forward(Xb, training=True)

    _, growth = _measure(step, steps=20)
    assert growth < 4096, growth
