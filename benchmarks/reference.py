"""Plain-numpy reference MLP for the benchmark: the textbook formulas, nothing fused.

The network is the benchmark's: hidden blocks [dense_nobias -> batchnorm ->
sigmoid] and a final dense layer, trained with softmax cross-entropy (mean over
the batch) and plain SGD. Arrays use the nnrt layout: weight (in, out).

Written independently of nnrt (only numpy): it serves both as a contender and
as the float64 oracle that nnrt's loss and gradients must match.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["NumpyMLP", "floor_step", "floor_infer"]


class NumpyMLP:
    """The benchmark MLP in plain numpy.

    ``params`` maps nnrt's state-dict keys (``"0.weight"``, ``"1.gamma"``, ...)
    to arrays; the layout is ``3 * hidden`` block layers then the final dense.
    """

    def __init__(
        self,
        state: dict[str, np.ndarray],
        n_hidden: int,
        dtype: Any,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> None:
        self.n_hidden = n_hidden
        self.momentum = momentum
        self.eps = eps
        self.p = {k: np.array(v, dtype=dtype) for k, v in state.items()}
        self.g: dict[str, np.ndarray] = {}
        self.cache: list[tuple[np.ndarray, ...]] = []

    # ---------------------------------------------------------------- forward
    def forward(self, X: np.ndarray, training: bool) -> np.ndarray:
        p = self.p
        self.cache = []
        h = X
        for k in range(self.n_hidden):
            i = 3 * k
            W = p[f"{i}.weight"]
            gamma, beta = p[f"{i + 1}.gamma"], p[f"{i + 1}.beta"]
            z = h @ W
            if training:
                n = z.shape[0]
                mean = z.mean(axis=0)
                var = ((z - mean) ** 2).mean(axis=0)
                rm, rv = p[f"{i + 1}.running_mean"], p[f"{i + 1}.running_var"]
                rm *= 1 - self.momentum
                rm += self.momentum * mean
                rv *= 1 - self.momentum
                rv += self.momentum * var * n / (n - 1)
            else:
                mean = p[f"{i + 1}.running_mean"]
                var = p[f"{i + 1}.running_var"]
            invstd = 1.0 / np.sqrt(var + self.eps)
            xhat = (z - mean) * invstd
            y = gamma * xhat + beta
            s = 1.0 / (1.0 + np.exp(-y))
            self.cache.append((h, xhat, invstd, s))
            h = s
        i = 3 * self.n_hidden
        self.h_last = h
        return h @ p[f"{i}.weight"] + p[f"{i}.bias"]

    # ------------------------------------------------------------------- loss
    @staticmethod
    def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
        n = logits.shape[0]
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        sm = e / e.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        loss = float(np.mean(np.log(e.sum(axis=1)) - z[rows, labels]))
        dY = sm.copy()
        dY[rows, labels] -= 1.0
        dY /= n
        return loss, dY

    # --------------------------------------------------------------- backward
    def backward(self, dY: np.ndarray, input_grad: bool = False) -> np.ndarray | None:
        p, g = self.p, self.g
        i = 3 * self.n_hidden
        g[f"{i}.weight"] = self.h_last.T @ dY
        g[f"{i}.bias"] = dY.sum(axis=0)
        dh = dY @ p[f"{i}.weight"].T
        for k in range(self.n_hidden - 1, -1, -1):
            i = 3 * k
            h, xhat, invstd, s = self.cache[k]
            n = h.shape[0]
            dy = dh * s * (1.0 - s)  # sigmoid
            gamma = p[f"{i + 1}.gamma"]
            g[f"{i + 1}.beta"] = dy.sum(axis=0)
            g[f"{i + 1}.gamma"] = (dy * xhat).sum(axis=0)
            dxhat = dy * gamma
            # the full BatchNorm derivative (through the batch mean and variance)
            dz = invstd / n * (n * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0))
            g[f"{i}.weight"] = h.T @ dz
            if k > 0 or input_grad:
                dh = dz @ p[f"{i}.weight"].T
            else:
                return None
        return dh

    def sgd(self, lr: float) -> None:
        for k, grad in self.g.items():
            self.p[k] -= lr * grad

    def train_step(self, X: np.ndarray, y: np.ndarray, lr: float) -> float:
        loss, dY = self.softmax_cross_entropy(self.forward(X, True), y)
        self.backward(dY)
        self.sgd(lr)
        return loss


class Floor:
    """Only the matrix products a training step needs, into preallocated outputs.

    Forward: one GEMM per dense layer. Backward: dW = X.T @ dY for each, and
    dX = dY @ W.T for each but the first (the input needs no gradient).
    """

    def __init__(self, sizes: list[int], batch: int, dtype: Any, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.W = [
            rng.standard_normal((a, b)).astype(dtype) * 0.05
            for a, b in zip(sizes[:-1], sizes[1:], strict=False)
        ]
        self.X = rng.standard_normal((batch, sizes[0])).astype(dtype)
        self.acts = [np.empty((batch, b), dtype=dtype) for b in sizes[1:]]
        self.dacts = [np.empty((batch, b), dtype=dtype) for b in sizes[1:]]
        for d in self.dacts:
            d[...] = rng.standard_normal(d.shape) * 0.01
        self.dW = [np.empty_like(w) for w in self.W]

    def infer(self) -> None:
        h = self.X
        for W, a in zip(self.W, self.acts, strict=False):
            np.matmul(h, W, out=a)
            h = a

    def step(self) -> None:
        self.infer()
        ins = [self.X, *self.acts[:-1]]
        for j in range(len(self.W) - 1, -1, -1):
            np.matmul(ins[j].T, self.dacts[j], out=self.dW[j])
            if j > 0:
                np.matmul(self.dacts[j], self.W[j].T, out=self.dacts[j - 1])


def floor_step(fl: Floor) -> None:
    fl.step()


def floor_infer(fl: Floor) -> None:
    fl.infer()
