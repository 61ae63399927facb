"""Optimizers: SGD, Adam, AdamW with torch's update rules.

An optimizer takes anything with ``params()`` and ``grads()`` returning dicts of
live ndarrays with matching keys (a ``Sequential`` or a single ``Layer``) and
resolves that list once, at construction. ``step()`` reads the gradients the
last ``backward`` wrote (``backward`` overwrites them, so ``zero_grad`` is never
needed first) and updates every parameter in place, so arrays keep their
identity.

NOTE: because the arrays are resolved once, rebuilding the network or casting
it (``Sequential(dtype=...)``, ``layer.to_dtype(...)``, which replace the
arrays) or changing ``net.layers`` after creating an optimizer would leave the
optimizer updating the old arrays (training silently doing nothing): ``step``
checks, one identity test per parameter, that its arrays are still the live
ones and raises RuntimeError otherwise; create a new optimizer after such a
change.

Steps allocate nothing parameter-sized after the first one: state (momentum,
moments) and scratch buffers are allocated lazily, in each parameter's dtype,
and every later update runs numpy ufuncs with ``out=``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from nnrt import _locks
from nnrt._kernels import adam_step as _adam_kernel
from nnrt._kernels import params_held as _params_held
from nnrt._kernels import same_items as _same_items
from nnrt._kernels import sgd_step as _sgd_kernel

__all__ = ["SGD", "Adam", "AdamW", "Optimizer"]


class HasParams(Protocol):
    """What an optimizer needs from a network: live parameter and gradient arrays."""

    def params(self) -> Mapping[str, np.ndarray]: ...

    def grads(self) -> Mapping[str, np.ndarray]: ...


def _check_real(name: str, value: Any, owner: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{owner}: {name} must not be NaN")
    return value


def _check_nonneg(name: str, value: Any, owner: str) -> float:
    v = _check_real(name, value, owner)
    if not v >= 0.0 or math.isinf(v):
        raise ValueError(f"{owner}: invalid {name} {value!r}: must be finite and >= 0")
    return v


def _check_beta(name: str, value: Any, owner: str) -> float:
    v = _check_real(name, value, owner)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{owner}: invalid {name} {value!r}: must be in [0, 1)")
    return v


def _resolve(net: HasParams, owner: str) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    try:
        params = net.params()
        grads = net.grads()
    except AttributeError as exc:
        raise TypeError(
            f"{owner}: expected a network or layer with params() and grads(), "
            f"got {type(net).__name__}"
        ) from exc
    if set(params) != set(grads):
        raise ValueError(
            f"{owner}: params() and grads() keys differ: {sorted(params)} vs {sorted(grads)}"
        )
    if not params:
        raise ValueError(f"{owner}: {type(net).__name__} has no parameters to optimize")
    names = list(params)
    ps = [params[k] for k in names]
    gs = [grads[k] for k in names]
    for k, p, g in zip(names, ps, gs, strict=True):
        if not isinstance(p, np.ndarray) or not isinstance(g, np.ndarray):
            raise TypeError(f"{owner}: parameter {k!r} and its gradient must be numpy arrays")
        if p.dtype.kind != "f" or p.dtype != g.dtype or p.shape != g.shape:
            raise ValueError(
                f"{owner}: parameter {k!r} (shape {p.shape} dtype {p.dtype}) and its "
                f"gradient (shape {g.shape} dtype {g.dtype}) must be float arrays of the "
                f"same shape and dtype"
            )
        if not p.flags.writeable:
            raise ValueError(f"{owner}: parameter {k!r} is read-only")
    return names, ps, gs


def _binding(net: Any) -> tuple[Any, list[Any], list[tuple[Any, tuple[np.ndarray, ...]]]] | None:
    """What ``step`` checks is still live: the layer list of a network, and each
    layer with parameters (or the object itself) with the arrays its ``params()`` gave."""
    layers = getattr(net, "layers", None)
    is_net = isinstance(layers, list)
    parts = list(layers) if isinstance(layers, list) else [net]
    try:
        held = [(part, tuple(part.params().values())) for part in parts]
    except Exception:
        return None  # the network's own checks report it (forward, backward)
    return (net if is_net else None), parts, [(p, a) for p, a in held if a]


def _address(a: Any) -> tuple[int, tuple[int, ...], Any] | None:
    """Where an array's elements are: (data pointer, shape, dtype), or None."""
    if not isinstance(a, np.ndarray):
        return None
    return (a.__array_interface__["data"][0], a.shape, a.dtype)


