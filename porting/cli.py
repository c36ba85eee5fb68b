"""`porting` command line: convert, inspect, env, verify, export, drift-diff, demo.

Exit status: 0 success, 1 internal error (or, for verify, a blob out of tolerance),
2 bad input (one line on stderr naming the file, the place and the problem).
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback

from porting import budget
from porting.errors import PortingError, escaped


def _convert(args) -> int:
    from porting.budget import from_args
    from porting.net import load_caffe
    from porting.saved import save_converted

    from porting.layers.data_layers import input_shapes_from_args

    net = load_caffe(args.prototxt, args.caffemodel, phase=args.phase, budget=from_args(args),
                     input_shapes=input_shapes_from_args(args))
    save_converted(net, args.output, phase=args.phase)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.output}: {len(net.graph.layers)} layers, {n_params:,} parameters")
    return 0


def _inspect(args) -> int:
    """The layer table from the graph's shapes alone: no parameter or activation is allocated."""
    from porting.budget import needs
    from porting.graph import build_graph
    from porting.layers.data_layers import input_shape_lines, input_shapes_from_args
    from porting.parse import read_caffemodel, read_prototxt
    from porting.upgrade import upgrade

    shapes = input_shapes_from_args(args)
    net, upgrades = upgrade(read_prototxt(args.prototxt), source=args.prototxt)
    weights = read_caffemodel(args.caffemodel) if args.caffemodel else None
    graph = build_graph(net, args.phase, weights,
                        source=args.prototxt, shape_only=True, input_shapes=shapes)
    print(f"net {graph.name or '(unnamed)'}: {len(graph.layers)} layers, phase {args.phase}"
          + (f"; upgraded from: {', '.join(upgrades)}" if upgrades else ""))
    print(graph.table())
    for line in input_shape_lines(graph):
        print(line)
    print(needs(graph).summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from porting.layers.data_layers import add_input_shape_option

    parser = argparse.ArgumentParser(prog="porting", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Caffe model to a safetensors file")
    p.add_argument("prototxt")
    p.add_argument("caffemodel", nargs="?")
    p.add_argument("-o", "--output", required=True, help="output .safetensors path")
    p.add_argument("--phase", default="test", choices=["test", "train"])
    add_input_shape_option(p)
    budget.add_options(p)
    p.set_defaults(func=_convert)

    p = sub.add_parser("inspect", help="print the layer table of a Caffe model")
    p.add_argument("prototxt")
    p.add_argument("caffemodel", nargs="?")
    p.add_argument("--phase", default="test", choices=["test", "train"])
    add_input_shape_option(p)
    p.set_defaults(func=_inspect)

    for module in _FEATURE_MODULES:
        __import__(module, fromlist=["add_parser"]).add_parser(sub)
    return parser


# Modules that add their own subcommands with add_parser(subparsers).
_FEATURE_MODULES: list[str] = ["porting.legacy", "porting.cli_verify", "porting.export", "porting.report",
                               "porting.cli_layers"]


class _HeldNotes(logging.Handler):
    """Keeps the notes the harness logs while a command runs (e.g. the legacy-format
    upgrade's "V0 parameter ... dropped", Caffe's own LOG(ERROR) lines): printed once the
    command has done its work, dropped when it refuses its input, whose one line says why."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.notes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.notes.append(escaped(record.getMessage()))


def run_command(prog: str, args: argparse.Namespace) -> int:
    """Run a parsed subcommand with the exit-status contract (0, 1 internal, 2 bad input)."""
    held, logger = _HeldNotes(), logging.getLogger("porting")
    logger.addHandler(held)
    try:
        status = int(args.func(args) or 0)
        for note in held.notes:
            print(f"{prog}: {note}", file=sys.stderr)
        return status
    except PortingError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # an internal error: keep the traceback for the bug report
        traceback.print_exc()
        print(f"{prog}: internal error (the traceback above belongs in a bug report)", file=sys.stderr)
        return 1
    finally:
        logger.removeHandler(held)


def main(argv: list[str] | None = None) -> int:
    return run_command("porting", build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
