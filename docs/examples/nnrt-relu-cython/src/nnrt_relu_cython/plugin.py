"""The plugin module named by this package's ``nnrt`` entry point."""

from __future__ import annotations

import nnrt
from nnrt.hookspecs import RegisterLayer

from nnrt_relu_cython._relu import LeakyReLU, ReLU

__all__ = ["nnrt_register_layers"]


@nnrt.hookimpl
def nnrt_register_layers(register: RegisterLayer) -> None:
    """Add ``relu`` and ``leaky_relu`` to nnrt's layer registry."""
    register("relu", ReLU)
    register("leaky_relu", LeakyReLU)
