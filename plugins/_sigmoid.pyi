"""Type stub for the compiled ``nnrt_plugins._sigmoid`` module (``_sigmoid.pyx``)."""

from nnrt.layer import Layer

class Sigmoid(Layer):
    """Element-wise logistic sigmoid (registry name ``sigmoid``); keeps the width.

    ``in_features`` and ``out_features`` are None.
    """

    def __init__(self) -> None: ...
