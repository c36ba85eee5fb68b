"""`porting verify` and `porting demo`: the same inputs through real Caffe and the port.

Runs the legacy stack's worker and the PyTorch port on one batch, compares every blob
forward and the objective's gradient backward, attributes each discrepancy against a
float64 evaluation, optionally adds ONNX's reference evaluator as a third opinion, and
writes DIR/report.{json,md,html}. Exit 0 when the port computes what Caffe computes
(every layer of both within float32 rounding, see porting.verify.verdict; with --strict
also every blob within its per-blob tolerance), 1 when not, 2 on bad input.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from porting import budget
from porting.errors import PortingError
from porting.files import file_digest

IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff"}


def load_input_files(files, shape: tuple[int, ...], mean_bgr=IMAGENET_MEAN_BGR) -> np.ndarray:
    """A float32 NCHW batch from .npy arrays (CHW or NCHW, the net's own preprocessing) or
    images (resized to the input's HxW with bilinear resampling, BGR, 0-255 minus ``mean_bgr``)."""
    from PIL import Image, UnidentifiedImageError

    parts = []
    for name in files:
        path = Path(name)
        if path.suffix.lower() == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise PortingError(f"cannot read array ({err})", path) from None
            arr = arr[None] if arr.ndim == len(shape) - 1 else arr
            if arr.shape[1:] != tuple(shape[1:]):
                raise PortingError(f"array shape {'x'.join(map(str, arr.shape))} does not fit the input "
                                   f"{'x'.join(map(str, shape[1:]))} (per item)", path)
            parts.append(arr.astype(np.float32))
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                with Image.open(path) as img:
                    rgb = np.asarray(img.convert("RGB").resize((shape[3], shape[2]), Image.BILINEAR), np.float32)
            except (OSError, UnidentifiedImageError) as err:
                raise PortingError(f"cannot read image ({err})", path) from None
            bgr = rgb[:, :, ::-1] - np.asarray(mean_bgr, np.float32)
            parts.append(bgr.transpose(2, 0, 1)[None])
        else:
            raise PortingError("input must be a .npy array or an image file", path)
    return np.ascontiguousarray(np.concatenate(parts))


def run_verify(prototxt, caffemodel, report_dir, input_files=(), batch=None, objective=None,
               tolerance=None, onnx=True, synsets=None, seed=0, worker=None, strict=False,
               budget=None, phase="test", input_shapes=None, dropout_seed=None) -> dict:
    """Verify a port against real Caffe and write the report; returns the report dict.
    ``budget``: the porting.budget.Budget the net must fit (default: the machine's, at
    ``batch`` with a backward). ``phase``: "test" or "train", both frameworks.
    ``input_shapes``: top name -> shape (``--input-shape``), for data layers' tops.
    ``dropout_seed``: TRAIN Dropout in both frameworks starts Caffe's generator there.
    A net with data layers runs in Caffe as ``caffe_net_with_inputs`` rewrites it (each
    data layer an Input layer of the same tops and shapes), fed the same arrays."""
    from porting.budget import Budget
    from porting.net import load_caffe
    from porting.export import onnx_opinion
    from porting.layers import LAYERS
    from porting.layers.data_layers import caffe_net_with_inputs, is_data_layer
    from porting.legacy import Worker
    from porting.report import build_report, read_synsets, top5_table, write_report
    from porting.tolerances import parse_tolerances
    from porting.verify import blob_key, parse_objective, random_inputs, verify_port
    from porting.verify.run import label_classes
    from porting.write import write_prototxt

    net = load_caffe(prototxt, caffemodel, phase=phase, budget=budget or Budget.default(batch=batch, backward=True),
                     input_shapes=input_shapes, dropout_seed=dropout_seed)
    tolerances = parse_tolerances(tolerance, known_types=LAYERS)
    obj = parse_objective(objective, net.graph)
    names = list(net.graph.inputs)
    labels = [n for n in names if label_classes(net.graph, n)]
    if input_files:
        if len(names) - len(labels) != 1:
            raise PortingError(f"--input fills one input blob; the net has {len(names)} ({', '.join(names)})", prototxt)
        first = next(n for n in names if n not in labels)
        inputs = {first: load_input_files(input_files, net.graph.inputs[first])}
        inputs.update((n, a) for n, a in random_inputs(net.graph, len(inputs[first]), seed).items() if n in labels)
        described = {"kind": "files", "files": [str(f) for f in input_files]}
        if labels:
            described["labels"] = {"kind": "random", "seed": seed}
    else:
        inputs = random_inputs(net.graph, batch, seed)
        described = {"kind": "random", "seed": seed, "distribution": "uniform [-128, 128)"}
    described["batch"] = int(next(iter(inputs.values())).shape[0])
    obj_shape = (described["batch"],) + tuple(net.graph.blob_shapes[obj.blob][1:])
    described["phase"] = phase
    own_worker = worker is None
    worker = worker or Worker()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            caffe_prototxt = prototxt
            if any(is_data_layer(s.type) for s in net.graph.layers):
                caffe_prototxt = Path(tmp) / "with_inputs.prototxt"
                write_prototxt(caffe_prototxt, caffe_net_with_inputs(net.graph))
            reference = worker.run_net(caffe_prototxt, caffemodel, inputs=inputs,
                                       top_diffs={obj.blob: obj.seed(obj_shape)}, phase=phase, seed=dropout_seed)
    finally:
        if own_worker:
            worker.close()
    others, onnx_summary = {}, None
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            others["onnx"], onnx_summary = onnx_opinion(net, inputs, tmp)
            onnx_summary.pop("file", None)
    verification, arrays = verify_port(net, dict(reference), inputs, obj, tolerances, others=others,
                                       strict=strict)
    top5 = None
    prob = next((s.tops[0] for s in reversed(net.graph.layers) if s.type == "Softmax"), None)
    if prob and blob_key(prob, "data") in reference:
        top5 = top5_table(reference[blob_key(prob, "data")], arrays["port"][blob_key(prob, "data")],
                          labels=described.get("files"), synsets=read_synsets(synsets) if synsets else None)
    about = {"name": net.graph.name, "prototxt": str(prototxt), "prototxt_sha256": file_digest(prototxt),
             "caffemodel": str(caffemodel), "caffemodel_sha256": file_digest(caffemodel)}
    if onnx_summary:
        about["onnx"] = onnx_summary
    report = build_report(verification, net=about, inputs=described, provenance=reference.provenance, top5=top5)
    write_report(report, report_dir)
    return report


def _summary(report: dict, report_dir) -> str:
    rows = report["rows"]
    failed = [r for r in rows if r.get("passed") is False]
    lines = [report.get("summary") or ("PASS" if report["passed"] else "FAIL"),
             f"{len(rows) - len(failed)}/{len(rows)} compared arrays within their per-blob tolerance"
             + ("" if report.get("strict") else " (decides only with --strict)")]
    lines.append(f"report: {Path(report_dir) / 'report.html'}")
    return "\n".join(lines)


def _verify_command(args) -> int:
    from porting.budget import from_args

    from porting.layers.data_layers import input_shapes_from_args

    report = run_verify(args.prototxt, args.caffemodel, args.report, args.input or (), args.batch,
                        args.objective, args.tolerance, not args.no_onnx, args.synsets, args.seed,
                        strict=args.strict, budget=from_args(args, batch=args.batch, backward=True),
                        phase=args.phase, input_shapes=input_shapes_from_args(args),
                        dropout_seed=args.dropout_seed)
    print(_summary(report, args.report))
    return int(report["exit_status"])


def _demo_command(args) -> int:
    """CaffeNet (our shipped MFV-form prototxt) with He-filled weights written by real Caffe."""
    from porting import models
    from porting.net import load_caffe
    from porting.legacy import Worker
    from porting.saved import save_converted

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prototxt = models.path("caffenet")
    weights = out / "caffenet_msra_seed0.caffemodel"
    with Worker() as worker:
        if not weights.exists():
            print(f"writing CaffeNet weights with real Caffe's msra filler (seed 0): {weights}")
            worker.make_weights(prototxt, weights, filler="msra", bias_filler="gaussian", bias_std=0.1, seed=0)
        converted = out / "caffenet.safetensors"
        save_converted(load_caffe(prototxt, weights), converted)
        print(f"converted: {converted}")
        print("verifying against real Caffe 1.0 (forward, fc8:498 backward, float64 attribution, ONNX)...")
        report = run_verify(prototxt, weights, out / "report", objective="fc8:498", worker=worker,
                            synsets=args.synsets)
    print(_summary(report, out / "report"))
    return int(report["exit_status"])


def add_parser(subparsers) -> None:
    from porting.layers.data_layers import add_input_shape_option

    p = subparsers.add_parser("verify", help="compare a port with real Caffe blob by blob and write a drift report")
    p.add_argument("prototxt")
    p.add_argument("caffemodel")
    p.add_argument("--input", nargs="+", metavar="FILE", help=".npy arrays (net preprocessing) or images")
    p.add_argument("--batch", type=int, help="batch size of the seeded random inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--objective", metavar="LAYER:UNIT", help="unit whose input gradient is compared "
                   "(default: the layer before the Softmax, unit 0)")
    p.add_argument("--tolerance", metavar="SPEC", help='e.g. "Convolution=1e-5,default=1e-4" or a JSON file')
    p.add_argument("--synsets", metavar="FILE", help="synset_words.txt for class names in the top-5 table")
    p.add_argument("--strict", action="store_true", help="fail also when a blob exceeds its per-blob tolerance "
                   "(depends on the CPU, the inputs and the weights: rounding amplified by the net)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX third opinion")
    p.add_argument("--report", required=True, metavar="DIR")
    p.add_argument("--phase", default="test", choices=["test", "train"], help="the net's phase, in both frameworks")
    p.add_argument("--dropout-seed", type=int, metavar="S", help="TRAIN Dropout: both frameworks start Caffe's "
                   "generator at S before the forward (caffe.set_random_seed), so their masks agree")
    add_input_shape_option(p)
    budget.add_options(p)
    p.set_defaults(func=_verify_command)

    p = subparsers.add_parser("demo", help="convert CaffeNet with generated weights and verify it")
    p.add_argument("--out", default="out/demo", metavar="DIR")
    p.add_argument("--synsets", metavar="FILE", help="synset_words.txt for class names")
    p.set_defaults(func=_demo_command)
