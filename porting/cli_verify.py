"""`porting verify` and `porting demo`: the same inputs through real Caffe and the port.

Runs the legacy stack's worker and the PyTorch port on one batch, compares every blob
forward and the objective's gradient backward, attributes each discrepancy against a
float64 evaluation, optionally adds ONNX's reference evaluator as a third opinion, and
writes DIR/report.{json,md,html}. Exit 0 when the port computes what Caffe computes
(every layer of both within float32 rounding, see porting.verify.verdict; with --strict
also every blob within its per-blob tolerance), 1 when not, 2 on bad input.

`porting reference dump` runs Caffe once on the inputs and objective verify would use and
stores its arrays in a golden file (porting.verify.reference); `porting verify
--reference FILE` compares the port with them and needs no legacy stack.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
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


@dataclass
class RunPlan:
    """What Caffe and the port both run: the port ``net``, the ``objective``, the ``inputs``
    (name -> float32 NCHW array), ``described`` (how they were made, for the report) and the
    run's settings as given (``phase``, ``dropout_seed``, ``input_shapes``)."""

    net: object
    objective: object
    inputs: dict
    described: dict
    phase: str = "test"
    dropout_seed: int | None = None
    input_shapes: dict | None = None

    @property
    def objective_seed(self) -> np.ndarray:
        batch = int(next(iter(self.inputs.values())).shape[0])
        shape = (batch,) + tuple(self.net.graph.blob_shapes[self.objective.blob][1:])
        return self.objective.seed(shape)


def plan_run(prototxt, caffemodel, input_files=(), batch=None, objective=None, seed=0, budget=None,
             phase="test", input_shapes=None, dropout_seed=None) -> RunPlan:
    """Load the port and make the inputs and objective of a verification (no Caffe yet).
    Arguments as ``run_verify``'s."""
    from porting.budget import Budget
    from porting.net import load_caffe
    from porting.verify import parse_objective, random_inputs
    from porting.verify.run import label_classes

    net = load_caffe(prototxt, caffemodel, phase=phase, budget=budget or Budget.default(batch=batch, backward=True),
                     input_shapes=input_shapes, dropout_seed=dropout_seed)
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
    described["phase"] = phase
    return RunPlan(net, obj, inputs, described, phase, dropout_seed, dict(input_shapes or {}))


def run_caffe(plan: RunPlan, prototxt, caffemodel, worker=None):
    """Real Caffe's arrays for ``plan`` (a ``CaffeResult``), through ``worker`` or a fresh one.
    A net with data layers runs as ``caffe_net_with_inputs`` rewrites it (each data layer an
    Input layer of the same tops and shapes), fed the same arrays."""
    from porting.layers.data_layers import caffe_net_with_inputs, is_data_layer
    from porting.legacy import Worker
    from porting.write import write_prototxt

    own_worker = worker is None
    worker = worker or Worker()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            caffe_prototxt = prototxt
            if any(is_data_layer(s.type) for s in plan.net.graph.layers):
                caffe_prototxt = Path(tmp) / "with_inputs.prototxt"
                write_prototxt(caffe_prototxt, caffe_net_with_inputs(plan.net.graph))
            return worker.run_net(caffe_prototxt, caffemodel, inputs=plan.inputs,
                                  top_diffs={plan.objective.blob: plan.objective_seed}, phase=plan.phase,
                                  seed=plan.dropout_seed)
    finally:
        if own_worker:
            worker.close()


def plan_from_golden(golden, prototxt, caffemodel, budget=None) -> RunPlan:
    """The plan a golden file was dumped with (its inputs, objective and settings), checked
    against ``prototxt``/``caffemodel`` (their sha256, the inputs' names and shapes, the
    arrays every verify needs)."""
    from porting.budget import Budget
    from porting.net import load_caffe
    from porting.verify import parse_objective

    golden.check_model(prototxt, caffemodel)
    if budget is not None:
        budget = dataclasses.replace(budget, batch=golden.batch, backward=True)
    run = golden.run
    shapes = {k: tuple(v) for k, v in run["input_shapes"].items()}
    net = load_caffe(prototxt, caffemodel, phase=run["phase"], input_shapes=shapes or None,
                     budget=budget or Budget.default(batch=golden.batch, backward=True),
                     dropout_seed=run["dropout_seed"])
    golden.check_inputs(net.graph)
    try:
        obj = parse_objective(run["objective"], net.graph)
    except PortingError as err:
        raise PortingError(err.problem, golden.path, "provenance.json run.objective") from None
    golden.check_required(net.graph, obj.blob)
    described = dict(run["inputs"], batch=golden.batch, phase=run["phase"])
    return RunPlan(net, obj, dict(golden.inputs), described, run["phase"], run["dropout_seed"], shapes)


