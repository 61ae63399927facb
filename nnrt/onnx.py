"""Export a network to ONNX: ``nnrt.onnx.export(net, path, batch_dim="N")``.

Needs the optional extra ``nnrt[onnx]`` (the ``onnx`` package; ``onnxruntime``
to run the result). The graph computes the network in evaluation mode
(``net(X)``; a layer with batch statistics uses its running ones) in the
network's dtype.

Every layer is exported by the plugin that provides it, through the hook
``nnrt_onnx_export(layer, input, ctx)`` (``nnrt.hookspecs``): the core's own
plugin writes ``dense`` as ``Gemm(X, W, b)`` (W stored as (in, out), no
transpose), and the built-in plugins write their layers (``MatMul``,
``Sigmoid``, ...) exactly as a third party would. A
layer no plugin exports raises ``NotImplementedError`` naming the layer and its
plugin.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from nnrt._locks import holding
from nnrt.registry import registry

# NOTE: this module is ``nnrt.onnx``; ``import onnx`` below is absolute and
# gets the real onnx package (imported lazily, it is an optional extra).
if TYPE_CHECKING:
    import onnx

    from nnrt._network import Network
    from nnrt.layer import Layer

__all__ = ["DEFAULT_OPSET", "ExportContext", "export", "to_model"]

#: opset of the default ONNX domain written unless ``opset=`` says otherwise;
#: 17 is understood by every onnxruntime since 1.13
DEFAULT_OPSET = 17


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "nnrt.onnx.export needs the 'onnx' package: pip install 'nnrt[onnx]'"
        ) from exc
    return onnx


class ExportContext:
    """Builds one graph; handed to each ``nnrt_onnx_export`` hook call.

    Implements ``nnrt.hookspecs.OnnxExportContext``: plugins add constants with
    ``add_initializer`` and nodes with ``add_node`` and never touch onnx
    themselves. Names are made unique per graph; a node name carries the layer
    index (``"3.Gemm"``) so the graph reads like the network.
    """

    def __init__(self, dtype: Any, opset: int) -> None:
        self._onnx = _require_onnx()
        self.dtype: np.dtype = np.dtype(dtype)
        self.opset = int(opset)
        self.index = -1
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._names: set[str] = set()

    def unique(self, name: str) -> str:
        """``name``, or ``name_1``, ``name_2``, ... whichever is still free."""
        candidate, k = name, 0
        while candidate in self._names:
            k += 1
            candidate = f"{name}_{k}"
        self._names.add(candidate)
        return candidate

    def _prefixed(self, name: str) -> str:
        return f"{self.index}.{name}" if self.index >= 0 else name

    def add_initializer(self, name: str, array: Any, /) -> str:
        """Store ``array`` (cast to the network's dtype) as a constant; return its name."""
        arr = np.ascontiguousarray(np.asarray(array, dtype=self.dtype))
        uname = self.unique(self._prefixed(name))
        self.initializers.append(self._onnx.numpy_helper.from_array(arr, name=uname))
        return uname

    def add_node(
        self, op_type: str, inputs: Sequence[str], /, n_outputs: int = 1, **attrs: Any
    ) -> list[str]:
        """Append a node of the default domain; return its fresh output names."""
        if isinstance(inputs, str):
            raise TypeError(f"add_node({op_type!r}): inputs must be a list of names, got a str")
        outputs = [self.unique(self._prefixed(f"{op_type}_out{j}")) for j in range(n_outputs)]
        node = self._onnx.helper.make_node(
            op_type,
            list(inputs),
            outputs,
            name=self.unique(self._prefixed(op_type)),
            **attrs,
        )
        self.nodes.append(node)
        return outputs


def _describe_layer(i: int, layer: Layer) -> str:
    name = registry.name_of(type(layer))
    cls = f"{type(layer).__module__}.{type(layer).__qualname__}"
    if name is None:
        return f"layer {i} {layer!r} (class {cls}, not a registered layer type)"
    plugin = registry.get(name).plugin
    return f"layer {i} {layer!r} (registered as {name!r} by plugin {plugin!r}, class {cls})"


def to_model(
    net: Network,
    batch_dim: str | int = "N",
    *,
    opset: int = DEFAULT_OPSET,
    input_name: str = "X",
    output_name: str = "Y",
    in_features: int | None = None,
    graph_name: str = "nnrt",
) -> onnx.ModelProto:
    """Build the ONNX model of ``net`` in evaluation mode (see ``export``); checked."""
    onnx = _require_onnx()

    if not isinstance(batch_dim, (str, int)) or isinstance(batch_dim, bool):
        raise TypeError(
            f"nnrt.onnx: batch_dim must be a str (symbolic) or an int, got {batch_dim!r}"
        )
    if isinstance(batch_dim, int) and batch_dim <= 0:
        raise ValueError(f"nnrt.onnx: a fixed batch_dim must be positive, got {batch_dim}")
    if input_name == output_name:
        raise ValueError(f"nnrt.onnx: input_name and output_name are both {input_name!r}")
    n_in = net.in_features if in_features is None else int(in_features)
    if n_in is None:
        raise ValueError(
            "nnrt.onnx: no layer of the network fixes the input width; pass in_features="
        )
    n_out = net.out_features if net.out_features is not None else n_in
    elem = {
        np.dtype(np.float32): onnx.TensorProto.FLOAT,
        np.dtype(np.float64): onnx.TensorProto.DOUBLE,
    }
    if net.dtype not in elem:
        raise TypeError(f"nnrt.onnx: unsupported network dtype {net.dtype}")
    registry.ensure_loaded()
    ctx = ExportContext(net.dtype, opset)
    ctx._names.update({input_name, output_name})
    current = input_name
    for i, layer in enumerate(net.layers):
        ctx.index = i
        out: Any = registry.call_hook("nnrt_onnx_export", layer=layer, input=current, ctx=ctx)
        if out is None:
            raise NotImplementedError(
                f"nnrt.onnx.export: {_describe_layer(i, layer)} has no ONNX export: "
                f"no plugin's nnrt_onnx_export hook handles it (the plugin that provides "
                f"the layer can implement that hook; see nnrt.hookspecs.nnrt_onnx_export)"
            )
        if not isinstance(out, str) or not (out == current or out in ctx._names):
            raise TypeError(
                f"nnrt.onnx.export: the nnrt_onnx_export hook for {_describe_layer(i, layer)} "
                f"returned {out!r}, not the name of a tensor in the graph"
            )
        current = out
    ctx.index = -1
    # name the final tensor output_name: rename the producing node's output,
    # or add an Identity when the last layer passed its input through
    producer = next((n for n in reversed(ctx.nodes) if current in n.output), None)
    if producer is not None and current != input_name:
        for node in ctx.nodes:
            for j, name in enumerate(node.input):
                if name == current:
                    node.input[j] = output_name
            for j, name in enumerate(node.output):
                if name == current:
                    node.output[j] = output_name
    else:
        ctx.nodes.append(onnx.helper.make_node("Identity", [current], [output_name], name="output"))
    t = elem[net.dtype]
    graph = onnx.helper.make_graph(
        ctx.nodes,
        graph_name,
        [onnx.helper.make_tensor_value_info(input_name, t, [batch_dim, n_in])],
        [onnx.helper.make_tensor_value_info(output_name, t, [batch_dim, n_out])],
        initializer=ctx.initializers,
    )
    from nnrt import __version__

    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", int(opset))],
        producer_name="nnrt",
        producer_version=__version__,
    )
    # the IR version that goes with the opset (not the newest the onnx package
    # knows), so that older runtimes load the file
    model.ir_version = _ir_version_for(onnx, int(opset))
    onnx.checker.check_model(model, full_check=True)
    return model


