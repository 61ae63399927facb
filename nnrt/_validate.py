"""Value checks shared by ``Sequential.load_state_dict`` and ``nnrt.load``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nnrt.registry import registry


def check_state(net: Any, state: Mapping[str, Any]) -> None:
    """Run every plugin's ``nnrt_check_state`` hook on ``state`` (keys ``"<i>.<name>"``).

    Raises what a hook raises (``ValueError`` naming the layer and array).
    """
    registry.ensure_loaded()
    hook = registry.pm.hook.nnrt_check_state
    if not hook.get_hookimpls():
        return
    per_layer: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        index, _, name = key.partition(".")
        per_layer.setdefault(int(index), {})[name] = value
    for i, layer in enumerate(net.layers):
        if i in per_layer:
            hook(layer=layer, state=per_layer[i])
