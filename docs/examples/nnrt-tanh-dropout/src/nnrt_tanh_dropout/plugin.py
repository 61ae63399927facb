"""The plugin module named by this package's ``nnrt`` entry point."""

from __future__ import annotations

import nnrt
from nnrt.hookspecs import RegisterLayer

from nnrt_tanh_dropout.layers import Dropout, Tanh

__all__ = ["nnrt_register_layers"]


@nnrt.hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    """Add ``tanh`` and ``dropout`` to nnrt's layer registry."""
    register("tanh", Tanh)
    register("dropout", Dropout)
