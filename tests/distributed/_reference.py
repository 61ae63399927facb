"""Float64 numpy reference for the MPI equality tests (textbook formulas, no nnrt).

The model is [dense_nobias -> batchnorm -> sigmoid -> dense], softmax
cross-entropy (mean over the batch), SGD with momentum as torch's. ``groups``
sets how BatchNorm sees each global batch: ``groups=1`` normalises it as a
whole (single process, or SyncBatchNorm on any number of ranks); ``groups=k``
splits it like ``np.array_split(batch, k)`` and normalises each part with its
own statistics (plain BatchNorm on k ranks), averaging the k updated running
statistics. The loss is always the mean over the whole global batch.
"""

from __future__ import annotations

import numpy as np


def batches(n: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """The documented order: one default_rng(seed), a permutation per epoch."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(epochs):
        order = rng.permutation(n)
        out += [order[s : s + batch_size] for s in range(0, n, batch_size)]
    return out


def _bn_forward(h, gamma, beta, eps):
    mean = h.mean(axis=0)
    var = ((h - mean) ** 2).mean(axis=0)
    xhat = (h - mean) / np.sqrt(var + eps)
    return gamma * xhat + beta, (xhat, var, mean)


def _bn_backward(dy, gamma, cache, eps):
    xhat, var, _ = cache
    n = dy.shape[0]
    dbeta = dy.sum(axis=0)
    dgamma = (dy * xhat).sum(axis=0)
    dx = gamma / (n * np.sqrt(var + eps)) * (n * dy - dbeta - xhat * dgamma)
    return dx, dgamma, dbeta


def train(state, X, y, order, *, groups=1, lr=0.1, momentum=0.9, bn_momentum=0.1, eps=1e-5):
    """Train a copy of ``state`` (nnrt state_dict keys) on the batches ``order``."""
    s = {k: np.array(v, dtype=np.float64) for k, v in state.items()}
    W1, g, b, W2, b2 = s["0.weight"], s["1.gamma"], s["1.beta"], s["3.weight"], s["3.bias"]
    rm, rv = s["1.running_mean"], s["1.running_var"]
    params = [W1, g, b, W2, b2]
    bufs = [np.zeros_like(p) for p in params]
    losses = []
    for idx in order:
        x = X[idx].astype(np.float64)
        N = len(idx)
        h = x @ W1
        parts = np.array_split(np.arange(N), groups)
        z = np.empty_like(h)
        caches = []
        new_rm = np.zeros_like(rm)
        new_rv = np.zeros_like(rv)
        for p in parts:
            z[p], cache = _bn_forward(h[p], g, b, eps)
            caches.append(cache)
            xhat, var, mean = cache
            new_rm += ((1 - bn_momentum) * rm + bn_momentum * mean) / groups
            new_rv += ((1 - bn_momentum) * rv + bn_momentum * var * len(p) / (len(p) - 1)) / groups
        rm[...] = new_rm
        rv[...] = new_rv
        a = 1.0 / (1.0 + np.exp(-z))
        logits = a @ W2 + b2
        logits_shift = logits - logits.max(axis=1, keepdims=True)
        logp = logits_shift - np.log(np.exp(logits_shift).sum(axis=1, keepdims=True))
        losses.append(-logp[np.arange(N), y[idx]].mean())
        dlogits = np.exp(logp)
        dlogits[np.arange(N), y[idx]] -= 1
        dlogits /= N
        dW2 = a.T @ dlogits
        db2 = dlogits.sum(axis=0)
        dz = (dlogits @ W2.T) * a * (1 - a)
        dh = np.empty_like(dz)
        dg = np.zeros_like(g)
        db = np.zeros_like(b)
        for p, cache in zip(parts, caches, strict=True):
            dh[p], dgp, dbp = _bn_backward(dz[p], g, cache, eps)
            dg += dgp
            db += dbp
        dW1 = x.T @ dh
        for p, buf, grad in zip(params, bufs, [dW1, dg, db, dW2, db2], strict=True):
            buf *= momentum
            buf += grad
            p -= lr * buf
    return s, losses