def _same_memory(a: Any, b: Any) -> bool:
    """The same elements: a plugin's ``params()`` may hand out a new view each call."""
    where = _address(a)
    return where is not None and where == _address(b)


def _stale(opt: Optimizer) -> str | None:
    """Why ``opt``'s arrays are no longer the live parameters of its network, or None.

    About 0.2 us per layer: one ``params()`` call and an identity test per array.
    """
    bound = opt.__dict__.get("_bound")
    if bound is None:
        return None
    net, parts, held = bound
    if net is not None:
        layers = net.layers
        if type(layers) is not list or not _same_items(parts, layers):
            return "net.layers no longer holds the layers it was built for"
    if _params_held(held):  # the common case, in C
        return None
    for part, arrays in held:
        live = part.params()
        if len(live) == len(arrays):
            j = 0
            for a in live.values():
                if a is not arrays[j] and not _same_memory(a, arrays[j]):
                    break
                j += 1
            else:
                continue
        where = f"layer {parts.index(part)} {part!r:.80}" if net is not None else f"{part!r:.80}"
        return (
            f"the parameters of {where} were replaced (layer.to_dtype, or a network built "
            f"again over the same layers, casts them)"
        )
    return None


def check_trains(opt: Any, net: Any, where: str) -> None:
    """RuntimeError unless ``opt`` (an nnrt optimizer) updates live parameters of ``net``.

    ``fit`` calls it before its first batch: an optimizer built for another network,
    or over arrays replaced since (``_stale``), would run every epoch and leave the
    network untrained. An optimizer over a part of the network (one layer) is fine.
    """
    if not isinstance(opt, Optimizer):
        return
    params = opt.__dict__.get("_params")
    if not params:
        return
    why = _stale(opt)
    bound = opt.__dict__.get("_bound")
    if why is None and not (bound is not None and bound[0] is net):
        # (an optimizer built over this network and not stale updates its live arrays)
        arrays = list(net.params().values())
        ids = {id(a) for a in arrays}
        # the same objects (the common case), else the same memory (a plugin's new views)
        if not any(id(p) in ids for p in params) and not (
            {_address(a) for a in arrays} & {_address(p) for p in params}
        ):
            why = (
                "it updates none of this network's parameters (it was built for another "
                "network or layer)"
            )
    if why is not None:
        raise RuntimeError(
            f"{where}: {type(opt).__name__}: {why}; it would leave the network untrained: "
            f"create a new optimizer over this network"
        )


def _kernel_problem(opt: Optimizer) -> str | None:
    """Why the update kernels cannot take ``opt``'s parameters/gradients, or None."""
    for name, p, g in zip(opt._names, opt._params, opt._grads, strict=True):
        if not (p.flags.c_contiguous and p.flags.aligned and p.flags.writeable):
            return f"parameter {name!r} must be a C-contiguous, aligned, writeable array"
        if not (g.flags.c_contiguous and g.flags.aligned):
            return f"the gradient of {name!r} must be a C-contiguous, aligned array"
        if p.dtype not in (np.float32, np.float64) or g.dtype != p.dtype or g.size != p.size:
            return (
                f"parameter {name!r} ({p.dtype}, {p.size} elements) and its gradient "
                f"({g.dtype}, {g.size} elements) must be float32/float64 of one dtype and size"
            )
    return None


