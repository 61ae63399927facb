"""Resource check: 10^4 training steps keep the resident set size flat.

Tiny config (batch 32, 64 -> 64 -> 64 -> 10 with BatchNorm and sigmoids): after a
warm-up, RSS may grow by less than 5 MB over 10^4 steps of forward, softmax
cross-entropy, backward and Adam; then over 10^4 steps driven by ``fit`` plus
``predict``/``evaluate`` calls; then over 300 save/load round trips. A leak of
a single 64x64 float32 buffer per step would be 160 MB.
"""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
import pytest

import nnrt

STEPS = 10_000
WARMUP = 1_000
LIMIT = 5 * 2**20


def _rss() -> int:
    gc.collect()
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _net() -> nnrt.Sequential:
    return nnrt.Sequential(
        [
            nnrt.layer("dense_nobias", 64, 64),
            nnrt.layer("batchnorm", 64),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 64, 64),
            nnrt.layer("sigmoid"),
            nnrt.layer("dense", 64, 10),
        ],
        seed=0,
        dtype="float32",
    )


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm"),
]


def test_training_steps_do_not_leak() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(32 * 64, 64)).astype(np.float32)
    y = rng.integers(0, 10, 32 * 64)
    net = _net()
    opt = nnrt.optim.Adam(net, lr=1e-3)

    def step(i: int) -> float:
        lo = (i % 64) * 32
        Y = net.forward(X[lo : lo + 32], training=True)
        loss, dY = nnrt.losses.softmax_cross_entropy(Y, y[lo : lo + 32])
        net.backward(dY)
        opt.step()
        return loss

    for i in range(WARMUP):
        step(i)
    before = _rss()
    losses = [step(i) for i in range(STEPS)]
    grown = _rss() - before
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    print(f"RSS growth over {STEPS} training steps: {grown / 2**20:.2f} MB")
    assert grown < LIMIT, f"RSS grew by {grown / 2**20:.1f} MB over {STEPS} steps"


def test_fit_predict_evaluate_do_not_leak() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(32 * 100, 64))
    y = rng.integers(0, 10, 32 * 100)
    net = _net()
    net.fit(X, y, epochs=10, batch_size=32, progress=False)  # warm-up: 10^3 steps
    net.predict(X[:500])
    net.evaluate(X[:500], y[:500])
    before = _rss()
    history = net.fit(X, y, epochs=STEPS // 100, batch_size=32, progress=False)  # 10^4 steps
    for _ in range(200):
        net.predict(X[:500])
        net.evaluate(X[:500], y[:500])
    grown = _rss() - before
    assert history.params["steps"] * len(history.epoch) == STEPS
    print(f"RSS growth over {STEPS} fit steps + 200 predict/evaluate: {grown / 2**20:.2f} MB")
    assert grown < LIMIT, f"RSS grew by {grown / 2**20:.1f} MB over {STEPS} fit steps"


def test_save_load_round_trips_do_not_leak(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "m.npz"
    net = _net()
    for _ in range(30):
        net.save(path)
        nnrt.load(path)
    before = _rss()
    for _ in range(300):
        net.save(path)
        nnrt.load(path)
    grown = _rss() - before
    print(f"RSS growth over 300 save/load round trips: {grown / 2**20:.2f} MB")
    assert grown < LIMIT, f"RSS grew by {grown / 2**20:.1f} MB over 300 save/load"
