"""ONNX export of a port, its check, and its evaluation by ONNX's reference evaluator.

A third opinion where it is cheap: the port is traced by torch's TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``; the newer dynamo exporter needs the
``onnxscript`` package, which this project does not install; ``aten::avg_pool2d`` gets its
own symbolic because the stock one drops ``divisor_override``), checked with
``onnx.checker.check_model(full_check=True)``, and run by ``onnx.reference.ReferenceEvaluator``,
whose kernels are plain NumPy written independently of torch. The ONNX graph is the port's
own semantics traced, so it tells torch's arithmetic apart from NumPy's, not the port's
reading of Caffe from Caffe's.

Every layer output is a graph output named ``top/<layer>/<i>`` (the pre-in-place value);
the model's metadata ``caffe_blob_views`` maps each blob name to the output holding its
final value, so ``onnx_arrays`` returns the same keys as the legacy worker
(``top/<layer>/<i>/data``, ``blob/<name>/data``). Forward only. The exported shapes are
those of the example inputs (batch included), and so is every Python decision a layer
takes on its values: the run-time checks (a label or index outside its range is a
PortingError in the port) are not in the graph, and a layer whose tops' first dim depends
on the values (``first_dim_at_run_time``: Filter) is refused, naming it, since layers below
it keep the traced example's shapes.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from porting import budget
from porting.errors import PortingError
from porting.files import write_atomic

OPSET = 17
BLOB_VIEWS_KEY = "caffe_blob_views"


class _AllTops(torch.nn.Module):
    """The net as a function of its inputs returning every layer output, in layer order."""

    def __init__(self, net, input_names: list[str]):
        super().__init__()
        self.net = net
        self.input_names = input_names

    def forward(self, *inputs):
        self.net(**dict(zip(self.input_names, inputs)))
        return tuple(t for tops in self.net.layer_outputs.values() for t in tops)


def _avg_pool2d_symbolic(g, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override=None):
    """aten::avg_pool2d -> ONNX AveragePool, honouring ``divisor_override``.

    torch's TorchScript exporter (opset >= 10) drops ``divisor_override`` without a word, so
    a window sum written as ``avg_pool2d(..., divisor_override=1)`` (the port's AVE pooling,
    which then divides by Caffe's own divisor map) would come out divided by kh*kw. Here the
    AveragePool result is multiplied back by kh*kw / divisor.
    """
    from torch.onnx import symbolic_helper as sh

    kernel = list(sh._get_const(kernel_size, "is", "kernel_size"))
    strides = list(sh._get_const(stride, "is", "stride")) or kernel
    pads = list(sh._get_const(padding, "is", "padding"))
    ceil = sh._get_const(ceil_mode, "i", "ceil_mode")
    include_pad = sh._get_const(count_include_pad, "i", "count_include_pad")
    divisor = None if sh._is_none(divisor_override) else sh._get_const(divisor_override, "i", "divisor_override")
    out = g.op("AveragePool", input, kernel_shape_i=kernel, strides_i=strides, pads_i=pads + pads,
               ceil_mode_i=ceil, count_include_pad_i=include_pad)
    if divisor:
        if any(pads) or ceil:
            sh._unimplemented("avg_pool2d", "divisor_override with padding or ceil_mode")
        factor = torch.tensor(math.prod(kernel) / divisor, dtype=torch.float32)
        out = g.op("Mul", out, g.op("Constant", value_t=factor))
    return out


@contextlib.contextmanager
def _quiet_output():
    """File descriptors 1 and 2 go to the null device: torch's exporter prints the whole
    TorchScript graph (to stdout) when it fails, its ONNX log being switched on by the
    exporter itself; the failure is reported as one PortingError line instead."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _refuse_untraceable(net, path) -> None:
    from porting.errors import shown

    for spec in net.graph.layers:
        if getattr(spec.module, "first_dim_at_run_time", False):
            raise PortingError(f"layer {shown(spec.name)} ({shown(spec.type)}) cannot be exported: its tops' first "
                               "dim is decided by the values at run time, and a traced graph keeps the example's "
                               "shapes below it", path, "ONNX export")


def _output_names(net) -> tuple[list[str], dict[str, str]]:
    names, views = [], {}
    for spec in net.graph.layers:
        for i, top in enumerate(spec.tops):
            names.append(f"top/{spec.name}/{i}")
            views[top] = f"top/{spec.name}/{i}"
    return names, views


def example_inputs(net, batch: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    from porting.verify import random_inputs

    return random_inputs(net.graph, batch=batch, seed=seed)


def export_onnx(net, path: str | os.PathLike, inputs: Mapping[str, np.ndarray] | None = None,
                batch: int | None = None, opset: int = OPSET) -> Path:
    """Write ``net`` (a float32 CaffeNet) to ``path`` as ONNX; returns the path.

    ``inputs`` fixes the traced shapes (default: the net's input shapes, ``batch`` replacing
    the first dimension). The file is written to a temporary name and renamed. A net the
    exporter cannot trace is a PortingError naming the exporter's complaint (or the layer:
    a check of the example inputs, a layer with a run-time first dim).
    """
    path = Path(path)
    _refuse_untraceable(net, path)
    inputs = dict(inputs) if inputs is not None else example_inputs(net, batch)
    input_names = list(net.graph.inputs)
    missing = [n for n in input_names if n not in inputs]
    if missing:
        raise PortingError(f"no example array for input blob(s) {', '.join(missing)}", place="ONNX export")
    args = tuple(torch.as_tensor(np.asarray(inputs[n], np.float32)) for n in input_names)
    output_names, views = _output_names(net)
    buf = io.BytesIO()
    kept = net.layer_outputs
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_output():
            warnings.simplefilter("ignore")
            torch.onnx.register_custom_op_symbolic("aten::avg_pool2d", _avg_pool2d_symbolic, opset)
            torch.onnx.export(_AllTops(net, input_names).eval(), args, buf, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, do_constant_folding=True)
    except Exception as err:  # the exporter's own error types vary by torch version
        raise PortingError(f"torch.onnx.export failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                           path, "ONNX export") from None
    finally:
        net.layer_outputs = kept
        torch.onnx.unregister_custom_op_symbolic("aten::avg_pool2d", opset)
    import onnx

    model = onnx.load_from_string(buf.getvalue())
    for out, name in zip(model.graph.output, output_names):
        if out.name != name:  # a weight returned as it is (a Parameter layer's top) keeps its initializer name
            model.graph.node.append(onnx.helper.make_node("Identity", [out.name], [name]))
            out.name = name
    entry = model.metadata_props.add()
    entry.key, entry.value = BLOB_VIEWS_KEY, json.dumps(views)
    data = model.SerializeToString()
    write_atomic(path, data)
    return path


def check_onnx(path: str | os.PathLike) -> dict:
    """Run ``onnx.checker.check_model(full_check=True)``; PortingError if it objects.

    Returns a summary: opset, node count by op type, inputs and number of outputs.
    """
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise PortingError(f"onnx.checker: {str(err).splitlines()[0]}", path) from None
    except OSError as err:
        raise PortingError(f"cannot read ONNX file: {err.strerror}", path) from None
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "ops": dict(sorted(ops.items())), "inputs": [i.name for i in model.graph.input],
            "outputs": len(model.graph.output), "onnx": onnx.__version__}


def onnx_arrays(path: str | os.PathLike, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate the exported model with ``onnx.reference.ReferenceEvaluator`` (float32).

    Returns ``top/<layer>/<i>/data`` for every output and ``blob/<name>/data`` for every
    blob's final value, as the legacy worker keys them.
    """
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    views = {}
    for entry in model.metadata_props:
        if entry.key == BLOB_VIEWS_KEY:
            views = json.loads(entry.value)
    feeds = {i.name: np.ascontiguousarray(inputs[i.name], np.float32) for i in model.graph.input}
    names = [o.name for o in model.graph.output]
    outs = ReferenceEvaluator(model).run(names, feeds)
    arrays = {f"{name}/data": np.asarray(value) for name, value in zip(names, outs)}
    for blob, name in views.items():
        if f"{name}/data" in arrays:
            arrays[f"blob/{blob}/data"] = arrays[f"{name}/data"]
    return arrays


def onnx_opinion(net, inputs: Mapping[str, np.ndarray], folder: str | os.PathLike) -> tuple[dict, dict]:
    """Export, check and evaluate in one go: (arrays keyed like the worker's, check summary).

    The ONNX file is ``folder/port.onnx``.
    """
    path = export_onnx(net, Path(folder) / "port.onnx", inputs)
    summary = check_onnx(path)
    summary["file"] = str(path)
    return onnx_arrays(path, inputs), summary


# --------------------------------------------------------------------------------------
# CLI: porting export
# --------------------------------------------------------------------------------------

def _export_command(args) -> int:
    from porting.budget import from_args
    from porting.net import load_caffe
    from porting.verify import blob_metrics, port_arrays

    from porting.layers.data_layers import input_shapes_from_args

    net = load_caffe(args.prototxt, args.caffemodel, budget=from_args(args, batch=args.batch),
                     input_shapes=input_shapes_from_args(args))
    inputs = example_inputs(net, args.batch, args.seed)
    path = export_onnx(net, args.onnx, inputs, opset=args.opset)
    summary = check_onnx(path)
    ops = ", ".join(f"{k} {v}" for k, v in summary["ops"].items())
    print(f"wrote {path}: opset {summary['opset']}, {summary['outputs']} outputs; onnx.checker: ok")
    print(f"ops: {ops}")
    if args.compare:
        ours, theirs = port_arrays(net, inputs), onnx_arrays(path, inputs)
        worst = max(((blob_metrics(theirs[k], ours[k]).max_rel, k) for k in ours if k in theirs
                     and k.startswith("top/")), default=(0.0, ""))
        print(f"ReferenceEvaluator vs port on seeded inputs (seed {args.seed}): largest relative "
              f"difference {worst[0]:.3g} at {worst[1]}")
    return 0


def add_parser(subparsers) -> None:
    """``porting export PROTOTXT [CAFFEMODEL] --onnx OUT.onnx [--batch N] [--compare]``."""
    from porting.layers.data_layers import add_input_shape_option

    p = subparsers.add_parser("export", help="export the port to ONNX and check it",
                              description="Trace the port to ONNX (TorchScript exporter), check it with "
                                          "onnx.checker, optionally compare ONNX's reference evaluator "
                                          "with the port on seeded random inputs.")
    p.add_argument("prototxt")
    p.add_argument("caffemodel", nargs="?")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX model")
    p.add_argument("--batch", type=int, default=None, help="batch size to trace (default: the prototxt's)")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--seed", type=int, default=0, help="seed of the example inputs (default 0)")
    p.add_argument("--compare", action="store_true",
                   help="also run ONNX's reference evaluator and report its largest difference to the port")
    add_input_shape_option(p)
    budget.add_options(p)
    p.set_defaults(func=_export_command)
