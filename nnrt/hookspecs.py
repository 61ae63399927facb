"""The hook interface between nnrt and its plugins (pluggy project name ``"nnrt"``).

A plugin is a module (or any object) with functions marked ``@nnrt.hookimpl``
whose names and argument names match the specs below. Installed plugins are
found through the setuptools entry-point group ``nnrt``; ``nnrt.register_plugin``
adds one at run time. Each spec's docstring is its documentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import pluggy

if TYPE_CHECKING:
    from nnrt.layer import Layer

PROJECT_NAME = "nnrt"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Network(Protocol):
    """What ``nnrt_check_network`` is given: the finished ``nnrt.Sequential``.

    (A structural type, so that this module, which the registry imports, does
    not import ``nnrt.network``, which imports the registry.)
    """

    layers: list[Layer]
    dtype: Any

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Layer: ...


#: a ``torch.nn.Module`` (``nnrt_to_torch``, ``nnrt_from_torch``); typed loosely so
#: that nnrt and its plugins type-check and import without torch installed
TorchModule: TypeAlias = Any


class RegisterLayer(Protocol):
    """The callback handed to ``nnrt_register_layers``."""

    def __call__(self, name: str, cls: type[Layer], /) -> None: ...


class LossFunction(Protocol):
    """A loss: ``loss, dY = fn(Y, target)``, mean-reduced, ``dY`` carrying the ``1/N``."""

    def __call__(self, Y: Any, target: Any, /) -> tuple[float, Any]: ...


class RegisterLoss(Protocol):
    """The callback handed to ``nnrt_register_losses``."""

    def __call__(self, name: str, fn: LossFunction, /) -> None: ...


class RegisterOptimizer(Protocol):
    """The callback handed to ``nnrt_register_optimizers``."""

    def __call__(self, name: str, cls: type[Any], /) -> None: ...


class RegisterWarning(Protocol):
    """The callback handed to ``nnrt_register_warnings``."""

    def __call__(self, cls: type[Warning], /) -> None: ...


@hookspec
def nnrt_register_layers(register: RegisterLayer) -> None:
    """Add layer types to the registry.

    Call ``register(name, cls)`` once per layer type, where ``name`` is the
    registry key users type (``nnrt.layer(name, ...)``; letters, digits, ``_``,
    ``-`` and ``.``) and ``cls`` is a subclass of ``nnrt.Layer``. Registration
    validates each class at once: a non-Layer class, a name another plugin
    already registered (the error names both plugins) or a class that does not
    override ``forward`` and ``backward`` raises an error naming this plugin.
    Return nothing.

    Example::

        @nnrt.hookimpl
        def nnrt_register_layers(register):
            register("tanh", Tanh)
    """


@hookspec
def nnrt_register_losses(register: RegisterLoss) -> None:
    """Add loss functions to the registry.

    Call ``register(name, fn)`` once per loss. ``fn(Y, target) -> (loss, dY)``
    takes the network's output ``Y`` (batch, out) and the targets, and returns
    the loss as a Python float, reduced as torch's ``reduction="mean"``, with
    ``dY = dloss/dY`` (the shape and dtype of ``Y``, already carrying the
    ``1/N`` of the mean). Users then pick it by name: ``nnrt.loss(name)``,
    ``net.fit(..., loss=name)``, ``nnrt train --loss name`` and the
    scikit-learn estimators. A name that is already registered (the built-in
    ``softmax_cross_entropy``, ``mse``, ``bce_with_logits`` included) is
    refused, naming both plugins; so is anything that is not callable with two
    positional arguments. Return nothing.

    Example::

        @nnrt.hookimpl
        def nnrt_register_losses(register):
            register("huber", huber)
    """


@hookspec
def nnrt_register_optimizers(register: RegisterOptimizer) -> None:
    """Add optimizers to the registry.

    Call ``register(name, cls)`` once per optimizer. ``cls(net, **kwargs)``
    builds one over a network's (or layer's) live ``params()``/``grads()``;
    it must have ``step()`` (update every parameter in place from the
    gradients ``backward`` wrote) and ``zero_grad()``. Subclassing
    ``nnrt.optim.Optimizer`` gives ``zero_grad``, ``state_dict`` and the
    parameter resolution for free. Users then pick it by name:
    ``nnrt.optimizer(name, net, **kwargs)``, ``net.fit(..., optimizer=name)``,
    ``nnrt train --optimizer name`` and the scikit-learn estimators. A name
    that is already registered (``sgd``, ``adam``, ``adamw`` included) is
    refused, naming both plugins. Return nothing.

    Example::

        @nnrt.hookimpl
        def nnrt_register_optimizers(register):
            register("lion", Lion)
    """


@hookspec
def nnrt_check_network(net: Network) -> None:
    """Inspect a network when it is built and warn about likely mistakes.

    ``Sequential`` calls this hook once, at the end of its construction, with
    the finished network (``net.layers``, ``net.dtype``; layers are already
    cast). An implementation looks at the layers it knows (e.g. by
    ``isinstance`` or ``nnrt.registry.registry.name_of(type(layer))``) and
    emits a Python warning (a subclass of ``nnrt.NetworkWarning``; use
    ``nnrt.warnings.warn_user(message, category)`` so that the warning points
    at the user's line) for a combination that works but is probably not what
    the user wants. It must not modify the network, must not raise for a
    valid network, and returns nothing.

    Example (a plugin whose ``Tanh`` saturates after another one)::

        @nnrt.hookimpl
        def nnrt_check_network(net):
            for i in range(1, len(net)):
                if type(net[i]) is Tanh and type(net[i - 1]) is Tanh:
                    warn_user(f"layers {i - 1} and {i}: tanh of tanh ...", DoubleTanhWarning)
    """


@hookspec
def nnrt_check_state(layer: Layer, state: dict[str, Any]) -> None:
    """Check values about to be loaded into a layer's parameters and buffers.

    ``nnrt.load`` (before the arrays are copied in, after their shapes and
    dtypes were checked and NaN/Inf refused) and ``Sequential.load_state_dict``
    call this once per layer with ``state``: the layer's own names (``"weight"``,
    ``"running_var"``) mapped to the arrays, of the shapes the layer expects.
    An implementation checks the layers it knows (by exact class) and raises
    ``ValueError`` naming the layer, the array and what is wrong for values its
    kernels must never see (a negative variance); nothing is loaded then.
    Return nothing; do not modify ``state``.

    Example (a plugin whose ``RunningNorm`` keeps a running variance)::

        @nnrt.hookimpl
        def nnrt_check_state(layer, state):
            var = state.get("running_var")
            if type(layer) is RunningNorm and var is not None and not (var >= 0).all():
                raise ValueError(f"{layer!r}: running_var must be >= 0")
    """


class OnnxExportContext(Protocol):
    """What ``nnrt.onnx.export`` hands to ``nnrt_onnx_export`` (see ``nnrt.onnx.ExportContext``).

    A plugin builds its part of the graph through this object, so it never
    needs to import ``onnx`` itself.
    """

    #: numpy dtype of the network (float32 or float64); initializers are cast to it
    dtype: Any
    #: opset version of the default ONNX domain being written
    opset: int
    #: index of the layer being exported in the network
    index: int

    def add_initializer(self, name: str, array: Any, /) -> str:
        """Store ``array`` (cast to ``dtype``) as a graph constant; return its unique name."""
        ...

    def add_node(
        self, op_type: str, inputs: Sequence[str], /, n_outputs: int = 1, **attrs: Any
    ) -> list[str]:
        """Append an ONNX node of the default domain; return its (fresh) output names."""
        ...


@hookspec(firstresult=True)
def nnrt_onnx_export(layer: Layer, input: str, ctx: OnnxExportContext) -> str | None:
    """Write ``layer`` (evaluation mode) into the ONNX graph being exported.

    ``input`` is the name of the tensor holding the layer's input, shape
    (batch, features) in the network's dtype. A plugin that recognises the
    layer (check its exact class) adds initializers and nodes through ``ctx``
    and returns the name of the tensor holding the layer's output; otherwise
    it returns ``None`` so that the next plugin is asked (first non-None
    result wins). A layer no plugin claims makes ``nnrt.onnx.export`` raise
    an error naming the layer and its plugin.

    Example::

        @nnrt.hookimpl
        def nnrt_onnx_export(layer, input, ctx):
            if type(layer) is not Tanh:
                return None
            return ctx.add_node("Tanh", [input])[0]
    """


@hookspec(firstresult=True)
def nnrt_layer_flops(layer: Layer, in_features: int) -> int | None:
    """Forward FLOPs per sample of ``layer`` (evaluation mode), for ``net.summary()``.

    ``in_features`` is the width of the layer's input. A plugin that recognises
    the layer (check its exact class) returns a non-negative int counting one
    multiply-add as 2 FLOPs and one elementwise operation (``exp`` included) as
    1; otherwise it returns ``None`` so that the next plugin is asked (first
    non-None result wins). A layer no plugin claims is counted as one FLOP per
    output element and marked as an estimate in the summary.

    Example::

        @nnrt.hookimpl
        def nnrt_layer_flops(layer, in_features):
            if type(layer) is not Tanh:
                return None
            return 4 * in_features  # exp, exp, subtract/add, divide per element
    """


@hookspec(firstresult=True)
def nnrt_fold_pair(first: Layer, second: Layer) -> Layer | None:
    """Merge two adjacent layers into one layer for inference, if this plugin can.

    ``nnrt.fold.fold(net)`` (and ``net.fold()``) walks the network and asks
    this hook about every adjacent pair ``(first, second)`` (``second`` takes
    ``first``'s output). A plugin that knows how to merge the pair returns a
    NEW layer that computes ``second(first(X))`` in evaluation mode, from a
    copy of their parameters and buffers (``first`` and ``second`` must not be
    changed); compute in float64: the network casts the result to its dtype.
    The merged layer is meant for inference only (it need not train like the
    pair). Otherwise return ``None`` so that the next plugin is asked (first
    non-None result wins). The merged layer is then offered to this hook again
    together with the layer after it, so chains fold as far as plugins allow.

    The result must be an ``nnrt.Layer``, not ``first`` or ``second`` itself,
    taking ``first``'s input width and giving ``second``'s output width (where
    they are fixed); anything else raises ``nnrt.PluginError`` naming this
    plugin. Return a registered layer type (e.g. ``nnrt.layer("dense", ...)``)
    so that the folded network can be saved.

    Example (a plugin whose ``Scale`` layer multiplies by a constant)::

        @nnrt.hookimpl
        def nnrt_fold_pair(first, second):
            if type(first) is not Scale or type(second) is not Scale:
                return None
            return Scale(first.factor * second.factor)
    """


@hookspec(firstresult=True)
def nnrt_to_torch(layer: Layer) -> TorchModule | None:
    """The ``torch.nn.Module`` equivalent to ``layer``, for ``net.to_torch()``.

    A plugin that recognises the layer (check its exact class) imports torch
    (only this hook and ``nnrt_from_torch`` are ever called with torch in
    use) and returns a new module holding a COPY of the layer's parameters
    and buffers (``torch.from_numpy(np.array(a, copy=True))``: the two must
    share no memory), in the dtype of the layer's arrays; its evaluation mode
    (``.eval()``) must compute ``layer.forward(X, training=False)`` and its
    training mode should match ``training=True``. Otherwise return ``None``
    so that the next plugin is asked (first non-None result wins). A layer no
    plugin claims makes ``to_torch`` raise ``TypeError`` naming the layer and
    its plugin; a result that is not a ``torch.nn.Module`` raises
    ``nnrt.PluginError`` naming this plugin. Implement ``nnrt_from_torch``
    too, so that a network makes the round trip.

    Example::

        @nnrt.hookimpl
        def nnrt_to_torch(layer):
            if type(layer) is not Tanh:
                return None
            import torch

            return torch.nn.Tanh()
    """


@hookspec(firstresult=True)
def nnrt_from_torch(module: TorchModule) -> Layer | None:
    """The nnrt layer equivalent to the torch module ``module``, for ``nnrt.from_torch``.

    ``nnrt.from_torch`` asks this hook about each child of a
    ``torch.nn.Sequential`` (``nn.Identity`` is skipped before). A plugin
    that recognises the module (check its exact class, e.g. ``type(module)
    is torch.nn.Tanh``) returns a NEW layer of its own holding a copy of the
    module's parameters and buffers in float64 (``Sequential`` casts it to
    the network's dtype); otherwise it returns ``None`` so that the next
    plugin is asked (first non-None result wins). A module of a recognised
    class whose settings have no nnrt counterpart raises ``TypeError`` saying
    which setting (``from_torch`` adds the module's position). A module no
    plugin claims makes ``from_torch`` raise ``TypeError`` naming it; a
    result that is not an ``nnrt.Layer`` raises ``nnrt.PluginError`` naming
    this plugin.

    Example::

        @nnrt.hookimpl
        def nnrt_from_torch(module):
            import torch

            if type(module) is not torch.nn.Tanh:
                return None
            return Tanh()
    """


class FusablePair(Protocol):
    """What the FIRST layer of a pair that ``nnrt_fuse_pair`` accepted must implement.

    ``Sequential``'s compiled loop then calls these instead of the two layers'
    own ``forward``/``backward`` (``second`` is the layer after it):

    - ``_nnrt_forward_pair(X, training, second, trusted=False)`` returns
      ``second.forward(self.forward(X, training), training)``. ``trusted``:
      ``X`` is a buffer nothing outside the network holds (it may be cached
      for backward without a copy).
    - ``_nnrt_backward_pair(dY, second)`` returns ``self.backward(second.backward(dY))``
      and writes both layers' parameter gradients.

    Both must leave each layer's caches as the separate calls would (so that
    either layer's own ``backward`` still works after a fused forward), fall
    back to the separate calls for anything they do not expect, and give the
    results of the separate calls (bit for bit where the plugin can).
    """

    def _nnrt_forward_pair(
        self, X: Any, training: bool, second: Layer, trusted: bool = False, /
    ) -> Any: ...

    def _nnrt_backward_pair(self, dY: Any, second: Layer, /) -> Any: ...


@hookspec(firstresult=True)
def nnrt_fuse_pair(first: Layer, second: Layer) -> bool | None:
    """Offer to run two adjacent layers of a network as one fused step.

    ``Sequential`` plans its compiled forward/backward loop once per list of
    layers and asks this hook about every adjacent pair ``(first, second)``
    (``second`` takes ``first``'s output) that is not already part of a fused
    pair. A plugin that can run the pair faster in one sweep (e.g. a
    normalisation and the activation after it, without the array between
    them) returns ``True``; ``first`` must then implement ``FusablePair``
    (its class's ``_nnrt_forward_pair``/``_nnrt_backward_pair`` run the pair).
    Return ``False`` to forbid fusing the pair, ``None`` when the pair is not
    this plugin's business (the next plugin is asked; first non-None result
    wins). Recognise layers by exact class (``type(first) is MyNorm``): a
    user's subclass may compute something else.

    A result that is not ``True``, ``False`` or ``None``, or ``True`` for a
    ``first`` layer without the two methods, raises ``nnrt.PluginError``
    naming this plugin. ``NNRT_FUSE=0`` in the environment turns every fusion
    off (the layers then run one by one, with the same results).

    Example (a plugin whose compiled ``Scale`` layer can absorb a following
    ``Shift``)::

        @nnrt.hookimpl
        def nnrt_fuse_pair(first, second):
            if type(first) is Scale and type(second) is Shift:
                return True
            return None
    """


@hookspec
def nnrt_default_block() -> Sequence[str] | None:
    """The layers of the default hidden block, by registered name.

    Where a user gives only a width, nnrt builds this block: the scikit-learn
    estimators (an int ``w`` in ``hidden``), ``nnrt demo`` and the default
    ``--layers`` of ``nnrt train`` (one block of width 64, then ``dense:10``).
    Return a non-empty sequence of registered layer names: the first one
    changes the width (it is built as ``name(in_features, width)``), every
    other keeps it (``name(width)`` if its constructor takes the width, else
    ``name()``), as in the ``--layers`` grammar of ``nnrt train``. Otherwise
    return ``None``.

    The earliest-loaded plugin that answers decides (nnrt's own plugins load
    first, so an installed plugin cannot change the defaults under a user's
    feet); with no answer the block is a single ``dense``. An answer that is
    not a sequence of registered layer names raises ``nnrt.PluginError``
    naming the plugin.

    Example (a plugin whose block is dense -> tanh)::

        @nnrt.hookimpl
        def nnrt_default_block():
            return ("dense", "tanh")
    """


@hookspec
def nnrt_register_warnings(register: RegisterWarning) -> None:
    """Make this plugin's warning categories public as ``nnrt.<ClassName>``.

    Call ``register(cls)`` once per warning class (a subclass of ``Warning``,
    usually of ``nnrt.NetworkWarning`` or ``nnrt.TrainingWarning``, whose name
    ends in ``Warning``) that users
    may want to filter: ``nnrt.<cls.__name__>`` is then that class, found
    through the registry when first asked for (the core imports no plugin), and
    ``dir(nnrt)`` lists it. Define the class in the plugin's own module and
    document it there. Not a ``Warning`` subclass, a name not ending in
    ``Warning``, a name of nnrt's own, or a name another plugin's warning holds
    raises ``nnrt.PluginError`` naming the
    plugin(s) when the name is looked up. Return nothing.

    Example::

        class DoubleTanhWarning(nnrt.NetworkWarning):
            # tanh of tanh: the second one saturates
            pass

        @nnrt.hookimpl
        def nnrt_register_warnings(register):
            register(DoubleTanhWarning)
    """
