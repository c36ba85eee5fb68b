"""`mfv` command line: mean images of a class (`mfv means`), facet visualisations
(`mfv facet`) on a Caffe model loaded by `porting`, and a facet run on real Caffe 1.0
in the 2016 stack compared with the PyTorch port step by step (`mfv compare`).

Exit status: 0 success, 1 internal error, 2 bad input (one line on stderr naming the
file, the place and the problem).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from porting.cli import run_command
from porting.errors import PortingError


def _mean_triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers (B,G,R), got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _load_net(args):
    """The net of --prototxt/--caffemodel (a port) or --model/--preprocessing (a torch
    module), after setting torch's threads (``mfv.device.configure``, --threads)."""
    from porting.net import load_caffe

    from mfv.device import configure
    from mfv.model import load_model, parse_preprocessing
    from mfv.step import FacetNet

    if (args.prototxt is None) == (args.model is None):
        raise PortingError("give the net as --prototxt (a Caffe model) or --model (a torch module), one of them")
    if args.model is not None:
        if getattr(args, "command", None) == "compare":
            raise PortingError("mfv compare runs the net on Caffe too and needs --prototxt", place="--model")
        if args.caffemodel is not None:
            raise PortingError("--caffemodel goes with --prototxt; a --model's factory loads its own weights")
        if args.preprocessing is None:
            raise PortingError("--model needs --preprocessing (a preset: torchvision, caffenet; "
                               "KIND:MEAN:STD:SIZE; or a .json file)")
    elif args.preprocessing is not None:
        raise PortingError("--preprocessing goes with --model; a Caffe net's input is its prototxt's and --mean's")
    preprocessing = parse_preprocessing(args.preprocessing) if args.model is not None else None
    threads = configure(args.threads, str(getattr(args, "device", None) or "cpu"))
    if args.model is not None:
        net, source = load_model(args.model, preprocessing), args.model
    else:
        if args.caffemodel is None:
            print("mfv: no --caffemodel: the net's weights are all zero", file=sys.stderr)
        net, source = FacetNet.from_caffe(load_caffe(args.prototxt, args.caffemodel), mean=args.mean), args.prototxt
    names = net.layer_names()
    for layer in [args.layer] + getattr(args, "octave_layers", []):
        if layer not in names:
            raise PortingError(f"no layer named {layer!r} (layers: {', '.join(names)})", source)
    print(threads, file=sys.stderr)
    return net


def check_units(net, layer: str, units, place: str) -> None:
    """PortingError (at ``place``) unless every unit is a channel of ``layer``'s output."""
    import torch

    height, width = net.preprocessing.input_size
    with torch.no_grad():
        count = net.layer_output(torch.zeros((1, 3, height, width), device=net.device), layer).shape[1]
    bad = [u for u in units if not 0 <= u < count]
    if bad:
        raise PortingError(f"unit {bad[0]} is out of range: {layer} has {count} units", place=place)


def _means(args) -> int:
    from mfv.device import torch_device
    from mfv.means import class_images, class_means, facet_means, list_classes

    device = torch_device(args.device)
    if args.classes_root is None:
        if not args.images:
            raise PortingError("give image files or folders (one class), or --classes-root DIR (many)")
        if args.synsets or args.address or args.no_ray:
            raise PortingError("--synsets, --address and --no-ray go with --classes-root")
        net = _load_net(args)
        net.module.to(device)
        result = facet_means(net, args.images, args.out, layer=args.layer, k=args.k, m=args.m, seed=args.seed,
                             batch_size=args.batch_size, progress=not args.no_progress)
        sizes = [int((result.clusters.labels == c).sum()) for c in range(args.k)]
        print(f"{len(result.paths)} images, {args.layer} codes, {args.k} clusters of sizes {sizes}")
        print(f"wrote {len(result.files)} files to {args.out}")
        return 0
    from mfv.distributed import session

    if args.images:
        raise PortingError("give images (one class) or --classes-root (many), not both")
    classes = class_images(list_classes(args.classes_root, args.synsets, exclude=[args.out]), args.k)
    with session(args.address, num_cpus=args.cpus, enabled=not args.no_ray) as ray:
        net = _load_net(args)
        net.module.to(device)
        result = class_means(net, classes, args.out, layer=args.layer, k=args.k, m=args.m, seed=args.seed,
                             batch_size=args.batch_size, ray=ray, progress=not args.no_progress)
    left_out = sum(len(v) for v in result.left_out.values())
    print(f"{len(classes)} classes: {len(result.clustered)} clustered, {len(result.up_to_date)} up to date, "
          f"{len(result.failed)} failed; {result.encoded} images through the net ({args.layer} codes cached), "
          f"{left_out} unreadable left out; outputs in {args.out}/<class>/")
    if result.failed:
        first = next(iter(result.failed))
        raise PortingError(f"{len(result.failed)} classes could not be clustered (first: {first}: "
                           f"{result.failed[first]}); a rerun redoes only them", args.classes_root)
    return 0