def run_verify(prototxt, caffemodel, report_dir, input_files=(), batch=None, objective=None,
               tolerance=None, onnx=True, synsets=None, seed=0, worker=None, strict=False,
               budget=None, phase="test", input_shapes=None, dropout_seed=None, reference=None,
               foreign=None) -> dict:
    """Verify a port against real Caffe and write the report; returns the report dict.
    ``budget``: the porting.budget.Budget the net must fit (default: the machine's, at
    ``batch`` with a backward). ``phase``: "test" or "train", both frameworks.
    ``input_shapes``: top name -> shape (``--input-shape``), for data layers' tops.
    ``dropout_seed``: TRAIN Dropout in both frameworks starts Caffe's generator there.
    A net with data layers runs in Caffe as ``caffe_net_with_inputs`` rewrites it (each
    data layer an Input layer of the same tops and shapes), fed the same arrays.
    ``reference``: a golden file (porting.verify.reference) holding Caffe's arrays, its
    inputs, objective and settings; no worker is started and the arguments that make
    inputs (``input_files``, ``batch``, ``seed``, ``objective``, ``phase``,
    ``input_shapes``, ``dropout_seed``) are not used.
    ``foreign``: a ``Foreign`` (someone else's PyTorch module, porting.verify.foreign) to
    verify in place of the port; the port then only supplies the float64 reading."""
    from porting.tolerances import parse_tolerances
    from porting.layers import LAYERS

    tolerances = parse_tolerances(tolerance, known_types=LAYERS)
    golden = None
    if reference is not None:
        from porting.verify.reference import read_golden

        golden = read_golden(reference)
        plan = plan_from_golden(golden, prototxt, caffemodel, budget)
        caffe, provenance = golden.arrays, golden.provenance["caffe"]
    else:
        plan = plan_run(prototxt, caffemodel, input_files, batch, objective, seed, budget, phase,
                        input_shapes, dropout_seed)
        caffe = run_caffe(plan, prototxt, caffemodel, worker)
        provenance = caffe.provenance
    return _judge(plan, dict(caffe), provenance, prototxt, caffemodel, report_dir, tolerances, onnx, synsets,
                  strict, golden, foreign)


def _judge(plan: RunPlan, reference: dict, provenance: dict, prototxt, caffemodel, report_dir, tolerances,
           onnx, synsets, strict, golden, foreign=None) -> dict:
    """Compare the port (or the ``foreign`` module) with Caffe's arrays ``reference`` and write the report."""
    from porting.export import onnx_opinion
    from porting.report import build_report, read_synsets, top5_table, write_report
    from porting.verify import blob_key, verify_port

    net, inputs, described = plan.net, plan.inputs, dict(plan.described)
    others, onnx_summary, mapping = {}, None, None
    if foreign is not None:
        verification, candidate, mapping = foreign.verify(net, reference, inputs, plan.objective, tolerances,
                                                          strict)
    else:
        if onnx:
            with tempfile.TemporaryDirectory() as tmp:
                others["onnx"], onnx_summary = onnx_opinion(net, inputs, tmp)
                onnx_summary.pop("file", None)
        verification, arrays = verify_port(net, reference, inputs, plan.objective, tolerances, others=others,
                                           strict=strict)
        candidate = arrays["port"]
    top5 = None
    prob = next((s.tops[0] for s in reversed(net.graph.layers) if s.type == "Softmax"), None)
    if prob and blob_key(prob, "data") in reference and blob_key(prob, "data") in candidate:
        top5 = top5_table(reference[blob_key(prob, "data")], candidate[blob_key(prob, "data")],
                          labels=described.get("files"), synsets=read_synsets(synsets) if synsets else None,
                          names=(verification.reference, verification.candidate))
    about = {"name": net.graph.name, "prototxt": str(prototxt), "prototxt_sha256": file_digest(prototxt),
             "caffemodel": str(caffemodel), "caffemodel_sha256": file_digest(caffemodel)}
    if onnx_summary:
        about["onnx"] = onnx_summary
    if mapping is not None:
        about["torch"] = mapping
    if golden is not None:
        from porting.verify.reference import describe

        described["reference"] = describe(golden)
    report = build_report(verification, net=about, inputs=described, provenance=provenance, top5=top5)
    write_report(report, report_dir)
    if mapping is not None:  # the correspondence used, in --map's format (reusable as it is)
        from porting.files import write_atomic

        write_atomic(Path(report_dir) / "mapping.json", json.dumps(mapping["map"], indent=1).encode() + b"\n")
    return report