def _ir_version_for(onnx: Any, opset: int) -> int:
    table = getattr(onnx.helper, "VERSION_TABLE", [])
    for _release, ir, op, *_rest in table:
        if op >= opset:
            return int(ir)
    return int(onnx.IR_VERSION)


def export(
    net: Network,
    path: str | os.PathLike[str],
    batch_dim: str | int = "N",
    *,
    opset: int = DEFAULT_OPSET,
    input_name: str = "X",
    output_name: str = "Y",
    in_features: int | None = None,
) -> onnx.ModelProto:
    """Write ``net`` (evaluation mode) to the ONNX file ``path``; return the model.

    The graph has one input ``input_name`` of shape ``(batch_dim, in_features)``
    and one output ``output_name`` of shape ``(batch_dim, out_features)``, both
    in the network's dtype (float32 → FLOAT, float64 → DOUBLE). ``batch_dim``
    is a symbolic name (dynamic batch, default ``"N"``) or a fixed int. The
    model passes ``onnx.checker.check_model(full_check=True)`` before it is
    written. A layer without ONNX support raises ``NotImplementedError`` naming
    the layer and the plugin that provides it.
    """
    # the weights of one whole step when another thread trains the network
    with holding(net):
        return _export(net, path, batch_dim, opset, input_name, output_name, in_features)


def _export(
    net: Network,
    path: str | os.PathLike[str],
    batch_dim: str | int,
    opset: int,
    input_name: str,
    output_name: str,
    in_features: int | None,
) -> onnx.ModelProto:
    onnx = _require_onnx()
    model = to_model(
        net,
        batch_dim,
        opset=opset,
        input_name=input_name,
        output_name=output_name,
        in_features=in_features,
    )
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        onnx.save_model(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return model
