"""Caffe 1.0 models in PyTorch, blob for blob.

``load_caffe(prototxt, caffemodel=None, phase="test")`` returns a ``CaffeNet``
(both defined in ``porting.net``; modules inside the package import them from there).
Both are loaded on first use, so importing the package alone (as pytest does for the
plugin, ``porting.pytest_plugin``) loads neither torch nor the layers.
"""
from porting.errors import PortingError

__all__ = ["CaffeNet", "load_caffe", "PortingError"]


def __getattr__(name):
    if name in ("CaffeNet", "load_caffe"):
        from porting import net

        return getattr(net, name)
    raise AttributeError(f"module 'porting' has no attribute {name!r}")
