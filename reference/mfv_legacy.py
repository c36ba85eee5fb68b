"""MFV's octave loop as the 2016 code ran it: Python 2.7 with numpy 1.11.0, scipy 0.17.0
and scikit-image 0.13.1, the net on Caffe 1.0 (reached through the CaffeProxy).

A transcription of the authors' act_max.tvd.mean.py / act_max.tvd.center.py
(Evolving-AI-Lab/mfv, 2016), kept independent of the PyTorch side on purpose: it
imports nothing from ``mfv/``. What it keeps from the original, line for line:

* ``np.random.seed(seed)``, then the h*w*3 noise draws of the start image even when a
  start image replaces it, then two ``np.random.normal`` draws per crop (rows first),
  all from numpy's global stream;
* the schedules written with ``/`` under Python 2 (this module does NOT import
  ``division`` from ``__future__``: with integer octave numbers the step stays 1);
* ``scipy.ndimage.zoom(image, (1, s, s))``, the masking loop, the in-place float32 step
  ``+= step_size/np.abs(g).mean() * g`` and the clip, with numpy 1.11's casting;
* ``skimage.restoration.denoise_tv_bregman`` of scikit-image 0.13.1 itself.

What differs is plumbing only: the net's ``data`` blob is a local float32 array
(``src_data``) and pycaffe's ``forward(end=...)`` / ``backward(start=...)`` pair is one
``CaffeProxy.step`` round trip; the loop is a generator that yields after every
iteration, so the host can take each iteration's arrays; the original's
``random_crop=False`` branch, prints and debug images are left out. Like the original,
it assumes a square net input (its crop names rows ``w``).

Images: the whole image lives in the net's layout (3 x H x W float32, BGR, 0-255 minus
the mean) throughout; start images and the final image are RGB 0-255, H x W x 3.

Ops (one run at a time: numpy's global stream is the run's stream):
  mfv_legacy.start(...)            seed, draw the noise, set the run up; no iteration yet
  mfv_legacy.advance(count, ...)   run ``count`` iterations; records and arrays
  mfv_legacy.facet(...)            a whole run in one call (snapshots every k iterations)
  mfv_legacy.tables()              the transcribed octave tables
"""
import time

import numpy as np
import scipy.ndimage as nd
from skimage.restoration import denoise_tv_bregman

from reference.py2_ops import op

if (1 / 2) != 0:
    raise ImportError("reference.mfv_legacy needs Python 2 division (it runs in the legacy stack only)")

# Hyperparams for AlexNet, as the authors' two scripts wrote them (types included)
MEAN_OCTAVES = [
    {
        'margin': 0,
        'window': 0.3,
        'iter_n': 190,
        'start_denoise_weight': 0.4,
        'end_denoise_weight': 0.4,
        'start_step_size': 1,
        'end_step_size': 2
    },
    {
        'margin': 0,
        'window': 0.3,
        'scale': 1.2,
        'iter_n': 150,
        'start_denoise_weight': 0.01,
        'end_denoise_weight': 2,
        'start_step_size': 1.,
        'end_step_size': 1.
    },
    {
        'margin': 50,
        'window': 0.2,
        'scale': 1.0,
        'iter_n': 20,
        'start_denoise_weight': 0.1,
        'end_denoise_weight': 2,
        'start_step_size': 2.,
        'end_step_size': 2.
    },
    {
        'margin': 0,
        'window': 0.3,
        'iter_n': 10,
        'start_denoise_weight': 0.4,
        'end_denoise_weight': 2,
        'start_step_size': 2.0,
        'end_step_size': 2.0
    }
]

