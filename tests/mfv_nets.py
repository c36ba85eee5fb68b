"""The small Caffe net the MFV tests run: CaffeNet's shape in miniature (24 x 24 BGR input,
conv1 + ReLU, fc7 + ReLU, fc8 of 6 units, prob), and its seeded weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SMALL = """
name: "small"
input: "data"
input_dim: 1
input_dim: 3
input_dim: 24
input_dim: 24
force_backward: true
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 5 stride: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc7" type: "InnerProduct" bottom: "conv1" top: "fc7" inner_product_param { num_output: 8 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 6 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def write_small_net(folder: Path) -> tuple[Path, Path]:
    """small.prototxt and small.caffemodel (weights N(0, 0.05) from RandomState(0)) in ``folder``."""
    from porting.write import write_caffemodel

    folder.mkdir(parents=True, exist_ok=True)
    prototxt = folder / "small.prototxt"
    prototxt.write_text(SMALL)
    rng = np.random.RandomState(0)
    shapes = {"conv1": [(4, 3, 5, 5), (4,)], "fc7": [(8, 4 * 7 * 7), (8,)], "fc8": [(6, 8), (6,)]}
    caffemodel = folder / "small.caffemodel"
    write_caffemodel(caffemodel, [(name, "Convolution" if name == "conv1" else "InnerProduct",
                                   [rng.normal(0, 0.05, s).astype(np.float32) for s in blob_shapes])
                                  for name, blob_shapes in shapes.items()])
    return prototxt, caffemodel
