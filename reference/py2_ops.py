"""Operations run by Python 2.7 with the 2016 libraries (numpy 1.11.0, scipy 0.17.0,
scikit-image 0.13.1, Pillow 5.1.0), the stack MFV's authors' code ran on.

Each op takes keyword arguments (arrays arrive as ndarrays, files as paths inside the
root) and returns a dict: ndarray values go to the result .npz, the rest to JSON.
Register more with ``@op()`` in a module of this folder; such ops are named
"<module>.<function>" and the module is imported on first use. Ops declared
``@op(caffe=True)`` also receive ``caffe``, a CaffeProxy (reference/caffe_proxy.py).
"""
from __future__ import absolute_import, division, print_function

import platform

import numpy as np

OPS = {}


def op(caffe=False):
    def register(fn):
        module = fn.__module__.rsplit(".", 1)[-1]
        name = fn.__name__ if module == "py2_ops" else "%s.%s" % (module, fn.__name__)
        fn.needs_caffe = caffe
        OPS[name] = fn
        return fn
    return register


def versions():
    import PIL
    import pywt
    import scipy
    import skimage
    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "skimage": skimage.__version__, "Pillow": PIL.PILLOW_VERSION, "PyWavelets": pywt.__version__}


@op()
def version():
    return versions()


@op()
def zoom(input, zoom, order=3, mode="constant", cval=0.0, prefilter=True):
    """scipy.ndimage.zoom (scipy 0.17.0): spline order ``order``, per-axis ``zoom``."""
    import scipy.ndimage
    factors = tuple(zoom) if isinstance(zoom, list) else zoom
    return {"output": scipy.ndimage.zoom(input, factors, order=order, mode=str(mode), cval=cval,
                                         prefilter=prefilter)}


@op()
def denoise_tv_bregman(image, weight, max_iter=100, eps=0.001, isotropic=True):
    """skimage.restoration.denoise_tv_bregman (scikit-image 0.13.1); float64 result."""
    from skimage.restoration import denoise_tv_bregman as tv
    return {"output": tv(image, weight, max_iter=max_iter, eps=eps, isotropic=isotropic)}


@op()
def random_normal(seed, size, loc=0.0, scale=1.0):
    """np.random.seed(seed), then np.random.normal(loc, scale, size): legacy RandomState."""
    np.random.seed(seed)
    return {"output": np.random.normal(loc, scale, tuple(size) if isinstance(size, list) else size)}


@op()
def jpeg_decode(path, mode=None):
    """Pillow 5.1.0 decodes a JPEG file: uint8 HWC (RGB order unless ``mode`` says)."""
    from PIL import Image
    image = Image.open(path)
    image.load()
    if mode:
        image = image.convert(str(mode))
    return {"output": np.asarray(image), "mode": image.mode}


@op(caffe=True)
def caffe_onehot_gradient(caffe, prototxt, x, end, unit, caffemodel=None, input="data"):
    """Gradient of blob ``end`` at channel ``unit`` (summed over the batch) w.r.t. ``input``,
    computed by Caffe through the CaffeProxy: forward to layer ``end`` (its top has the
    same name), one-hot top diff, backward to the first layer."""
    net = caffe.net(prototxt, caffemodel, force_backward=True)
    shape = (x.shape[0],) + net.blob_shapes[end][1:]
    onehot = np.zeros(shape, np.float32)
    onehot[:, unit] = 1
    out = net.step({input: x}, end=end, top_diffs={end: onehot}, fetch=[input + "/diff", end + "/data"])
    return {"gradient": out[input + "/diff"], "output": out[end + "/data"]}


def find(name):
    """The op called ``name``, importing reference.<module> for "<module>.<function>"."""
    name = str(name)
    if name not in OPS and "." in name:
        module = name.split(".", 1)[0]
        if not module.replace("_", "").isalnum():
            raise ValueError("bad op module name %r" % module)
        __import__("reference." + module)
    if name not in OPS:
        raise ValueError("unknown python2 op %r (known: %s)" % (name, ", ".join(sorted(OPS))))
    return OPS[name]