CENTER_BIAS_OCTAVES = [
    {
        'margin': 0,
        'window': 0.3,
        'layer': 'prob',
        'iter_n': 190,
        'start_denoise_weight': 0.001,
        'end_denoise_weight': 0.05,
        'start_step_size': 11.,
        'end_step_size': 11.
    },
    {
        'margin': 0,
        'window': 0.3,
        'layer': 'prob',
        'scale': 1.2,
        'iter_n': 150,
        'start_denoise_weight': 0.01,
        'end_denoise_weight': 0.08,
        'start_step_size': 6.,
        'end_step_size': 6.
    },
    {
        'margin': 0,
        'window': 0.3,
        'layer': 'fc8',
        'scale': 1.2,
        'iter_n': 150,
        'start_denoise_weight': 0.01,
        'end_denoise_weight': 2,
        'start_step_size': 1.,
        'end_step_size': 1.
    },
    {
        'margin': 50,
        'window': 0.1,
        'layer': 'fc8',
        'scale': 1.0,
        'iter_n': 30,
        'start_denoise_weight': 0.1,
        'end_denoise_weight': 2,
        'start_step_size': 3.,
        'end_step_size': 3.
    },
    {
        'margin': 0,
        'window': 0.3,
        'layer': 'fc8',
        'iter_n': 10,
        'start_denoise_weight': 0.01,
        'end_denoise_weight': 2,
        'start_step_size': 6.,
        'end_step_size': 3.
    }
]

VARIANTS = {"mean": MEAN_OCTAVES, "center-bias": CENTER_BIAS_OCTAVES}
SNAPSHOT = ("input", "gradient", "after_step", "after_denoise")
ARRAYS = ("image",) + SNAPSHOT   # image: the whole image entering the iteration (after any zoom)

RUN = {}   # the one run in progress: {"id", "steps" (the generator), "done", "final"}


# a couple of utility functions for converting to and from Caffe's input image layout
def preprocess(bias, img):
    return np.float32(np.rollaxis(img, 2)[::-1]) - bias


def deprocess(bias, img):
    return np.dstack((img + bias)[::-1])


def make_step(net, src_data, input_name, xy, step_size=1.5, end='fc8', clip=True, unit=None,
              denoise_weight=0.1, margin=0, w=224, h=224, bias=None):
    '''Basic gradient ascent step, on src_data (the net's input blob, 1 x 3 x h x w float32).'''

    trace = {"input": src_data[0].copy()}
    one_hot = np.zeros((1,) + tuple(net.blob_shapes[end][1:]), np.float32)

    fc_layer = one_hot.ndim == 2    # the original listed fc6, fc7, fc8 (and prob); conv: 4-D blobs
    if fc_layer:
        one_hot.flat[unit] = 1.
    else:
        one_hot[:, unit, xy, xy] = 1.

    # net.forward(end=end); dst.diff[:] = one_hot; net.backward(start=end): one round trip
    started = time.time()
    out = net.step({input_name: src_data}, end=end, top_diffs={end: one_hot},
                   fetch=[input_name + "/diff", end + "/data"])
    trace["seconds_net"] = time.time() - started
    acts = out[end + "/data"]
    fc = acts[0] if fc_layer else acts[0, :, xy, xy]
    best_unit = fc.argmax()
    best_act = fc[best_unit]
    obj_act = fc[unit]

    g = out[input_name + "/diff"][0]

    # Mask out gradient to limit the drawing region
    if margin != 0:
        mask = np.zeros_like(g)

        for dx in range(0 + margin, w - margin):
            for dy in range(0 + margin, h - margin):
                mask[:, dx, dy] = 1
        g *= mask

    mean_abs = np.abs(g).mean()
    src_data[:] += step_size/np.abs(g).mean() * g

    if clip:
        src_data[:] = np.clip(src_data, -bias, 255-bias)
    trace["gradient"] = g.copy()
    trace["after_step"] = src_data[0].copy()

    # Run a separate TV denoising process on the resultant image
    asimg = deprocess(bias, src_data[0]).astype(np.float64)
    started = time.time()
    denoised = denoise_tv_bregman(asimg, weight=denoise_weight, max_iter=100, eps=1e-3)

    trace["seconds_tv"] = time.time() - started
    src_data[0] = preprocess(bias, denoised)
    trace["after_denoise"] = src_data[0].copy()

    return best_unit, best_act, obj_act, mean_abs, trace


