"""Caffe 1.0 models in PyTorch, blob for blob.

``load_caffe(prototxt, caffemodel=None, phase="test")`` returns a ``CaffeNet``.
"""
from __future__ import annotations

import os

from porting.errors import PortingError


def load_caffe(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None, phase: str = "test"):
    """Parse a prototxt (any Caffe 1.0 format) and optional caffemodel into a CaffeNet."""
    from porting.graph import build_graph
    from porting.net import CaffeNet
    from porting.parse import read_caffemodel, read_prototxt
    from porting.upgrade import upgrade_net

    net = upgrade_net(read_prototxt(prototxt), source=prototxt)
    weights = read_caffemodel(caffemodel) if caffemodel is not None else None
    return CaffeNet(build_graph(net, phase, weights, source=prototxt))


__all__ = ["load_caffe", "PortingError"]