def _not_plain(opt: Optimizer) -> ValueError:
    """The error for arrays the update kernel refused (checked again at every step)."""
    why = _kernel_problem(opt) or "its state arrays no longer match the parameters"
    return ValueError(f"{type(opt).__name__}: cannot update in place: {why}")


def _check_live(opt: Any) -> None:
    """RuntimeError when ``opt``'s arrays are no longer its network's live parameters."""
    if opt.__dict__.get("_bound") is not None:
        why = _stale(opt)
        if why is not None:
            raise RuntimeError(
                f"{type(opt).__name__}.step: {why}: this optimizer would update the old "
                f"arrays and leave the network untrained; create a new optimizer"
            )


def held_step(opt: Any, net: Any) -> Any:
    """``opt.step`` for a caller that already holds ``net``'s state lock (the training
    engine, for each step), or None when ``opt`` is not an nnrt optimizer of ``net``.

    The same update and the same check that the arrays are still the live
    parameters, without the lock taken again (a Python frame and ~0.3 us of a 23 us
    tiny step).
    """
    if not isinstance(opt, Optimizer) or opt.__dict__.get("_lock_net") is not net:
        return None
    raw = getattr(type(opt).step, "__wrapped__", None)
    if raw is None:
        return None

    def step() -> None:
        _check_live(opt)
        raw(opt)

    return step


def _locked_step(step: Any) -> Any:
    """``step`` run under the state lock of the optimizer's network (if it has one)."""

    @functools.wraps(step)
    def locked(self: Any) -> None:
        d = self.__dict__
        _check_live(self)
        net = d.get("_lock_net")
        if net is None:
            step(self)
            return
        # NOTE: the lock object is cached per fork generation (a weak-dictionary lookup
        # per step cost ~1 us, a third of a small SGD step); a forked child refetches.
        cached = d.get("_lock_cache")
        if cached is None or cached[0] != _locks.generation:
            cached = d["_lock_cache"] = (_locks.generation, _locks.state_lock(net))
        with cached[1]:
            step(self)

    return locked