def max_activation(net, layer, xy, base_img, octaves, unit=None, clip=True, bias=None, stop=None):
    '''Yields (record, arrays) after every iteration, then (None, final RGB image).

    stop: end after this many iterations in all (None: the whole schedule).'''

    input_name = net.inputs[0]
    # prepare base image
    image = preprocess(bias, base_img)  # (3,227,227)

    # get input dimensions from net
    h, w = net.blob_shapes[input_name][2:]
    src_data = np.zeros((1, 3, h, w), np.float32)   # the net's input blob (pycaffe's src.data)

    iter = 0
    for e, o in enumerate(octaves):
        if iter == stop:
            break
        if 'scale' in o:
            # resize by o['scale'] if it exists
            image = nd.zoom(image, (1, o['scale'], o['scale']))
        _, imw, imh = image.shape

        # select layer (the centre-bias script's octaves name theirs; the mean script's use the run's)
        end = o.get('layer', layer)

        for i in xrange(o['iter_n']):
            if iter == stop:
                break
            started = time.time()
            entering = image.copy()
            if imw > w:
                mid_x = (imw-w)/2.
                width_x = imw-w
                ox = np.random.normal(mid_x, width_x * o['window'], 1)
                ox = int(np.clip(ox, 0, imw-w))
                mid_y = (imh-h)/2.
                width_y = imh-h
                oy = np.random.normal(mid_y, width_y * o['window'], 1)
                oy = int(np.clip(oy, 0, imh-h))
                # insert the crop into src.data[0]
                src_data[0] = image[:, ox:ox+w, oy:oy+h]
            else:
                ox = 0
                oy = 0
                src_data[0] = image.copy()

            step_size = o['start_step_size'] + ((o['end_step_size'] - o['start_step_size']) * i) / o['iter_n']
            denoise_weight = o['start_denoise_weight'] - (o['start_denoise_weight'] - (o['end_denoise_weight']) * i) / o['iter_n']

            best_unit, best_act, obj_act, mean_abs, trace = make_step(
                net, src_data, input_name, xy, end=end, clip=clip, unit=unit, step_size=step_size,
                denoise_weight=denoise_weight, margin=o['margin'], w=w, h=h, bias=bias)

            # insert modified image back into original image (if necessary)
            image[:, ox:ox+w, oy:oy+h] = src_data[0]

            record = {"iteration": iter, "octave": e, "i": i, "layer": end, "image_shape": [imw, imh],
                      "crop": [ox, oy], "step_size": step_size, "denoise_weight": denoise_weight,
                      "objective": float(obj_act), "best_unit": int(best_unit), "best_value": float(best_act),
                      "mean_abs_gradient": float(mean_abs), "seconds": time.time() - started,
                      "seconds_net": trace.pop("seconds_net"), "seconds_tv": trace.pop("seconds_tv")}
            trace["image"] = entering
            yield record, trace

            iter += 1   # Increase iter

    # returning the resulting image
    yield None, deprocess(bias, image)


def _octaves(variant, octaves):
    if octaves is not None:
        return [dict((str(k), v) for k, v in o.items()) for o in octaves]
    if variant not in VARIANTS:
        raise ValueError("variant must be one of %s, not %r" % (sorted(VARIANTS), variant))
    return VARIANTS[variant]


