"""`mfv sweep` (every facet of many units, on Ray or in this process, resumable) and
`mfv gallery` (the sweep folder's index.html again). See ``mfv.sweep`` and ``mfv.gallery``.

Exit status of `mfv sweep`: 0 when every task succeeded, 1 when any failed (each failure
is listed on stderr and in the manifest; the rest of the sweep finished), 2 bad input.
"""
from __future__ import annotations

import sys

from porting.errors import PortingError


def _sweep(args) -> int:
    from pathlib import Path

    from mfv import schedule
    from mfv.batch import parse_units
    from mfv.cli import _load_net, check_units
    from mfv.device import torch_device
    from mfv.sweep import Model, Settings, find_units, run_sweep

    if args.model is not None:
        raise PortingError("mfv sweep takes the net as --prototxt (and --caffemodel); --model is not supported here",
                           place="--model")
    if args.facets < 1:
        raise PortingError(f"--facets must be at least 1, not {args.facets}")
    if args.iterations is not None and args.iterations < 1:
        raise PortingError(f"--iterations must be at least 1, not {args.iterations}")
    if args.facets_per_task is not None and args.facets_per_task < 1:
        raise PortingError(f"--facets-per-task must be at least 1, not {args.facets_per_task}")
    if args.gpus_per_task < 0 or args.cpus_per_task <= 0:
        raise PortingError("--gpus-per-task must be at least 0 and --cpus-per-task above 0")
    if args.gpus_per_task == 0:   # the net runs on --device, here or on CPU workers
        torch_device(args.device)
    units = find_units(args.means_root, parse_units(args.units), args.facets, args.synsets)
    # the model is read here once, so a bad file is exit 2 before any worker starts
    args.octave_layers = sorted({o.layer for o in schedule.MEAN_OCTAVES if o.layer})
    check_units(_load_net(args), args.layer, [u.unit for u in units], "--units")
    device = "cuda" if args.gpus_per_task > 0 else args.device
    model = Model(str(Path(args.prototxt).resolve()),
                  str(Path(args.caffemodel).resolve()) if args.caffemodel else None, tuple(args.mean), device)
    settings = Settings(args.layer, args.xy, "mean", args.mode, args.iterations, args.seed, args.snapshot_every)
    outcome = run_sweep(model, settings, units, args.out, facets=args.facets, facets_per_task=args.facets_per_task,
                        use_ray=not args.no_ray, address=args.address, workers=args.workers,
                        cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task, retries=args.retries,
                        progress=not args.no_progress)
    manifest = outcome.manifest
    done = sum(len(by) for by in manifest["facets"].values())
    total = len(units) * args.facets
    print(f"{outcome.ran} facets run now, {done} done of {len(units)} units x {args.facets} facets ({total}); "
          f"{len(outcome.failed)} tasks failed ({manifest['runs'][-1]['executor']})")
    print(f"wrote {Path(args.out) / 'manifest.json'} and {Path(args.out) / 'index.html'}")
    for entry in outcome.failed:
        print(f"mfv sweep: unit {entry['unit']} facets {','.join(map(str, entry['facets']))}: {entry['error']}",
              file=sys.stderr)
    return 1 if outcome.failed else 0


def _gallery(args) -> int:
    from mfv.gallery import write_gallery

    print(f"wrote {write_gallery(args.out, embed=args.embed)}")
    return 0


def add_parser(subparsers) -> None:
    """Add `sweep` and `gallery` to an argparse subparsers object."""
    from mfv.cli import _common

    p = subparsers.add_parser("sweep", help="visualise every facet of many units (Ray tasks or in this process), "
                                            "resumable, with a gallery")
    _common(p, "fc8")
    p.add_argument("--means-root", required=True,
                   help="folder of per-unit folders of mean images (mean_0.png ...), named by unit number "
                        "(or by synset id with --synsets)")
    p.add_argument("--units", required=True, help="units: a range 0-999, a list 498,945, or both")
    p.add_argument("--facets", type=int, default=10, help="facets per unit: mean_0 ... mean_{F-1} (default 10)")
    p.add_argument("--facets-per-task", type=int, help="facets of one unit per task (default: all of them)")
    p.add_argument("--synsets", help="synset list (synset_words.txt: 'n01440764 tench, Tinca tinca'; line u is "
                                     "unit u): class names, and folders named by synset id")
    p.add_argument("--xy", type=int, default=0, help="spatial position for conv layers")
    p.add_argument("--mode", choices=["faithful", "modern"], default="faithful")
    p.add_argument("--iterations", type=int, help="stop each facet after N iterations (quick runs)")
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="trace arrays every N iterations, plus the first and last (default 0: none)")
    p.add_argument("--device", default="cpu", help="torch device of the in-process or CPU-task net (default cpu)")
    p.add_argument("--no-ray", action="store_true", help="run in this process even when Ray is installed")
    p.add_argument("--address", help="join this Ray cluster (e.g. head-node:6379) instead of starting a local one")
    p.add_argument("--workers", type=int, help="CPUs of the local Ray cluster (default: all of this machine's)")
    p.add_argument("--cpus-per-task", type=float, default=1, help="Ray CPUs per task (default 1)")
    p.add_argument("--gpus-per-task", type=float, default=0,
                   help="Ray GPUs per task (fractions share a GPU; above 0 the net runs on cuda)")
    p.add_argument("--retries", type=int, default=2, help="Ray retries of a failed task (default 2)")
    p.set_defaults(func=_sweep, seed=1)   # every facet seed 1, as the authors' opt_from_mean.sh and `mfv facets`

    p = subparsers.add_parser("gallery", help="write a sweep folder's index.html again from its manifest")
    p.add_argument("out", help="the sweep's output folder")
    p.add_argument("--embed", action="store_true", help="put the images in the page (data: URIs)")
    p.set_defaults(func=_gallery)