def _facet(args) -> int:
    import numpy as np

    from mfv import schedule
    from mfv.loop import run_facet, save_facet
    from mfv.means import load_rgb

    variant = args.variant or ("center-bias" if args.init == "noise" else "mean")
    octaves = schedule.octaves_for(variant)
    args.octave_layers = sorted({o.layer for o in octaves if o.layer})
    net = _load_net(args)
    start = None
    if args.init != "noise" and args.mode == "faithful" and args.init.lower().endswith((".jpg", ".jpeg")):
        print("mfv: note: JPEG decoders differ: today's Pillow and the 2016 stack's Pillow 5.1.0 decode "
              "chroma-subsampled JPEGs differently (up to 10 grey levels on the authors' mean images); "
              "start from a PNG for a start image both sides read alike", file=sys.stderr)
    if args.init != "noise":
        start = load_rgb(args.init).astype(np.float32)
        height, width = net.preprocessing.input_size
        if start.shape[0] < height or start.shape[1] < width:
            raise PortingError(f"start image is {start.shape[1]}x{start.shape[0]}, smaller than the "
                               f"net's {width}x{height} input", args.init)
    result = run_facet(net, args.unit, args.seed, octaves, start=start, layer=args.layer, xy=args.xy,
                       mode=args.mode, snapshot_every=args.snapshot_every, progress=not args.no_progress)
    name = args.name or f"facet_{args.layer}_{args.unit:04d}_{variant}_{args.mode}_seed{args.seed}"
    paths = save_facet(result, args.out, name)
    last = result.records[-1]
    print(f"unit {args.unit} of {args.layer} ({variant}, {args.mode}): {len(result.records)} iterations, "
          f"final objective {last.objective:.3f}, best unit {last.best_unit} ({last.best_value:.3f})")
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _facets(args) -> int:
    import time

    from mfv import schedule
    from mfv.batch import load_means, parse_units, run_facets
    from mfv.device import torch_device
    from mfv.loop import save_facet

    units = parse_units(args.units) if args.units is not None else [args.unit]
    torch_device(args.device)
    if args.iterations is not None and args.iterations < 1:
        raise PortingError(f"--iterations must be at least 1, not {args.iterations}")
    if args.units_per_batch < 1:
        raise PortingError(f"--units-per-batch must be at least 1, not {args.units_per_batch}")
    means = load_means(args.means)
    octaves = schedule.MEAN_OCTAVES
    args.octave_layers = sorted({o.layer for o in octaves if o.layer})
    net = _load_net(args)
    height, width = net.preprocessing.input_size
    for path, rgb in means:
        if rgb.shape[0] < height or rgb.shape[1] < width:
            raise PortingError(f"mean image is {rgb.shape[1]}x{rgb.shape[0]}, smaller than the net's "
                               f"{width}x{height} input", path)
    net.module.to(args.device)
    check_units(net, args.layer, units, "--units" if args.units is not None else "--unit")
    names = f"{means[0][0].name}..{means[-1][0].name}" if len(means) > 1 else means[0][0].name
    for first in range(0, len(units), args.units_per_batch):
        group = units[first:first + args.units_per_batch]
        tasks = [(unit, args.seed, rgb) for unit in group for _, rgb in means]
        began = time.perf_counter()
        label = f"unit {group[0]}" if len(group) == 1 else f"units {group[0]}..{group[-1]}"
        results = run_facets(net, tasks, octaves, layer=args.layer, xy=args.xy, mode=args.mode,
                             snapshot_every=args.snapshot_every, progress=not args.no_progress,
                             iterations=args.iterations, desc=f"{label}: {len(tasks)} facets")
        seconds = time.perf_counter() - began
        for u, unit in enumerate(group):
            mine = results[u * len(means):(u + 1) * len(means)]
            out = Path(args.out) / str(unit)
            for k, result in enumerate(mine):
                save_facet(result, out, f"facet_{args.layer}_{unit:04d}_mean_{k}_{args.mode}_seed{args.seed}")
            finals = [r.records[-1].objective for r in mine]
            hits = sum(r.records[-1].best_unit == unit for r in mine)
            print(f"unit {unit} of {args.layer} (mean, {args.mode}, seed {args.seed}): {len(mine)} facets from "
                  f"{names}, {len(mine[0].records)} iterations, final objective {min(finals):.3f}..{max(finals):.3f}, "
                  f"best unit {unit} in {hits} of {len(mine)}, {seconds / len(group):.1f} s; wrote {out}")
    return 0


