"""Writing MFV's outputs whole or not at all (temp file in the same folder, then rename),
and the 2016 code's 8-bit conversion."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from porting.files import atomic_path


def truncating_uint8(image: np.ndarray) -> np.ndarray:
    """``np.uint8(image)`` as numpy 1.11 did it on x86-64: truncate toward zero, keep the
    low 8 bits (256.5 -> 0, -1.5 -> 255). NaN becomes 0."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return (np.trunc(values).astype(np.int64) & 0xFF).astype(np.uint8)


def _atomic(path, write) -> Path:
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def save_png(path, rgb_uint8: np.ndarray) -> Path:
    from PIL import Image

    return _atomic(path, lambda tmp: Image.fromarray(rgb_uint8).save(tmp, format="PNG"))


def save_npy(path, array: np.ndarray) -> Path:
    def write(tmp):
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    return _atomic(path, write)


def save_npz(path, **arrays: np.ndarray) -> Path:
    def write(tmp):
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return _atomic(path, write)


def save_json(path, value) -> Path:
    def write(tmp):
        with open(tmp, "w") as handle:
            json.dump(value, handle, indent=1)
            handle.write("\n")
    return _atomic(path, write)


def save_figure(path, figure) -> Path:
    return _atomic(path, lambda tmp: figure.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png",
                                                    dpi=100, bbox_inches="tight"))
