"""``Network``: the core of ``nnrt.Sequential``, a stack of layers run in order.

Everything a network is and computes lives here: its layers, forward/backward,
parameters and state. The modules that work on networks (``nnrt.engine``,
``nnrt.io``, ``nnrt.fold``, ``nnrt.interop``, ``nnrt.summary``, ``nnrt.onnx``)
import this module; ``nnrt.network.Sequential`` adds ``fit``, ``save``, ... on
top as thin delegations to them, so no import goes the other way (see
``build`` for how those modules make new networks).

The network casts every layer to one dtype at construction, so its first
layer's ``prepare_input`` is the single validation/cast point for the input;
layers after it receive C-contiguous arrays of the right dtype from their
predecessor. Outputs of Python plugin layers are checked (type, rank, batch,
dtype) so that a broken plugin is named instead of crashing a kernel.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from nnrt._hooks import first_result, plugin_error
from nnrt._kernels import backward_chain as _backward_chain
from nnrt._kernels import dtypes_are as _dtypes_are
from nnrt._kernels import forward_chain as _forward_chain
from nnrt._kernels import same_items as _same_items
from nnrt._locks import holding as _holding
from nnrt._validate import check_state
from nnrt.layer import Layer
from nnrt.registry import PluginError, registry

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Network", "build", "set_network_class"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"Sequential: dtype must be 'float32' or 'float64', got {dtype!r}") from exc
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"Sequential: dtype must be 'float32' or 'float64', got {dtype!r}")
    return dt


class Network:
    """A network of layers applied in order (users hold its subclass ``nnrt.Sequential``).

    ``Sequential(layers, seed=0, dtype="float32")`` keeps the given layer
    objects (``net[i] is layers[i]``), re-initialises every layer that has
    ``reset_parameters(rng)`` from one generator seeded with ``seed`` (in
    layer order), and casts all parameters and buffers to ``dtype``.
    """

    def __init__(
        self, layers: Iterable[Layer], seed: int | None = 0, dtype: Any = "float32"
    ) -> None:
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential: needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"Sequential: layer {i} is {type(layer).__name__} {layer!r:.60}, "
                    f"not an nnrt.Layer (build layers with nnrt.layer(name, ...))"
                )
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("Sequential: the same layer object appears twice")
        self.layers: list[Layer] = layers
        self.dtype: np.dtype = _check_dtype(dtype)
        self.seed = seed
        self._check_widths()
        rng = np.random.default_rng(seed)
        for layer in layers:
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset):
                reset(rng)
        for layer in layers:
            layer.to_dtype(self.dtype)
        self._last_out: Any = None
        self._run_network_checks()

    # ---------------------------------------------------------------- pickling
    # A pickle carries what defines the network: its layers (each pickles its
    # config, parameters and buffers: nnrt/layer.pyx), dtype, seed and the public
    # attributes of a subclass. Never the last output buffer (that would leak the
    # last predictions and make the pickle the size of a batch of outputs), the
    # cached plans, or the loss of the last fit when it is a function (a local
    # function or lambda cannot be pickled); a loss given by name is kept.
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        fit_loss = self.__dict__.get("_fit_loss")
        if isinstance(fit_loss, str):
            state["_fit_loss"] = fit_loss
        with _holding(self):
            state["layers"] = [_PickledLayer.of(layer) for layer in self.layers]
        return state

    def __copy__(self) -> Self:
        # a shallow copy shares the layer objects (a new list), as before pickling
        # support; not through __getstate__, which packs Python layers for pickle
        new = type(self).__new__(type(self))
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        state["layers"] = list(self.layers)
        if isinstance(self.__dict__.get("_fit_loss"), str):
            state["_fit_loss"] = self.__dict__["_fit_loss"]
        new.__setstate__(state)
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["layers"] = [
            _rebuild_layer(*layer.args) if isinstance(layer, _PickledLayer) else layer
            for layer in state.get("layers", ())
        ]
        self.__dict__.update(state)
        self._last_out = None

    # --------------------------------------------------------------- structure
    def _check_widths(self) -> None:
        width: int | None = None
        prev: tuple[int, Layer] | None = None
        for i, layer in enumerate(self.layers):
            n_in = layer.in_features
            if n_in is not None and width is not None and n_in != width:
                assert prev is not None
                raise ValueError(
                    f"Sequential: layer {i} {layer!r} expects {n_in} input features, but "
                    f"layer {prev[0]} {prev[1]!r} produces {width}"
                )
            if layer.out_features is not None:
                width = layer.out_features
            elif n_in is not None:
                width = n_in
            prev = (i, layer)

    def _run_network_checks(self) -> None:
        hook = getattr(registry.pm.hook, "nnrt_check_network", None)
        if hook is None:
            return
        registry.ensure_loaded()
        impls = hook.get_hookimpls()
        if any(getattr(h, "hookwrapper", False) or getattr(h, "wrapper", False) for h in impls):
            hook(net=self)
            return
        # one implementation at a time, in pluggy's order (last registered first), so
        # that one that raises is named; warnings (even turned into errors) pass through
        for impl in reversed(impls):
            try:
                impl.function(*[self if a == "net" else None for a in impl.argnames])
            except Warning:
                raise
            except Exception as exc:
                raise PluginError(
                    f"nnrt plugin {impl.plugin_name!r}: its nnrt_check_network hook raised "
                    f"{type(exc).__name__}: {exc} (checking a network of "
                    f"{', '.join(type(layer).__name__ for layer in self.layers)})"
                ) from exc

    @property
    def in_features(self) -> int | None:
        for layer in self.layers:
            if layer.in_features is not None:
                return int(layer.in_features)
        return None

    @property
    def out_features(self) -> int | None:
        for layer in reversed(self.layers):
            if layer.out_features is not None:
                return int(layer.out_features)
            if layer.in_features is not None:
                return int(layer.in_features)
        return None

    def __len__(self) -> int:
        return len(self.layers)

    @overload
    def __getitem__(self, index: int) -> Layer: ...

    @overload
    def __getitem__(self, index: slice) -> list[Layer]: ...

    def __getitem__(self, index: int | slice) -> Layer | list[Layer]:
        return self.layers[index]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(dtype={self.dtype.name}, seed={self.seed!r}){inner}"

    # ----------------------------------------------------------------- compute
    def forward(self, X: Any, training: bool = False) -> np.ndarray:
        """Run every layer in order; returns a buffer the next call may reuse."""
        # NOTE: one compiled loop over the layers (nnrt/_kernels.pyx): compiled layers
        # are called through the C vtable; errors come back prefixed with the index.
        python, fuse, _ = self._structure()
        self._check_dtypes("forward")
        if python:  # Python plugin layers: check what each one returns
            return self._forward_checked(X, bool(training))
        out = _forward_chain(self.layers, X, bool(training), fuse)
        self._last_out = out
        return out

    def _forward_owned(self, X: Any) -> np.ndarray:
        """``forward(X, training=True)`` for a batch its caller owns and leaves alone
        until the step's backward (the training engine's gathered batches): the first
        layer may cache it without the private copy it makes of a user's array."""
        python, fuse, _ = self._structure()
        self._check_dtypes("forward")
        if python:
            return self._forward_checked(X, True)
        out = _forward_chain(self.layers, X, True, fuse, True)
        self._last_out = out
        return out

    def __call__(self, X: Any) -> np.ndarray:
        return self.forward(X, training=False)

    def backward(self, dY: Any, input_grad: bool = True) -> np.ndarray | None:
        """Back-propagate ``dY`` (gradient of the loss w.r.t. the output); returns dX.

        Overwrites every parameter gradient. With ``input_grad=False`` the
        gradient with respect to the network's input is not computed (a
        training step does not need it: this saves the first layer's
        ``dY @ W.T`` and every layer in front of the first trainable one) and
        ``None`` is returned; parameter gradients are the same.
        """
        python, fuse, first = self._structure()
        self._check_dtypes("backward")
        stop = 0 if input_grad else first
        if python:
            return self._backward_checked(dY, stop, bool(input_grad))
        return _backward_chain(self.layers, dY, stop, bool(input_grad), fuse)

    def _structure(self) -> tuple[tuple[int, ...], bytes | None, int]:
        """``(python_layers, fuse_plan, first_trainable)`` of the current ``self.layers``.

        Cached while the list holds the very same layer objects (an identity check per
        call: ``net.layers`` is public and may be changed at any time). Building it
        checks that every item is an ``nnrt.Layer`` (TypeError naming the item), so
        nothing else reaches the compiled loop.
        """
        layers = self.layers
        cached = self.__dict__.get("_structure_cache")
        if cached is not None and _same_items(cached[0], layers):
            found: tuple[tuple[int, ...], bytes | None, int] = cached[1]
            return found
        if not isinstance(layers, list):
            raise TypeError(
                f"Sequential: net.layers must be a list of nnrt.Layer, got {type(layers).__name__}"
            )
        snapshot = list(layers)
        for i, layer in enumerate(snapshot):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"Sequential layer {i}: {layer!r:.60} ({type(layer).__module__}."
                    f"{type(layer).__qualname__}) is not an nnrt.Layer; net.layers may only "
                    f"hold layers (build them with nnrt.layer(name, ...))"
                )
        python = tuple(i for i, layer in enumerate(snapshot) if _is_python_layer(layer))
        first = next((i for i, layer in enumerate(snapshot) if layer.params()), len(snapshot))
        found = (python, _fuse_flags(snapshot), first)
        self.__dict__["_structure_cache"] = (snapshot, found)
        return found

    def _check_dtypes(self, where: str) -> None:
        """TypeError unless every layer computes in the network's dtype (or follows its input).

        ``Sequential(..., dtype=)`` casts its layers once; a layer cast afterwards (by
        ``layer.to_dtype``, or by building another network of the other dtype that
        shares it) would make the network answer in another dtype than its own and
        save a file that reloads to other numbers: refused here, by ``forward``,
        ``backward`` (and so ``predict``, ``fit``, ``evaluate``) and ``save``.
        Checked on every call (a layer's dtype can change at any time); one identity
        test per layer when nothing changed.
        """
        want = self.dtype
        if _dtypes_are(self.layers, want):  # the fast path: numpy's float dtypes are singletons
            return
        for i, layer in enumerate(self.layers):
            dt = layer.dtype
            # NOTE: not ``dt in (None, want)``: numpy compares a dtype equal to None
            # when it is float64 (np.dtype(None) is float64)
            if dt is None or dt is want:
                continue
            try:
                same = np.dtype(dt) == np.dtype(want)
            except TypeError:
                same = False
            if not same:
                raise TypeError(
                    f"Sequential.{where}: layer {i} {layer!r} has dtype {dt}, but the network "
                    f"has dtype {want}: the layer was cast after the network was built "
                    f"(layer.to_dtype, or another network of dtype {dt} that shares the "
                    f"layer); cast it back with net[{i}].to_dtype({str(want)!r}), or build "
                    f"the network again with dtype={str(dt)!r}"
                )

    def _python_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose forward or backward is Python code (checked)."""
        return self._structure()[0]

    def _first_trainable(self) -> int:
        """Index of the first layer with parameters (``len(self)`` when none has any)."""
        return self._structure()[2]

    def _fuse_plan(self) -> bytes | None:
        """One flag per layer: 1 where layer i runs fused with layer i+1, or None.

        Plugins offer fusion of a pair through the hook ``nnrt_fuse_pair``
        (``nnrt.hookspecs``); the first layer of a fused pair runs both
        (``nnrt.hookspecs.FusablePair``) and must leave both layers' caches as the
        separate calls would.
        ``NNRT_FUSE=0`` in the environment turns fusion off.
        """
        return self._structure()[1]

    # ------------------------------------------- networks with Python plugin layers
    # A Python layer's result is checked before the next layer (maybe a compiled
    # kernel) sees it, so that a broken plugin is named instead of the layer after it.
    def _forward_checked(self, X: Any, training: bool) -> np.ndarray:
        python = set(self._structure()[0])
        shapes: list[tuple[int, ...] | None] = []
        out = X
        i = 0
        try:
            for i, layer in enumerate(self.layers):
                shape = _shape2(out)
                shapes.append(shape)
                result = layer.forward(out, training)
                if i in python:
                    cols = layer.out_features if layer.out_features is not None else None
                    if cols is None and shape is not None:
                        cols = shape[1]
                    self._check_result(
                        i, layer, "forward", result, shape[0] if shape else None, cols
                    )
                out = result
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"Sequential layer {i}: {exc}") from exc
        if training:
            self._input_shapes = shapes
        self._last_out = out
        return out

    def _backward_checked(self, dY: Any, stop: int, input_grad: bool) -> np.ndarray | None:
        python = set(self._structure()[0])
        shapes: list[Any] = self.__dict__.get("_input_shapes") or [None] * len(self.layers)
        layers = self.layers
        grad = dY
        i = len(layers) - 1
        try:
            for i in range(len(layers) - 1, stop - 1, -1):
                layer = layers[i]
                if i == stop and not input_grad:
                    params_only = getattr(layer, "backward_params", None)
                    (params_only or layer.backward)(grad)
                    return None
                grad = layer.backward(grad)
                if i in python:
                    shape = shapes[i]
                    self._check_result(
                        i, layer, "backward", grad, *(shape if shape else (None, None))
                    )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"Sequential layer {i}: {exc}") from exc
        return grad if input_grad else None

    def _check_result(
        self, i: int, layer: Layer, where: str, result: Any, rows: int | None, cols: int | None
    ) -> None:
        if (
            isinstance(result, np.ndarray)
            and result.ndim == 2
            and result.dtype == self.dtype
            and (rows is None or result.shape[0] == rows)
            and (cols is None or result.shape[1] == cols)
        ):
            return
        name = registry.name_of(type(layer))
        origin = (
            f"layer type {name!r} from nnrt plugin {registry.get(name).plugin!r}"
            if name is not None
            else f"unregistered class {type(layer).__module__}.{type(layer).__qualname__}"
        )
        want = f"({rows if rows is not None else 'batch'}, {cols if cols is not None else 'n'})"
        raise PluginError(
            f"Sequential layer {i} {layer!r} ({origin}): {where} returned {_describe(result)}, "
            f"expected a 2-D {self.dtype} array of shape {want}; the plugin's layer is broken"
        )

    # ------------------------------------------------------------------- state
    def _named(self, member: str) -> dict[str, np.ndarray]:
        self._structure()  # TypeError naming any item of net.layers that is not a layer
        out: dict[str, np.ndarray] = {}
        for i, layer in enumerate(self.layers):
            for name, arr in getattr(layer, member)().items():
                out[f"{i}.{name}"] = arr
        return out

    def params(self) -> dict[str, np.ndarray]:
        """Live trainable arrays, keyed ``"<index>.<name>"``."""
        return self._named("params")

    def grads(self) -> dict[str, np.ndarray]:
        """Live gradient arrays, same keys and shapes as ``params()``."""
        return self._named("grads")

    def buffers(self) -> dict[str, np.ndarray]:
        """Live non-trained state (e.g. a normalisation layer's running statistics)."""
        return self._named("buffers")

    def zero_grad(self) -> None:
        for g in self.grads().values():
            g.fill(0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of every parameter and buffer, keyed ``"<index>.<name>"``.

        Taken under the network's lock: while another thread trains the
        network, the copies are the weights of one whole step.
        """
        with _holding(self):
            state = {k: v.copy() for k, v in self.params().items()}
            state.update({k: v.copy() for k, v in self.buffers().items()})
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy arrays into the live parameters and buffers, checking keys and shapes.

        All keys are checked before anything is written, so a bad dict leaves
        the network unchanged. The copy is made under the network's lock: a
        ``predict`` in another thread sees the old weights or the new ones,
        never a mix (a hot swap), and ``fit`` in another thread continues from
        the new weights at its next step.
        """
        with _holding(self):
            self._load_state_dict(state)

    def _load_state_dict(self, state: Mapping[str, Any]) -> None:
        live = self.params()
        live.update(self.buffers())
        missing = sorted(set(live) - set(state))
        unexpected = sorted(set(state) - set(live))
        if missing or unexpected:
            raise KeyError(
                f"Sequential.load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
            )
        arrays = {}
        for key, target in live.items():
            value = np.asarray(state[key])
            if value.dtype.kind not in "fiub":
                raise TypeError(
                    f"Sequential.load_state_dict: {key!r} has non-numeric dtype {value.dtype}"
                )
            if value.shape != target.shape:
                raise ValueError(
                    f"Sequential.load_state_dict: {key!r} has shape {value.shape}, "
                    f"the network expects {target.shape}"
                )
            arrays[key] = value
        check_state(self, arrays)  # plugins' value checks (a variance >= 0), hook
        for key, value in arrays.items():
            np.copyto(live[key], value, casting="unsafe")


# NOTE: the class the modules below nnrt.network build (``io.load``, ``from_torch``,
# ``fold``): ``nnrt.Sequential`` once nnrt.network is imported (it always is, by
# ``import nnrt``). nnrt.network imports those modules, so they cannot import it back.
_network_class: type[Network] = Network


def set_network_class(cls: type[Network]) -> None:
    """Make ``build`` construct ``cls`` (called once, by nnrt.network)."""
    global _network_class
    if not (isinstance(cls, type) and issubclass(cls, Network)):
        raise TypeError(f"set_network_class: {cls!r} is not a subclass of Network")
    _network_class = cls


def build(layers: Iterable[Layer], seed: int | None, dtype: Any) -> Network:
    """A new ``nnrt.Sequential`` of ``layers`` (what ``nnrt.Sequential(...)`` builds)."""
    return _network_class(layers, seed=seed, dtype=dtype)


class _PickledLayer:
    """How a registered Python layer travels in a network's pickle: config and arrays.

    A Python layer's own pickle is its whole ``__dict__``, caches included (a
    batch-sized ``_Y`` or ``_xhat``); a registered one is rebuilt from
    ``config()`` with copies of its params and buffers instead. Compiled layers
    already pickle only that (``nnrt/layer.pyx``) and unregistered Python layers
    have nothing else to go by: both pickle as themselves.
    """

    def __init__(self, cls: type, config: dict[str, Any], dtype: Any, arrays: dict[str, Any]):
        self.args = (cls, config, dtype, arrays)

    @staticmethod
    def of(layer: Layer) -> Any:
        if getattr(layer, "__dict__", None) is None:
            return layer
        if registry.name_of(type(layer)) is None:
            return layer
        try:
            config = dict(layer.config())
        except Exception:
            return layer
        arrays = {k: np.array(v) for k, v in layer.params().items()}
        arrays.update({k: np.array(v) for k, v in layer.buffers().items()})
        return _PickledLayer(type(layer), config, layer.dtype, arrays)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_layer, self.args)


def _rebuild_layer(cls: type, config: dict[str, Any], dtype: Any, arrays: dict[str, Any]) -> Layer:
    layer: Layer = cls(**config)
    if dtype is not None:
        layer.to_dtype(dtype)
    live = dict(layer.params())
    live.update(layer.buffers())
    for key, value in arrays.items():
        np.copyto(live[key], value, casting="unsafe")
    return layer


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class statement, not a compiled (cdef) class


def _is_python_layer(layer: Layer) -> bool:
    """True when forward or backward is Python code (a plugin we must double-check).

    Decided by *where* the method is defined, not by what it is: the first class in
    the MRO that defines it is a Python class (a staticmethod, classmethod, lambda,
    functools.partial or any callable there is Python code too), or the instance
    itself holds an override.
    """
    inst = getattr(layer, "__dict__", None)
    for name in ("forward", "backward"):
        if inst and name in inst:
            return True
        for klass in type(layer).__mro__:
            if name in vars(klass):
                if klass.__flags__ & _HEAPTYPE:
                    return True
                break
    return False


def _fuse_flags(layers: list[Layer]) -> bytes | None:
    """``Network._fuse_plan`` of ``layers``: the plugins' answers to the hook
    ``nnrt_fuse_pair`` (pairs never overlap; a pair is offered once its first layer
    is not already the second of a fused pair)."""
    flags = bytearray(len(layers))
    if os.environ.get("NNRT_FUSE", "1") != "0":
        i = 0
        while i < len(layers) - 1:
            if _fuses(layers[i], layers[i + 1]):
                flags[i] = 1
                i += 1
            i += 1
    return bytes(flags) if any(flags) else None


def _fuses(first: Layer, second: Layer) -> bool:
    """The plugins' (checked) answer to ``nnrt_fuse_pair(first, second)``."""
    answer, plugin = first_result("nnrt_fuse_pair", first=first, second=second)
    if answer is None or answer is False:
        return False
    where = f"for {first!r} followed by {second!r}"
    if answer is not True:
        raise plugin_error(
            "nnrt_fuse_pair",
            plugin,
            f"returned {_type_name(answer)} {answer!r:.80} {where}; expected True, False or None",
        )
    missing = [
        name
        for name in ("_nnrt_forward_pair", "_nnrt_backward_pair")
        if not callable(getattr(first, name, None))
    ]
    if missing:
        raise plugin_error(
            "nnrt_fuse_pair",
            plugin,
            f"returned True {where}, but {type(first).__qualname__} has no "
            f"{' or '.join(missing)} method to run the pair (nnrt.hookspecs.FusablePair)",
        )
    return True


def _type_name(obj: Any) -> str:
    """``int``, ``numpy.bool``: the type of ``obj`` as a user would spell it."""
    cls = type(obj)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _shape2(x: Any) -> tuple[int, ...] | None:
    """Shape of a 2-D array-like input, or None (the layer itself reports bad input)."""
    try:
        shape = np.shape(x)
    except (ValueError, TypeError):
        return None
    return tuple(int(d) for d in shape) if len(shape) == 2 else None


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} dtype {x.dtype}"
    return f"a {type(x).__name__}"