def _compare(args) -> int:
    from porting.legacy import Worker

    from mfv import schedule
    from mfv.compare import compare_facet, summarize
    from mfv.means import load_rgb
    from mfv.report import write_report

    variant = args.variant or ("center-bias" if args.init == "noise" else "mean")
    octaves = schedule.octaves_for(variant)
    args.octave_layers = sorted({o.layer for o in octaves if o.layer})
    if args.iterations is not None and args.iterations < 1:
        raise PortingError(f"--iterations must be at least 1, not {args.iterations}")
    if args.every < 1:
        raise PortingError(f"--every must be at least 1, not {args.every}")
    net = _load_net(args)
    start = None
    if args.init != "noise":
        # decoded once, here, and handed to both sides: JPEG decoders of 2018 and today differ
        start = load_rgb(args.init)
        height, width = net.preprocessing.input_size
        if start.shape[0] < height or start.shape[1] < width:
            raise PortingError(f"start image is {start.shape[1]}x{start.shape[0]}, smaller than the "
                               f"net's {width}x{height} input", args.init)

    def say(text: str) -> None:
        if not args.no_progress:
            print(f"mfv compare: {text}", file=sys.stderr)

    with Worker() as worker:
        comparison = compare_facet(worker, args.prototxt, args.caffemodel, args.unit, args.seed, octaves,
                                   start=start, layer=args.layer, xy=args.xy, mean=args.mean, sync=args.sync,
                                   iterations=args.iterations, every=args.every, modern=not args.no_modern,
                                   sources=not args.no_sources, progress=not args.no_progress, net=net,
                                   keep=args.keep_arrays, log=say, floor=not args.no_floor)
    paths = write_report(comparison, args.out)

    def g(value) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    for name, run in comparison.runs.items():
        s = summarize(run)
        final = s["final"] or {}
        first = s["first_beyond_rounding"]
        print(f"{name} ({'synchronised' if run.sync else 'free-running'}): {s['iterations']} iterations, crops "
              f"{'identical' if s['crops_identical'] else 'DIFFER'}, step sizes "
              f"{'identical' if s['step_sizes_identical'] else 'DIFFER'}, objective max rel "
              f"{g(s['objective_max_rel'])}, after-step max |diff| {g(s['after_step_max_abs'])} grey levels "
              f"({s['gradient_departures']} iterations with a departing gradient), first beyond float32 rounding: "
              f"{first['iteration'] if first else 'never'}, final SSIM {g(final.get('ssim'))}")
    floor = comparison.floor
    if floor and floor.get("verdict"):
        d = floor["caffe_vs_caffe"]
        print(f"Caffe vs Caffe (OpenBLAS {floor['kernels']['other']['core']} against "
              f"{floor['kernels']['reference']['core']}): final SSIM {g(d['ssim'])}, max |diff| {g(d['max_abs'])}, "
              f"mean |diff| {g(d['mean_abs'])} grey levels")
        print(floor["verdict"]["sentence"])
    print(f"wrote {paths['html']} and {paths['json']}")
    return 0