def dump_reference(prototxt, caffemodel, out, input_files=(), batch=None, objective=None, seed=0, worker=None,
                   budget=None, phase="test", input_shapes=None, dropout_seed=None) -> dict:
    """Run real Caffe once on the inputs and objective ``porting verify`` would use with the
    same arguments and write a golden file (porting.verify.reference); returns its provenance."""
    from porting.verify.reference import write_golden

    plan = plan_run(prototxt, caffemodel, input_files, batch, objective, seed, budget, phase,
                    input_shapes, dropout_seed)
    caffe = run_caffe(plan, prototxt, caffemodel, worker)
    run = {"phase": plan.phase, "objective": str(plan.objective), "dropout_seed": plan.dropout_seed,
           "input_shapes": {k: [int(d) for d in v] for k, v in plan.input_shapes.items()},
           "inputs": plan.described}
    return write_golden(out, caffe, plan.inputs, caffe.provenance, run, prototxt, caffemodel,
                        net_name=plan.net.graph.name)


def _summary(report: dict, report_dir) -> str:
    rows = report["rows"]
    failed = [r for r in rows if r.get("passed") is False]
    lines = [report.get("summary") or ("PASS" if report["passed"] else "FAIL")]
    if report.get("diagnosis"):  # a foreign module's (porting.verify.diagnose)
        lines.append(f"diagnosis: {report['diagnosis']['sentence']}")
    lines.append(f"{len(rows) - len(failed)}/{len(rows)} compared arrays within their per-blob tolerance"
                 + ("" if report.get("strict") else " (decides only with --strict)"))
    torch_map = report.get("net", {}).get("torch")
    if torch_map:
        missing = torch_map["no_counterpart"]
        lines.append(f"mapping: {len(torch_map['map'])} Caffe outputs to module outputs "
                     f"(mapping.json); no counterpart: {', '.join(missing) if missing else 'none'}")
        if str(torch_map.get("gradients", "")).startswith("not compared"):
            lines.append(f"gradients {torch_map['gradients']}")
    lines.append(f"report: {Path(report_dir) / 'report.html'}")
    return "\n".join(lines)


# Options that make the inputs and objective: a golden file fixes them (--reference).
_RUN_OPTIONS = (("input", "--input"), ("batch", "--batch"), ("seed", "--seed"), ("objective", "--objective"),
                ("phase", "--phase"), ("dropout_seed", "--dropout-seed"), ("input_shape", "--input-shape"))


def _run_arguments(args, backward: bool = True) -> dict:
    from porting.budget import from_args
    from porting.layers.data_layers import input_shapes_from_args

    return dict(input_files=args.input or (), batch=args.batch, objective=args.objective,
                seed=0 if args.seed is None else args.seed, phase=args.phase or "test",
                budget=from_args(args, batch=args.batch, backward=backward),
                input_shapes=input_shapes_from_args(args), dropout_seed=args.dropout_seed)


