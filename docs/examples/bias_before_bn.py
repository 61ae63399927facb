"""A bias right before BatchNorm: nnrt's exact gradient keeps it fixed, a naive one lets it grow.

For ``x = u + b`` (``u = X @ W``, ``b`` the dense layer's bias) BatchNorm computes
``x - mean(x) = u - mean(u)``: the bias cancels. Its exact gradient (through
the batch mean, which depends on ``b``) is therefore zero, and nnrt's
BatchNorm backward, which includes that dependence, gives ``db ~ 1e-17``.

A "naive" gradient that treats the batch statistics as constants (Ioffe &
Szegedy 2015, section 2) gives ``db = sum_n dxhat_n / sqrt(var + eps)`` -- not
zero. Applying it changes ``b`` but not the output (the shift cancels), so the
next step sees the same loss and the same naive gradient again: ``b`` drifts
linearly, without bound, while the loss follows the exact run step for step.

This script runs the same gradient descent twice (identical seeds and data):
once with nnrt's gradient of the bias, once with the naive one. By default
only that bias is updated (the paper's thought experiment): the exact run
never moves it, the naive run moves it by the same amount every step while
the loss stays exactly where it was. With ``--train-all`` every parameter is
trained with SGD; the naive bias still drifts step after step (more slowly as
BatchNorm's beta converges: the naive gradient equals ``gamma / sqrt(var +
eps) * dbeta``), and both runs have the same losses.
It prints the bias drift ``max |b_t - b_0|`` and the loss per step, and saves
a plot when matplotlib is installed.

    python docs/examples/bias_before_bn.py [--steps 40] [--train-all]
                                           [--plot out.png | --no-plot] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

import numpy as np

import nnrt


def build(seed: int) -> nnrt.Sequential:
    # dense (with bias) right before batchnorm is exactly what
    # nnrt.BiasBeforeBatchNormWarning warns about; here it is the point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnrt.BiasBeforeBatchNormWarning)
        return nnrt.Sequential(
            [
                nnrt.layer("dense", 6, 8),
                nnrt.layer("batchnorm", 8),
                nnrt.layer("sigmoid"),
                nnrt.layer("dense", 8, 3),
            ],
            seed=seed,
            dtype="float64",
        )


def train(
    naive: bool, steps: int, lr: float, train_all: bool = False, seed: int = 0
) -> dict[str, list[float]]:
    """Gradient descent on a fixed batch; with ``naive`` the first bias gets the naive
    gradient. Updates only that bias unless ``train_all`` (then SGD on everything)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(32, 6))
    y = rng.integers(0, 3, size=32)
    net = build(seed)
    dense, bn = net[0], net[1]
    eps = bn.config()["eps"]
    opt = nnrt.optim.SGD(net, lr=lr)
    b0 = dense.params()["bias"].copy()
    drift, losses, grad_norm = [0.0], [], []
    for _ in range(steps):
        # the forward/backward loop of Sequential, spelled out to keep two intermediates
        h = dense.forward(X, training=True).copy()  # x = u + b, the BatchNorm input
        out = h
        for layer in net.layers[1:]:
            out = layer.forward(out, training=True)
        loss, g = nnrt.losses.softmax_cross_entropy(out, y)
        for layer in reversed(net.layers[2:]):
            g = layer.backward(g)
        g_bn = g.copy()  # dL/d(BatchNorm output)
        dense.backward(bn.backward(g))
        db = dense.grads()["bias"]
        if naive:
            # batch mean and variance treated as constants:
            # dL/dx = dL/dxhat / sqrt(var + eps), with dL/dxhat = g * gamma
            dxhat = g_bn * bn.params()["gamma"]
            db[:] = (dxhat / np.sqrt(h.var(axis=0) + eps)).sum(axis=0)
        grad_norm.append(float(np.abs(db).max()))
        if train_all:
            opt.step()
        else:
            dense.params()["bias"][:] -= lr * db
        losses.append(loss)
        drift.append(float(np.abs(dense.params()["bias"] - b0).max()))
    return {"drift": drift, "loss": losses, "bias_grad": grad_norm}


def plot(
    exact: dict[str, list[float]], naive: dict[str, list[float]], path: str, train_all: bool
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = np.arange(len(exact["drift"]))
    ax1.plot(steps, naive["drift"], "o-", ms=3, label="naive gradient (batch stats constant)")
    ax1.plot(steps, exact["drift"], "s-", ms=3, label="nnrt (full BatchNorm backward)")
    ax1.set_xlabel("SGD step")
    ax1.set_ylabel("max |b_t - b_0| of the bias before BatchNorm")
    ax1.legend()
    ax2.plot(steps[1:], naive["loss"], "o-", ms=3, label="naive")
    ax2.plot(steps[1:], exact["loss"], "--", label="nnrt")
    ax2.set_xlabel("SGD step")
    ax2.set_ylabel("training loss")
    ax1.set_title("bias before BatchNorm" + (" (all parameters trained)" if train_all else ""))
    ax2.set_title("same loss: the bias has no effect")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--train-all", action="store_true", help="SGD on every parameter")
    parser.add_argument("--plot", default="bias_before_bn.png", help="where to save the plot")
    parser.add_argument("--no-plot", action="store_true", help="do not plot")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    exact = train(naive=False, steps=args.steps, lr=args.lr, train_all=args.train_all)
    naive = train(naive=True, steps=args.steps, lr=args.lr, train_all=args.train_all)
    result: dict[str, Any] = {
        "steps": args.steps,
        "lr": args.lr,
        "train_all": args.train_all,
        "exact": exact,
        "naive": naive,
    }
    if not args.no_plot and plot(exact, naive, args.plot, args.train_all):
        result["plot"] = args.plot
        print(f"plot saved to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{'step':>4}  {'nnrt |b-b0|':>12}  {'naive |b-b0|':>12}  {'nnrt loss':>10}  naive loss"
        )
        for t in range(0, args.steps + 1, max(1, args.steps // 10)):
            loss_e = exact["loss"][t - 1] if t else float("nan")
            loss_n = naive["loss"][t - 1] if t else float("nan")
            print(
                f"{t:4d}  {exact['drift'][t]:12.3g}  {naive['drift'][t]:12.3g}  "
                f"{loss_e:10.6f}  {loss_n:.6f}"
            )
        print(
            f"after {args.steps} steps: nnrt's bias moved {exact['drift'][-1]:.2g} "
            f"(its gradient is at most {max(exact['bias_grad']):.2g}); the naive bias moved "
            f"{naive['drift'][-1]:.3g} and keeps growing; losses agree to "
            f"{max(abs(a - b) for a, b in zip(exact['loss'], naive['loss'], strict=True)):.2g}"
        )
        if not args.train_all:
            print(
                f"(only the bias is updated: the loss stays at {exact['loss'][0]:.6f} in both "
                f"runs, the naive bias grows by the same step every time, without bound)"
            )
    return result


if __name__ == "__main__":
    main()