def _common(p: argparse.ArgumentParser, layer: str) -> None:
    p.add_argument("--prototxt", help="deploy prototxt (any Caffe 1.0 format); or --model")
    p.add_argument("--caffemodel", help="trained weights (without: all-zero weights)")
    p.add_argument("--model", metavar="SPEC", help="a torch module instead of --prototxt: package.module:FACTORY or "
                                                   "FILE.py:FACTORY (runs that code); layers are submodule names")
    p.add_argument("--preprocessing", metavar="P", help="with --model: its input, a preset (torchvision, caffenet), "
                                                        "KIND:MEAN:STD:SIZE (rgb01:0.485,0.456,0.406:0.229,0.224,0.225:224) "
                                                        "or a .json file")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: the cores available, at most 16)")
    p.add_argument("--layer", default=layer, help=f"layer to read (default {layer})")
    p.add_argument("--mean", type=_mean_triple, default=(104.0, 117.0, 123.0),
                   help="B,G,R mean subtracted from 0-255 pixels (default 104,117,123)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    """Add `means` and `facet` to an argparse subparsers object."""
    p = subparsers.add_parser("means", help="cluster a class's images (or many classes', --classes-root) and "
                                            "write the clusters' mean images")
    _common(p, "fc7")
    p.add_argument("images", nargs="*", help="image files and/or folders of images (one class)")
    p.add_argument("--classes-root", metavar="DIR",
                   help="one folder of images per class: each class's outputs in OUT/<class>/, its codes cached there "
                        "(reclustering needs no forward pass), classes already done with the same parameters skipped")
    p.add_argument("--synsets", metavar="FILE",
                   help="with --classes-root: the classes, one a line in unit order ('n01440764 tench, ...')")
    p.add_argument("-k", type=int, default=10, help="clusters (default 10)")
    p.add_argument("-m", type=int, default=15, help="images averaged per cluster (default 15)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", default="cpu", help="torch device of the net: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--address", help="with --classes-root: cluster the classes on this Ray cluster "
                                     "(default: a local one started here)")
    p.add_argument("--cpus", type=_positive_int, default=2, help="CPUs of the local Ray cluster (default 2)")
    p.add_argument("--no-ray", action="store_true", help="with --classes-root: cluster in this process")
    p.set_defaults(func=_means)

    p = subparsers.add_parser("facet", help="visualise one facet of a unit by activation maximisation")
    _common(p, "fc8")
    p.add_argument("--unit", type=int, required=True, help="unit (channel) to maximise")
    p.add_argument("--xy", type=int, default=0, help="spatial position for conv layers")
    p.add_argument("--init", default="noise", help="start image (a mean image) or 'noise' (default)")
    p.add_argument("--mode", choices=["faithful", "modern"], default="faithful",
                   help="faithful: the 2016 stack's arithmetic and libraries; modern: today's")
    p.add_argument("--variant", choices=["mean", "center-bias"],
                   help="octave schedule (default: mean with an image, center-bias with noise)")
    p.add_argument("--snapshot-every", type=int, default=50,
                   help="trace arrays every N iterations, plus the first and last (0: none; 2.4 MB each)")
    p.add_argument("--name", help="output file stem")
    p.set_defaults(func=_facet)

    p = subparsers.add_parser("facets", help="visualise every facet of a unit (one per mean image of --means) "
                                             "in one batch",
                              description="Every mean image of --means (mean_0 ... mean_{k-1}) starts one facet of "
                                          "each unit; a unit's facets run as one batch. Every facet uses --seed "
                                          "(default 1, as the authors' opt_from_mean.sh). Outputs: OUT/<unit>/.")
    _common(p, "fc8")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--unit", type=int, help="unit (channel) to maximise")
    which.add_argument("--units", help="units: 498,945 or a range 0-9 (or both: 0-3,7)")
    p.add_argument("--means", required=True, help="folder of mean images mean_0 ... (.png, .jpg or .npy)")
    p.add_argument("--xy", type=int, default=0, help="spatial position for conv layers")
    p.add_argument("--mode", choices=["faithful", "modern"], default="faithful",
                   help="faithful: the 2016 stack's arithmetic and libraries; modern: today's")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the net and TV run")
    p.add_argument("--iterations", type=int, help="stop after N iterations (quick looks)")
    p.add_argument("--units-per-batch", type=int, default=1,
                   help="units whose facets share one batch (default 1: one batch per unit)")
    p.add_argument("--snapshot-every", type=int, default=50,
                   help="trace arrays every N iterations, plus the first and last (0: none; 2.4 MB each)")
    p.set_defaults(func=_facets, seed=1)

    p = subparsers.add_parser("compare", help="run a facet on real Caffe 1.0 (the 2016 stack) and on the port, "
                                              "compare them step by step and write a drift report")
    _common(p, "fc8")
    p.add_argument("--unit", type=int, required=True, help="unit (channel) to maximise")
    p.add_argument("--xy", type=int, default=0, help="spatial position for conv layers")
    p.add_argument("--init", default="noise", help="start image (a mean image) or 'noise' (default)")
    p.add_argument("--variant", choices=["mean", "center-bias"],
                   help="octave schedule (default: mean with an image, center-bias with noise)")
    p.add_argument("--sync", action="store_true",
                   help="synchronised: every torch step starts from the Caffe side's image of that iteration")
    p.add_argument("--iterations", type=int, help="stop both sides after N iterations (quick looks)")
    p.add_argument("--every", type=int, default=50,
                   help="keep both sides' arrays (snapshots.npz) and replay single operations on the Caffe side's "
                        "inputs every K iterations, the first and the last (default 50; 2.4 MB per side each)")
    p.add_argument("--no-modern", action="store_true", help="skip the torch run in modern mode")
    p.add_argument("--no-sources", action="store_true",
                   help="skip the drift-source runs (one free-running torch run per source)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip Caffe's own noise floor (a second Caffe run under another OpenBLAS kernel path; "
                        "free-running only)")
    p.add_argument("--keep-arrays", metavar="DIR",
                   help="keep the Caffe side's per-iteration arrays (.npy) in DIR (default: temporary)")
    p.set_defaults(func=_compare)

    from mfv import cli_sweep

    cli_sweep.add_parser(subparsers)   # sweep, gallery


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mfv", description=__doc__.splitlines()[0])
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command("mfv", build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