@op(caffe=True)
def start(caffe, prototxt, unit, seed, caffemodel=None, variant="mean", octaves=None, layer="fc8", xy=0,
          start_image=None, mean=(104.0, 117.0, 123.0), iterations=None):
    """Set a run up as the original's main() does: seed, noise start image (drawn even
    when ``start_image``, an RGB 0-255 H x W x 3 array, replaces it), the net.

    octaves: a list of dicts as the original wrote them (else the ``variant``'s table);
    iterations: stop after this many (None: all). Replaces any run in progress."""
    net = caffe.net(prototxt, caffemodel, force_backward=True)
    input_name = net.inputs[0]
    original_h, original_w = net.blob_shapes[input_name][2:]

    # Set random seed
    np.random.seed(seed)

    # the background color of the initial image
    background_color = np.float32([175.0, 175.0, 175.0])

    # generate initial random image
    start = np.random.normal(background_color, 8, (original_w, original_h, 3))
    if start_image is not None:
        start = np.float32(start_image)

    bias = np.float32(mean)[:, np.newaxis, np.newaxis]   # net.transformer.mean['data']
    table = _octaves(variant, octaves)
    RUN.clear()
    RUN.update({"id": "%s-%d-%d-%f" % (variant, unit, seed, time.time()), "done": False, "final": None,
                "total": sum(o['iter_n'] for o in table) if iterations is None
                else min(int(iterations), sum(o['iter_n'] for o in table)),
                "steps": max_activation(net, layer, xy, start, table, unit=unit, bias=bias,
                                        stop=None if iterations is None else int(iterations))})
    return {"run": RUN["id"], "total": RUN["total"], "start": np.asarray(start), "input_blob": input_name}


@op()
def advance(run, count=1, every=1, fetch=ARRAYS):
    """Run up to ``count`` more iterations of run ``run``.

    Returns ``records`` (one dict per iteration), ``done`` and, for every iteration whose
    number is a multiple of ``every`` (and the run's last), the arrays named in ``fetch``
    (of ``ARRAYS``) as "<iteration:04d>/<name>"; when the run ends, ``final`` (RGB 0-255,
    H x W x 3 float32)."""
    if RUN.get("id") != run:
        raise ValueError("no run %r in progress (the Python 2 worker restarted, or another run replaced it)"
                         % (run,))
    unknown = sorted(set(fetch) - set(ARRAYS))
    if unknown:
        raise ValueError("fetch: unknown arrays %s (known: %s)" % (unknown, ", ".join(ARRAYS)))
    result = {"records": [], "done": RUN["done"]}
    for _ in xrange(int(count)):
        if RUN["done"]:
            break
        record, arrays = next(RUN["steps"])
        if record is None:
            RUN["done"], RUN["final"] = True, arrays
            break
        result["records"].append(record)
        n = record["iteration"]
        if n % int(every) == 0 or n == RUN["total"] - 1:
            for name in fetch:
                result["%04d/%s" % (n, name)] = arrays[name]
    if not RUN["done"] and result["records"] and result["records"][-1]["iteration"] == RUN["total"] - 1:
        record, arrays = next(RUN["steps"])   # the generator's final yield: no more work
        RUN["done"], RUN["final"] = True, arrays
    result["done"] = RUN["done"]
    if RUN["done"]:
        result["final"] = RUN["final"]
    return result


@op()
def tables():
    """The transcribed octave tables, by variant name (numbers keep their int or float type)."""
    return {"tables": VARIANTS}


@op(caffe=True)
def facet(caffe, prototxt, unit, seed, caffemodel=None, variant="mean", octaves=None, layer="fc8", xy=0,
          start_image=None, mean=(104.0, 117.0, 123.0), iterations=None, every=0):
    """A whole run in one call: ``records``, ``final`` and the snapshot arrays (``SNAPSHOT``)
    every ``every`` iterations plus the first and last (0: none)."""
    begun = start(caffe, prototxt, unit, seed, caffemodel=caffemodel, variant=variant, octaves=octaves,
                  layer=layer, xy=xy, start_image=start_image, mean=mean, iterations=iterations)
    done = advance(begun["run"], count=begun["total"] + 1, every=every or begun["total"] + 1,
                   fetch=SNAPSHOT if every else ())
    RUN.clear()
    return done
