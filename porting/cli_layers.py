"""`porting layers`: every registered layer type, where it comes from, what it reads, what checks it.

One row per type the registry holds (the built-in ones and those of layer plugins): its V1
enum name (if Caffe's V1 format had one), its origin ("built-in" or "plugin <distribution>
<version>"), the LayerParameter ``*_param`` field(s) it reads with their message's field
names, and ``verified_by`` (the test files that check it against real Caffe or a
reference). Refused types are listed with the reason; the Caffe 1.0 types not supported
yet are named. Formats: a plain table, ``--markdown`` (the README's list: ``porting layers
--markdown --builtin``), ``--json``.
"""
from __future__ import annotations

import json

# The 61 layer types Caffe 1.0 registers (REGISTER_LAYER_CLASS / REGISTER_LAYER_CREATOR).
CAFFE_1_TYPES = (
    "AbsVal", "Accuracy", "ArgMax", "BNLL", "BatchNorm", "BatchReindex", "Bias", "Clip", "Concat",
    "ContrastiveLoss", "Convolution", "Crop", "Data", "Deconvolution", "Dropout", "DummyData", "ELU",
    "Eltwise", "Embed", "EuclideanLoss", "Exp", "Filter", "Flatten", "HDF5Data", "HDF5Output", "HingeLoss",
    "Im2col", "ImageData", "InfogainLoss", "InnerProduct", "Input", "LRN", "LSTM", "LSTMUnit", "Log", "MVN",
    "MemoryData", "MultinomialLogisticLoss", "PReLU", "Parameter", "Pooling", "Power", "Python", "RNN", "ReLU",
    "Reduction", "Reshape", "SPP", "Scale", "Sigmoid", "SigmoidCrossEntropyLoss", "Silence", "Slice",
    "Softmax", "SoftmaxWithLoss", "Split", "Swish", "TanH", "Threshold", "Tile", "WindowData",
)


def layer_list(builtin_only: bool = False) -> dict:
    """The registry as data: ``layers`` (one dict per registered type, by name), ``refused``,
    ``missing`` (Caffe 1.0 types neither registered nor refused), ``plugin_problems``."""
    from porting.layers import BUILT_IN, LAYERS, PLUGIN_PROBLEMS, REFUSED, V1_TYPES, param_fields, \
        param_message_fields

    v1 = {type_name: name for name, type_name in V1_TYPES.items()}
    rows = []
    for type_name in sorted(LAYERS, key=str.lower):
        cls = LAYERS[type_name]
        if type_name in REFUSED or (builtin_only and cls.origin != BUILT_IN):
            continue
        rows.append({"type": type_name, "v1": v1.get(type_name), "origin": cls.origin,
                     "params": {f: param_message_fields(f) for f in param_fields(cls)},
                     "verified_by": list(cls.verified_by)})
    supported = {r["type"] for r in rows} if not builtin_only else \
        {t for t, c in LAYERS.items() if c.origin == BUILT_IN}
    return {"layers": rows,
            "refused": [{"type": t, "reason": r} for t, r in sorted(REFUSED.items())],
            "missing": [t for t in CAFFE_1_TYPES if t not in supported and t not in REFUSED],
            "plugin_problems": [] if builtin_only else list(PLUGIN_PROBLEMS)}


def summary(data: dict) -> str:
    n_caffe = sum(t in {r["type"] for r in data["layers"]} for t in CAFFE_1_TYPES)
    plugins = sum(r["origin"] != "built-in" for r in data["layers"])
    text = (f"{len(data['layers'])} layer types" + (f" ({plugins} from plugins)" if plugins else "")
            + f"; {n_caffe} of Caffe 1.0's {len(CAFFE_1_TYPES)} types supported, {len(data['refused'])} refused")
    return text + (f", not yet supported: {', '.join(data['missing'])}" if data["missing"] else "")


def _params(params: dict, sep: str) -> str:
    return "; ".join(f"{field} {{{sep.join(names)}}}" for field, names in params.items())


def markdown(data: dict) -> str:
    """The list as a Markdown table plus its refused and missing types."""
    lines = ["| type | V1 name | from | parameters | verified by |", "|---|---|---|---|---|"]
    for r in data["layers"]:
        params = "; ".join(f"`{field}` ({', '.join(names)})" for field, names in r["params"].items())
        tests = ", ".join(f"`{t}`" for t in r["verified_by"])
        lines.append(f"| {r['type']} | {r['v1'] or ''} | {r['origin']} | {params} | {tests} |")
    lines += [""] + [f"Refused: {r['type']} ({r['reason']})." for r in data["refused"]]
    lines += ["", summary(data) + "."]
    return "\n".join(lines)


def plain(data: dict) -> str:
    rows = [("type", "V1 name", "from", "parameters", "verified by")]
    rows += [(r["type"], r["v1"] or "", r["origin"], _params(r["params"], " "), " ".join(r["verified_by"]))
             for r in data["layers"]]
    rows += [(r["type"], "", "REFUSED", r["reason"], "") for r in data["refused"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ["", summary(data)] + data["plugin_problems"])


def _command(args) -> int:
    data = layer_list(builtin_only=args.builtin)
    if args.missing:
        for type_name in data["missing"]:
            print(type_name)
    elif args.json:
        print(json.dumps(data, indent=1))
    else:
        print(markdown(data) if args.markdown else plain(data))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("layers", help="list the supported layer types (built-in and from plugins)",
                              description=__doc__.splitlines()[0].split(": ", 1)[1])
    form = p.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="a Markdown table (the README's list)")
    form.add_argument("--json", action="store_true", help="JSON for machines")
    form.add_argument("--missing", action="store_true",
                      help="only the Caffe 1.0 types not supported yet, one per line")
    p.add_argument("--builtin", action="store_true", help="only the built-in types (leave plugins out)")
    p.set_defaults(func=_command)
