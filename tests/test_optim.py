"""Optimizers against torch.optim and against plain numpy references written here."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from nnrt.dense import Dense
from nnrt.optim import SGD, Adam, AdamW, Optimizer

STEPS = 6
SHAPES = {"weight": (4, 3), "bias": (3,), "gamma": (5,)}


class FakeNet:
    """The minimum an optimizer needs: live params() and grads() dicts."""

    def __init__(self, dtype=np.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.p = {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}
        self.g = {k: np.zeros(s, dtype=dtype) for k, s in SHAPES.items()}

    def params(self):
        return self.p

    def grads(self):
        return self.g


def grad_sequence(seed=1, steps=STEPS):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) for k, s in SHAPES.items()} for _ in range(steps)]


# --------------------------------------------------------- numpy references
def ref_sgd(p, grads, lr, momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0):
    p = {k: v.astype(np.float64).copy() for k, v in p.items()}
    buf: dict[str, np.ndarray] = {}
    for g_step in grads:
        for k in p:
            d = g_step[k] + weight_decay * p[k]
            if momentum:
                if k not in buf:
                    buf[k] = d.copy()
                else:
                    buf[k] = momentum * buf[k] + (1 - dampening) * d
                d = d + momentum * buf[k] if nesterov else buf[k]
            p[k] = p[k] - lr * d
    return p


def ref_adam(p, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    b1, b2 = betas
    p = {k: v.astype(np.float64).copy() for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g_step in enumerate(grads, start=1):
        for k in p:
            g = g_step[k]
            if decoupled:
                p[k] = p[k] * (1 - lr * weight_decay)
            else:
                g = g + weight_decay * p[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat = m[k] / (1 - b1**t)
            v_hat = v[k] / (1 - b2**t)
            p[k] = p[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


CONFIGS = [
    ("sgd", SGD, dict(lr=0.1)),
    ("sgd_momentum", SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd_nesterov", SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd_wd", SGD, dict(lr=0.1, weight_decay=0.01)),
    (
        "sgd_momentum_wd_dampening",
        SGD,
        dict(lr=0.05, momentum=0.8, weight_decay=0.1, dampening=0.3),
    ),
    ("sgd_nesterov_wd", SGD, dict(lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.05)),
    ("adam", Adam, dict()),
    ("adam_lr", Adam, dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6)),
    ("adam_wd", Adam, dict(lr=0.01, weight_decay=0.1)),
    ("adam_beta1_low", Adam, dict(lr=0.01, betas=(0.3, 0.9))),
    ("adamw", AdamW, dict()),
    ("adamw_wd", AdamW, dict(lr=0.05, weight_decay=0.2, betas=(0.7, 0.95))),
]
IDS = [c[0] for c in CONFIGS]


def run_nnrt(cls, kwargs, dtype=np.float64, steps=STEPS):
    net = FakeNet(dtype)
    start = {k: v.copy() for k, v in net.p.items()}
    opt = cls(net, **kwargs)
    for g_step in grad_sequence(steps=steps):
        for k, g in g_step.items():
            np.copyto(net.g[k], g, casting="same_kind")
        opt.step()
    return start, net, opt


def run_reference(cls, kwargs, start):
    if cls is SGD:
        return ref_sgd(start, grad_sequence(), **kwargs)
    return ref_adam(
        start,
        grad_sequence(),
        decoupled=cls is AdamW,
        **{"weight_decay": 1e-2 if cls is AdamW else 0.0, **kwargs},
    )


@pytest.mark.parametrize(("label", "cls", "kwargs"), CONFIGS, ids=IDS)
def test_matches_numpy_reference(label, cls, kwargs):
    start, net, _ = run_nnrt(cls, kwargs)
    want = run_reference(cls, kwargs, start)
    for k in SHAPES:
        np.testing.assert_allclose(net.p[k], want[k], rtol=1e-12, atol=1e-15)
        assert not np.allclose(net.p[k], start[k])  # the params did move


@pytest.mark.parametrize(("label", "cls", "kwargs"), CONFIGS, ids=IDS)
def test_matches_torch(label, cls, kwargs):
    torch = pytest.importorskip("torch")
    torch_cls = {SGD: torch.optim.SGD, Adam: torch.optim.Adam, AdamW: torch.optim.AdamW}[cls]
    start, net, _ = run_nnrt(cls, kwargs)
    tparams = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in start.items()
    }
    topt = torch_cls(list(tparams.values()), **kwargs)
    for g_step in grad_sequence():
        for k, t in tparams.items():
            t.grad = torch.from_numpy(g_step[k].copy())
        topt.step()
    for k, t in tparams.items():
        np.testing.assert_allclose(net.p[k], t.detach().numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("label", "cls", "kwargs"), CONFIGS, ids=IDS)
def test_float32_state_and_values(label, cls, kwargs):
    start64, net64, _ = run_nnrt(cls, kwargs, np.float64)
    _, net32, opt = run_nnrt(cls, kwargs, np.float32)
    for k in SHAPES:
        assert net32.p[k].dtype == np.float32
        np.testing.assert_allclose(net32.p[k], net64.p[k], rtol=1e-4, atol=1e-5)
    for per_param in opt.state.values():
        for arr in per_param.values():
            assert arr.dtype == np.float32


@pytest.mark.parametrize(("label", "cls", "kwargs"), CONFIGS, ids=IDS)
def test_updates_in_place_and_leaves_grads(label, cls, kwargs):
    net = FakeNet()
    ids = {k: id(v) for k, v in net.p.items()}
    opt = cls(net, **kwargs)
    for g_step in grad_sequence(steps=2):
        for k, g in g_step.items():
            net.g[k][...] = g
        opt.step()
        for k, g in g_step.items():
            np.testing.assert_array_equal(net.g[k], g)  # step never writes the gradient
    assert {k: id(v) for k, v in net.p.items()} == ids
    assert opt.step_count == 2


@pytest.mark.parametrize(("label", "cls", "kwargs"), CONFIGS, ids=IDS)
def test_no_parameter_sized_allocation_after_first_step(label, cls, kwargs):
    class BigNet:
        def __init__(self):
            self.w = np.ones((400, 250))  # 800 kB
            self.dw = np.full((400, 250), 0.5)

        def params(self):
            return {"w": self.w}

        def grads(self):
            return {"w": self.dw}

    net = BigNet()
    opt = cls(net, **kwargs)
    opt.step()
    opt.step()
    tracemalloc.start()
    try:
        for _ in range(3):
            opt.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < net.w.nbytes // 4, f"step allocated {peak} bytes"


def test_first_step_allocates_state():
    # the check above is able to see allocations: a first step allocates state
    net = FakeNet()
    opt = Adam(net)
    tracemalloc.start()
    try:
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak >= 2 * net.p["weight"].nbytes


def test_sgd_momentum_buffer_starts_at_gradient():
    net = FakeNet()
    w0 = net.p["weight"].copy()
    net.g["weight"][...] = 1.0
    opt = SGD(net, lr=0.1, momentum=0.9)
    opt.step()
    # torch: first buffer = gradient (not (1 - dampening) * g, not 0.9 * 0 + g ...)
    np.testing.assert_allclose(opt.state["weight"]["momentum_buffer"], 1.0)
    np.testing.assert_allclose(net.p["weight"], w0 - 0.1)
    opt.step()
    np.testing.assert_allclose(opt.state["weight"]["momentum_buffer"], 1.9)
    np.testing.assert_allclose(net.p["weight"], w0 - 0.1 - 0.19)


def test_adam_first_step_is_lr_times_sign():
    # bias correction makes the first Adam step lr * g / (|g| + eps') = +-lr
    net = FakeNet()
    w0 = net.p["weight"].copy()
    g = np.random.default_rng(3).standard_normal(SHAPES["weight"])
    net.g["weight"][...] = g
    Adam(net, lr=0.01).step()
    np.testing.assert_allclose(net.p["weight"], w0 - 0.01 * np.sign(g), rtol=1e-6)


def test_zero_grad_fills_in_place():
    net = FakeNet()
    for g in net.g.values():
        g[...] = 3.0
    ids = {k: id(v) for k, v in net.g.items()}
    SGD(net, lr=0.1).zero_grad()
    assert all(not g.any() for g in net.g.values())
    assert {k: id(v) for k, v in net.g.items()} == ids


def test_lr_can_be_changed_between_steps():
    net = FakeNet()
    w0 = net.p["bias"].copy()
    net.g["bias"][...] = 1.0
    opt = SGD(net, lr=0.1)
    opt.lr = 0.5
    opt.step()
    np.testing.assert_allclose(net.p["bias"], w0 - 0.5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cls", [SGD, Adam, AdamW])
def test_trains_a_dense_layer(cls, dtype):
    layer = Dense(3, 2).to_dtype(dtype)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 3))
    W_true = rng.standard_normal((3, 2))
    Y = X @ W_true + 0.5
    W = layer.params()["weight"]
    opt = cls(layer, lr=0.05) if cls is SGD else cls(layer, lr=0.05, weight_decay=0.0)
    for _ in range(400):
        out = layer.forward(X, training=True)
        layer.backward(2 * (out - Y) / Y.size)
        opt.step()
    assert layer.params()["weight"] is W and W.dtype == np.dtype(dtype)
    np.testing.assert_allclose(W, W_true, atol=0.05)
    np.testing.assert_allclose(layer.params()["bias"], 0.5, atol=0.05)


# ------------------------------------------------------------- state dicts
@pytest.mark.parametrize(("label", "cls", "kwargs"), CONFIGS, ids=IDS)
def test_state_dict_round_trip_resumes_exactly(label, cls, kwargs):
    grads = grad_sequence(steps=5)
    net_a = FakeNet()
    opt_a = cls(net_a, **kwargs)

    def run(net, opt, seq):
        for g_step in seq:
            for k, g in g_step.items():
                net.g[k][...] = g
            opt.step()

    run(net_a, opt_a, grads[:3])
    sd = opt_a.state_dict()
    assert sd["step"] == 3 and sd["type"] == cls.__name__
    net_b = FakeNet(seed=99)
    for k, v in net_a.p.items():
        net_b.p[k][...] = v
    opt_b = cls(net_b, lr=123.0) if cls is SGD else cls(net_b)
    opt_b.load_state_dict(sd)
    assert opt_b.hyperparams() == opt_a.hyperparams()
    # state_dict holds copies: changing it does not touch the live optimizer
    for per_param in sd["state"].values():
        for arr in per_param.values():
            arr[...] = 1e6
    run(net_a, opt_a, grads[3:])
    run(net_b, opt_b, grads[3:])
    for k in SHAPES:
        np.testing.assert_array_equal(net_a.p[k], net_b.p[k])


def test_load_state_dict_validation():
    net = FakeNet()
    opt = SGD(net, lr=0.1, momentum=0.9)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="Adam"):
        opt.load_state_dict({**Adam(FakeNet()).state_dict()})
    bad = {**sd, "state": {"weight": {"momentum_buffer": np.zeros((2, 2))}}}
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(4, 3\)"):
        opt.load_state_dict(bad)
    with pytest.raises(KeyError, match="nope"):
        opt.load_state_dict({**sd, "state": {"nope": {}}})
    with pytest.raises(KeyError, match="exp_avg"):
        opt.load_state_dict({**sd, "state": {"weight": {"exp_avg": np.zeros((4, 3))}}})
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict({**sd, "hyperparams": {**sd["hyperparams"], "lr": -1.0}})


# --------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (SGD, dict(lr=-0.1), "lr"),
        (SGD, dict(lr=float("nan")), "lr"),
        (SGD, dict(lr=0.1, momentum=-0.5), "momentum"),
        (SGD, dict(lr=0.1, weight_decay=-1e-3), "weight_decay"),
        (SGD, dict(lr=0.1, nesterov=True), "nesterov"),
        (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, dampening=0.1), "dampening"),
        (Adam, dict(lr=-1e-3), "lr"),
        (Adam, dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (Adam, dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (Adam, dict(eps=-1e-8), "eps"),
        (Adam, dict(weight_decay=-0.1), "weight_decay"),
        (AdamW, dict(weight_decay=-0.1), "weight_decay"),
        (AdamW, dict(lr=float("inf")), "lr"),
    ],
)
def test_invalid_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(FakeNet(), **kwargs)


def test_type_errors():
    with pytest.raises(TypeError):
        SGD(FakeNet())  # lr has no default
    with pytest.raises(TypeError, match="lr"):
        SGD(FakeNet(), lr="0.1")
    with pytest.raises(TypeError, match="betas"):
        Adam(FakeNet(), betas=0.9)
    with pytest.raises(TypeError, match="params"):
        Adam(object())


def test_net_validation():
    net = FakeNet()
    net.g = {"weight": net.g["weight"]}
    with pytest.raises(ValueError, match="keys differ"):
        SGD(net, lr=0.1)
    net = FakeNet()
    net.g["bias"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"'bias'.*\(3,\).*\(4,\)"):
        Adam(net)
    net = FakeNet()
    net.p, net.g = {}, {}
    with pytest.raises(ValueError, match="no parameters"):
        Adam(net)


def test_optimizer_base_is_exported():
    assert issubclass(SGD, Optimizer) and issubclass(Adam, Optimizer)
    assert issubclass(AdamW, Optimizer)
    assert "lr=0.1" in repr(SGD(FakeNet(), lr=0.1))


class ManyNet:
    """``n`` parameters of ``size`` elements each (the update kernel batches its jobs
    on the stack up to 16 and releases the GIL above 65,536 elements in all)."""

    def __init__(self, n, size, dtype=np.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.p = {f"p{i}": rng.standard_normal(size).astype(dtype) for i in range(n)}
        self.g = {f"p{i}": rng.standard_normal(size).astype(dtype) for i in range(n)}

    def params(self):
        return self.p

    def grads(self):
        return self.g


@pytest.mark.parametrize(("n", "size"), [(1, 5), (17, 3), (20, 4000), (3, 70000)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_over_many_or_large_parameters_matches_numpy(n, size, momentum):
    net = ManyNet(n, size)
    start = {k: v.copy() for k, v in net.p.items()}
    opt = SGD(net, lr=0.1, momentum=momentum, weight_decay=0.01)
    buf = {}
    want = {k: v.copy() for k, v in start.items()}
    for _ in range(3):
        opt.step()
        for k in want:
            d = net.g[k] + 0.01 * want[k]
            buf[k] = d.copy() if k not in buf else momentum * buf[k] + d
            want[k] = want[k] - 0.1 * (buf[k] if momentum else d)
    for k in want:
        np.testing.assert_allclose(net.p[k], want[k], rtol=1e-12, atol=1e-15)