def _verify_command(args) -> int:
    run = _run_arguments(args)
    if args.reference is not None:
        given = [option for field, option in _RUN_OPTIONS if getattr(args, field) is not None]
        if given:
            raise PortingError(f"{given[0]} is not taken with --reference: the golden file holds the inputs, "
                               "objective and settings Caffe ran with", args.reference)
    report = run_verify(args.prototxt, args.caffemodel, args.report, tolerance=args.tolerance,
                        onnx=not args.no_onnx, synsets=args.synsets, strict=args.strict,
                        reference=args.reference, foreign=_foreign_from_args(args), **run)
    print(_summary(report, args.report))
    return int(report["exit_status"])


def _foreign_from_args(args):
    """The --torch (or --onnx) module and its options (a porting.verify.foreign.Foreign), or None."""
    from porting.verify.convention import convention_from_options
    from porting.verify.foreign import Foreign, read_map
    from porting.verify.recording import load_module, load_onnx

    if args.torch is not None and args.onnx is not None:
        raise PortingError("--torch and --onnx: give one model to verify")
    if args.torch is None and args.onnx is None:
        given = [o for o, v in (("--map", args.map), ("--torch-input", args.torch_input),
                                ("--torch-mean", args.torch_mean), ("--torch-std", args.torch_std),
                                ("--caffe-mean", args.caffe_mean)) if v is not None]
        if given:
            raise PortingError(f"{given[0]} is taken only with --torch or --onnx")
        return None
    convention = convention_from_options(args.torch_input, args.torch_mean, args.torch_std, args.caffe_mean)
    map_data = read_map(args.map) if args.map is not None else None
    spec = args.torch if args.torch is not None else args.onnx
    module = load_module(spec) if args.torch is not None else load_onnx(spec)  # before Caffe runs
    return Foreign(spec, convention, map_data, args.map, module=module)


def _dump_command(args) -> int:
    provenance = dump_reference(args.prototxt, args.caffemodel, args.output, **_run_arguments(args))
    arrays = provenance["arrays"]
    size = sum(4 * int(np.prod(a["shape"])) for a in arrays.values())
    print(f"wrote {args.output}: {len(arrays)} arrays ({size / 2**20:.1f} MiB), objective "
          f"{provenance['run']['objective']}, Caffe {provenance['caffe'].get('versions', {}).get('caffe', '?')}")
    return 0


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


def _show_command(args) -> int:
    from porting.errors import escaped
    from porting.verify.reference import read_golden

    golden = read_golden(args.golden)
    prov, run = golden.provenance, golden.run
    caffe = prov["caffe"].get("versions")
    caffe = caffe if isinstance(caffe, dict) else {}
    lines = [f"{args.golden}: {prov['schema']} version {prov['schema_version']}, created {prov['created']}"]
    lines += [f"{what}: {prov['net'][what]} (sha256 {prov['net'][what + '_sha256']})"
              for what in ("prototxt", "caffemodel")]
    lines.append(f"caffe {caffe.get('caffe', '?')}, blas {caffe.get('blas', '?')}, "
                 f"machine {json.dumps(prov.get('machine', {}), sort_keys=True)}")
    lines.append(f"run: phase {run['phase']}, objective {run['objective']}, batch {golden.batch}, "
                 f"inputs {json.dumps(run['inputs'], sort_keys=True)}")
    lines.append(f"{len(golden.arrays)} arrays of Caffe, {len(golden.inputs)} input(s)")
    print("\n".join(escaped(line) for line in lines))  # names from the file: no terminal escapes
    return 0


