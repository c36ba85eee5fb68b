"""Caffe 1.0 models in PyTorch, blob for blob.

``load_caffe(prototxt, caffemodel=None, phase="test")`` returns a ``CaffeNet``
(both defined in ``porting.net``; modules inside the package import them from there).
"""
from porting.errors import PortingError
from porting.net import CaffeNet, load_caffe

__all__ = ["CaffeNet", "load_caffe", "PortingError"]