class Optimizer:
    """Base class: holds the resolved parameters, their gradients and per-parameter state.

    Subclasses define ``_state_keys`` (the names of their per-parameter state
    arrays), ``hyperparams()``, ``_set_hyperparams(**hp)`` (validating) and
    ``_update(i, p, g)``.
    """

    _state_keys: tuple[str, ...] = ()

    def __init__(self, net: HasParams) -> None:
        self._names, self._params, self._grads = _resolve(net, type(self).__name__)
        # a network's optimizer steps under the network's state lock (nnrt/_locks.py):
        # a predict or save in another thread sees the weights before or after a step
        self._lock_net: Any = net if hasattr(net, "layers") else None
        # checked by every step: the arrays above are still the live parameters
        self._bound = _binding(net)
        n = len(self._params)
        # per-parameter state arrays (allocated at the first step) and scratch buffers
        self.state: dict[str, dict[str, np.ndarray]] = {k: {} for k in self._names}
        self._scratch: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.step_count = 0

    # ----------------------------------------------------------------- public
    def step(self) -> None:
        """Apply one update to every parameter, in place, from the current gradients."""
        self.step_count += 1
        for i in range(len(self._params)):
            self._update(i, self._params[i], self._grads[i])

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:  # every optimizer's own step takes the lock too
            cls.step = _locked_step(cls.__dict__["step"])  # type: ignore[method-assign]

    def __getstate__(self) -> dict[str, Any]:
        # the network is not part of an optimizer's pickle (its arrays are)
        state = dict(self.__dict__)
        state["_lock_net"] = None
        state.pop("_lock_cache", None)
        state["_bound"] = None  # the arrays travel, not the network's layers
        return state

    def zero_grad(self) -> None:
        """Fill every gradient with zeros, in place."""
        for g in self._grads:
            g.fill(0)

    def hyperparams(self) -> dict[str, Any]:
        """The hyper-parameters, as constructor keyword arguments."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Copies of the optimizer state: type, hyper-parameters, step count, state arrays."""
        return {
            "type": type(self).__name__,
            "hyperparams": self.hyperparams(),
            "step": self.step_count,
            "state": {k: {s: a.copy() for s, a in st.items()} for k, st in self.state.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load what ``state_dict()`` returned (from an optimizer over the same parameters).

        Checks the optimizer type, parameter names, state names and shapes, and
        casts the arrays to each parameter's dtype.
        """
        owner = type(self).__name__
        kind = state_dict.get("type", owner)
        if kind != owner:
            raise ValueError(f"{owner}.load_state_dict: got the state of a {kind} optimizer")
        state = state_dict.get("state", {})
        unknown = set(state) - set(self.state)
        if unknown:
            raise KeyError(f"{owner}.load_state_dict: unknown parameters {sorted(unknown)}")
        new_state: dict[str, dict[str, np.ndarray]] = {k: {} for k in self._names}
        for name, p in zip(self._names, self._params, strict=True):
            for key, arr in state.get(name, {}).items():
                if key not in self._state_keys:
                    raise KeyError(
                        f"{owner}.load_state_dict: unknown state {key!r} for {name!r} "
                        f"(expected {list(self._state_keys)})"
                    )
                arr = np.asarray(arr)
                if arr.shape != p.shape:
                    raise ValueError(
                        f"{owner}.load_state_dict: state {key!r} of {name!r} has shape "
                        f"{arr.shape}, the parameter has shape {p.shape}"
                    )
                new_state[name][key] = np.array(arr, dtype=p.dtype, order="C")
        step = state_dict.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"{owner}.load_state_dict: step must be an int >= 0, got {step!r}")
        if "hyperparams" in state_dict:
            self._set_hyperparams(**state_dict["hyperparams"])
        self.state = new_state
        self.step_count = int(step)

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams().items())
        return f"{type(self).__name__}({len(self._params)} params, {hp})"

    # -------------------------------------------------------------- internals
    def _set_hyperparams(self, **hp: Any) -> None:
        raise NotImplementedError

    def _update(self, i: int, p: np.ndarray, g: np.ndarray) -> None:
        raise NotImplementedError

    def _state(self, i: int, key: str, zeros: bool) -> tuple[np.ndarray, bool]:
        """State array ``key`` of parameter ``i`` and whether it was just created."""
        st = self.state[self._names[i]]
        arr = st.get(key)
        if arr is not None:
            return arr, False
        p = self._params[i]
        arr = np.zeros_like(p, order="C") if zeros else np.empty_like(p, order="C")
        st[key] = arr
        return arr, True

    def _buf(self, i: int, j: int) -> np.ndarray:
        """Scratch buffer ``j`` of parameter ``i`` (its shape and dtype), made once."""
        bufs = self._scratch[i]
        while len(bufs) <= j:
            bufs.append(np.empty_like(self._params[i], order="C"))
        return bufs[j]


Optimizer.step = _locked_step(Optimizer.step)  # type: ignore[method-assign]


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    d = g + weight_decay * p
    b = d at the first step, then momentum * b + (1 - dampening) * d
    d = d + momentum * b if nesterov, else b          (when momentum > 0)
    p -= lr * d
    """

    _state_keys = ("momentum_buffer",)

    def __init__(
        self,
        net: HasParams,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        dampening: float = 0.0,
    ) -> None:
        super().__init__(net)
        if _kernel_problem(self) is not None:
            raise _not_plain(self)
        self._set_hyperparams(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            dampening=dampening,
        )

    def _set_hyperparams(self, **hp: Any) -> None:
        owner = type(self).__name__
        lr = _check_nonneg("lr", hp["lr"], owner)
        momentum = _check_nonneg("momentum", hp["momentum"], owner)
        weight_decay = _check_nonneg("weight_decay", hp["weight_decay"], owner)
        dampening = _check_real("dampening", hp["dampening"], owner)
        nesterov = hp["nesterov"]
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"{owner}: nesterov must be a bool, got {nesterov!r}")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(
                f"{owner}: nesterov momentum requires momentum > 0 and dampening = 0, "
                f"got momentum={momentum!r}, dampening={dampening!r}"
            )
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = bool(nesterov)
        self.dampening = dampening

    def hyperparams(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
            "dampening": self.dampening,
        }

    def step(self) -> None:
        """Apply one update to every parameter, in place (one C loop, nnrt/_kernels.pyx)."""
        bufs: list[np.ndarray] | None = None
        fresh: list[bool] | None = None
        if self.momentum != 0.0:
            # NOTE: as torch, a new momentum buffer starts as the first (decayed) gradient,
            # not 0: the kernel copies d into the buffers flagged fresh.
            pairs = [
                self._state(i, "momentum_buffer", zeros=False) for i in range(len(self._params))
            ]
            bufs = [b for b, _ in pairs]
            fresh = [f for _, f in pairs]
        if not _sgd_kernel(
            self._params,
            self._grads,
            bufs,
            self.lr,
            self.momentum,
            self.dampening,
            self.weight_decay,
            self.nesterov,
            fresh,
        ):
            if fresh is not None:  # undo the lazily created buffers
                for name, f in zip(self._names, fresh, strict=True):
                    if f:
                        del self.state[name]["momentum_buffer"]
            raise _not_plain(self)
        self.step_count += 1


class _AdamBase(Optimizer):
    """Adam's moment updates; subclasses choose where the weight decay goes."""

    _state_keys = ("exp_avg", "exp_avg_sq")
    _decoupled = False

    def __init__(
        self,
        net: HasParams,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        super().__init__(net)
        if _kernel_problem(self) is not None:
            raise _not_plain(self)
        self._set_hyperparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _set_hyperparams(self, **hp: Any) -> None:
        owner = type(self).__name__
        lr = _check_nonneg("lr", hp["lr"], owner)
        betas = hp["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
        beta1 = _check_beta("betas[0]", betas[0], owner)
        beta2 = _check_beta("betas[1]", betas[1], owner)
        eps = _check_nonneg("eps", hp["eps"], owner)
        weight_decay = _check_nonneg("weight_decay", hp["weight_decay"], owner)
        self.lr = lr
        self.betas = (beta1, beta2)
        self.eps = eps
        self.weight_decay = weight_decay

    def hyperparams(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def step(self) -> None:
        """Apply one update to every parameter, in place (one C loop, nnrt/_kernels.pyx).

        Per element, as torch:  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g g;
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), with
        g += wd p first (Adam) or p *= 1 - lr wd first (AdamW).
        """
        n = len(self._params)
        ms = [self._state(i, "exp_avg", zeros=True)[0] for i in range(n)]
        vs = [self._state(i, "exp_avg_sq", zeros=True)[0] for i in range(n)]
        beta1, beta2 = self.betas
        if not _adam_kernel(
            self._params,
            self._grads,
            ms,
            vs,
            self.lr,
            beta1,
            beta2,
            self.eps,
            self.weight_decay,
            self._decoupled,
            self.step_count + 1,
        ):
            raise _not_plain(self)
        self.step_count += 1


class Adam(_AdamBase):
    """Adam, as ``torch.optim.Adam``: weight decay is L2 added to the gradient."""

    def __init__(
        self,
        net: HasParams,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(net, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class AdamW(_AdamBase):
    """AdamW, as ``torch.optim.AdamW``: decoupled weight decay ``p *= 1 - lr * wd``."""

    _decoupled = True

    def __init__(
        self,
        net: HasParams,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(net, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
