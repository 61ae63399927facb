"""Type stub for the compiled ``nnrt_plugins._dense_nobias`` module (``_dense_nobias.pyx``)."""

from nnrt.dense import Dense

class DenseNoBias(Dense):
    """Fully connected layer without bias, ``Y = X @ W`` (registry name ``dense_nobias``)."""

    def __init__(self, in_features: int, out_features: int) -> None: ...
