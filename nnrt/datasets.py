"""Datasets that ship with nnrt (no downloads).

``load_digits()`` returns the 8x8 handwritten digits (1797 samples, 10 classes;
UCI "Optical Recognition of Handwritten Digits", CC BY 4.0, via scikit-learn;
see ``nnrt/data/LICENSE-digits.txt``).
"""

from __future__ import annotations

from importlib import resources

import numpy as np

__all__ = ["load_digits"]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits as ``(X, y)``: X float64 (1797, 64) with pixels 0..16, y int64 (1797,)."""
    ref = resources.files("nnrt").joinpath("data", "digits.npz")
    with ref.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
        images = np.asarray(data["images"])
        labels = np.asarray(data["labels"])
    X = images.reshape(images.shape[0], -1).astype(np.float64)
    y = labels.astype(np.int64)
    return X, y
