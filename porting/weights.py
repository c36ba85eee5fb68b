"""A parameter blob as a caffemodel stores it (no torch here: parse stays light)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class WeightBlob:
    """One parameter blob as stored: flat float32 data plus its declared shape.

    ``shape`` is the BlobShape dims when present; otherwise ``legacy_dims`` holds the
    deprecated (num, channels, height, width). ``diff_count``: how many gradient values
    the blob stores (``double_diff`` when it has any, else ``diff``; 0 for none), which
    Caffe's ``Blob::FromProto`` requires to be 0 or the blob's count.
    """

    data: np.ndarray
    shape: tuple[int, ...] | None = None
    legacy_dims: tuple[int, int, int, int] | None = None
    diff_count: int = 0

    def declared(self) -> tuple[int, ...]:
        return self.shape if self.shape is not None else tuple(self.legacy_dims or ())

    def matches(self, target: tuple[int, ...]) -> bool:
        """Caffe's Blob::ShapeEquals: legacy 4-D dims match a shape left-padded with 1s."""
        if self.shape is not None:
            return tuple(self.shape) == tuple(target)
        if len(target) > 4:
            return False
        return tuple(self.legacy_dims) == (1,) * (4 - len(target)) + tuple(target)
