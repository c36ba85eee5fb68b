"""How images enter and leave a network: RGB 0-255, height x width x 3 <-> net input.

A ``Preprocessing`` describes a net's input: its channel order ("BGR" for Caffe
models, "RGB" for most torch models), the value range its pixels are scaled to
(255 for 0-255, 1 for 0-1), the per-channel mean subtracted and std divided (both in
the net's channel order and value range) and the input size. The net-side array is
float32, channels first (3 x H x W, no batch axis):

    x = (p * value_range / 255 - mean) / std        (p: pixel, 0-255)

MFV works in pixels: its step size is in grey levels and its clip keeps every pixel in
0-255, so a net with std != 1 or range 1 steps by ``pixel_scale()`` (see
``mfv.step.apply_step``) and clips to ``bounds()``. ``mfv.model`` reads a
``Preprocessing`` from the command line.

For CaffeNet (``CAFFENET``) this is exactly the 2016 code's conversion:
``float32(BGR planes) - mean`` with a float32 mean of [104, 117, 123], and back with
``planes + mean`` in RGB order, H x W x 3, float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Preprocessing:
    channel_order: str = "BGR"
    mean: tuple[float, float, float] = (104.0, 117.0, 123.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    value_range: float = 255.0
    input_size: tuple[int, int] = (227, 227)   # (height, width)

    def __post_init__(self):
        if self.channel_order not in ("BGR", "RGB"):
            raise ValueError(f"channel_order must be 'BGR' or 'RGB', not {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need three values, std positive")
        if not self.value_range > 0:
            raise ValueError(f"value_range must be positive, not {self.value_range!r}")
        if len(self.input_size) != 2 or any(int(n) != n or n < 1 for n in self.input_size):
            raise ValueError(f"input_size must be two positive integers (height, width), not {self.input_size!r}")

    @property
    def _identity_scale(self) -> bool:
        return self.value_range == 255.0 and all(s == 1.0 for s in self.std)

    def _column(self, values) -> np.ndarray:
        return np.asarray(values, dtype=np.float32).reshape(3, 1, 1)

    def to_net(self, rgb: np.ndarray) -> np.ndarray:
        """RGB 0-255 (H x W x 3, any real dtype) -> float32 net input (3 x H x W)."""
        planes = np.rollaxis(np.asarray(rgb), 2)
        if self.channel_order == "BGR":
            planes = planes[::-1]
        planes = np.float32(planes)
        if self._identity_scale:
            return planes - self._column(self.mean)
        return (planes * np.float32(self.value_range / 255.0) - self._column(self.mean)) / self._column(self.std)

    def from_net(self, x: np.ndarray) -> np.ndarray:
        """float32 net input (3 x H x W) -> RGB 0-255, H x W x 3, float32."""
        if self._identity_scale:
            planes = x + self._column(self.mean)
        else:
            planes = (x * self._column(self.std) + self._column(self.mean)) / np.float32(self.value_range / 255.0)
        if self.channel_order == "BGR":
            planes = planes[::-1]
        return np.dstack(planes)

    def pixel_scale(self) -> np.ndarray | None:
        """d(net input)/d(pixel) per channel in the net's order: value_range / 255 / std,
        (3, 1, 1) float32; None when it is 1 (value range 255, std 1: CaffeNet), so such
        nets step with the 2016 arithmetic unchanged (``mfv.step.apply_step``)."""
        if self._identity_scale:
            return None
        return np.float32(self.value_range / 255.0) / self._column(self.std)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Net-space images of RGB 0 and 255 per channel, (3, 1, 1) float32 each.

        For CaffeNet: (-mean, 255 - mean), the 2016 code's clip.
        """
        if self._identity_scale:
            mean = self._column(self.mean)
            return -mean, np.float32(255) - mean
        return self.to_net(np.zeros((1, 1, 3))), self.to_net(np.full((1, 1, 3), 255.0))


CAFFENET = Preprocessing()