def _add_run_options(p) -> None:
    """The options that make a verification's inputs and objective (verify and reference dump)."""
    from porting.layers.data_layers import add_input_shape_option

    p.add_argument("prototxt")
    p.add_argument("caffemodel")
    p.add_argument("--input", nargs="+", metavar="FILE", help=".npy arrays (net preprocessing) or images")
    p.add_argument("--batch", type=int, help="batch size of the seeded random inputs")
    p.add_argument("--seed", type=int, help="seed of the random inputs (default 0)")
    p.add_argument("--objective", metavar="LAYER:UNIT", help="unit whose input gradient is compared "
                   "(default: the layer before the Softmax, unit 0)")
    p.add_argument("--phase", choices=["test", "train"], help="the net's phase, in both frameworks (default test)")
    p.add_argument("--dropout-seed", type=int, metavar="S", help="TRAIN Dropout: both frameworks start Caffe's "
                   "generator at S before the forward (caffe.set_random_seed), so their masks agree")
    add_input_shape_option(p)
    budget.add_options(p)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="compare a port with real Caffe blob by blob and write a drift report")
    _add_run_options(p)
    p.add_argument("--reference", metavar="GOLDEN.npz", help="Caffe's arrays from `porting reference dump` "
                   "instead of a live Caffe run (no legacy stack needed; the file fixes inputs and objective)")
    p.add_argument("--tolerance", metavar="SPEC", help='e.g. "Convolution=1e-5,default=1e-4" or a JSON file')
    p.add_argument("--synsets", metavar="FILE", help="synset_words.txt for class names in the top-5 table")
    p.add_argument("--strict", action="store_true", help="fail also when a blob exceeds its per-blob tolerance "
                   "(depends on the CPU, the inputs and the weights: rounding amplified by the net)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX third opinion")
    p.add_argument("--torch", metavar="FILE.py:FACTORY", help="verify someone else's PyTorch port instead of "
                   "ours: FACTORY() (in FILE.py or package.module) returns an nn.Module with its weights "
                   "loaded, or FILE.pt2 (torch.export.save), or a TorchScript archive FILE.ts/.pt/.pth "
                   "(torch.jit.save). This RUNS THAT CODE (your own port: Python for a factory, the "
                   "archive's TorchScript for a .ts; a torch.save pickle is never loaded); the prototxt and "
                   "caffemodel stay untrusted")
    p.add_argument("--onnx", metavar="FILE.onnx", help="verify an ONNX model instead of our port, run by ONNX "
                   "Runtime (pip install onnxruntime), every intermediate value recorded; forward only (no "
                   "gradients). The file is checked (no external data, onnx.checker, static shapes within "
                   "the memory limit) before anything runs; --map, --torch-input apply as with --torch")
    p.add_argument("--map", metavar="MAP.json", help="with --torch: Caffe layer or blob name -> module path "
                   '("features.0", ["features.0", 0] or {"module", "output", "call"}); default: found by '
                   "running both on the same input (the report's mapping.json)")
    p.add_argument("--torch-input", metavar="bgr255|rgb01|FILE.json", help="with --torch: what the module "
                   "takes: Caffe's input (bgr255, the default), RGB in [0, 1] minus --torch-mean over "
                   '--torch-std (rgb01), or a JSON file {"channel_order": "RGB"|"BGR", "range": 1|255, '
                   '"mean": [3], "std": [3], "caffe_mean": [B, G, R]}')
    p.add_argument("--torch-mean", metavar="R,G,B", help="rgb01: the mean subtracted (default 0,0,0)")
    p.add_argument("--torch-std", metavar="R,G,B", help="rgb01: the std divided by (default 1,1,1)")
    p.add_argument("--caffe-mean", metavar="B,G,R", help="rgb01: the mean Caffe's input has had subtracted "
                   "(0-255 units; default 104,117,123): the picture is the input plus it")
    p.add_argument("--report", required=True, metavar="DIR")
    p.set_defaults(func=_verify_command)

    p = subparsers.add_parser("reference", help="golden reference files: real Caffe's arrays, stored once")
    sub = p.add_subparsers(dest="reference_command", required=True)
    p = sub.add_parser("dump", help="run real Caffe once as `porting verify` would and store every array")
    _add_run_options(p)
    p.add_argument("-o", "--output", required=True, metavar="GOLDEN.npz")
    p.set_defaults(func=_dump_command)
    p = sub.add_parser("show", help="check a golden file and print where it comes from")
    p.add_argument("golden", metavar="GOLDEN.npz")
    p.set_defaults(func=_show_command)

    p = subparsers.add_parser("demo", help="convert CaffeNet with generated weights and verify it")
    p.add_argument("--out", default="out/demo", metavar="DIR")
    p.add_argument("--synsets", metavar="FILE", help="synset_words.txt for class names")
    p.set_defaults(func=_demo_command)
