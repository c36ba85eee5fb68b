"""Hostile-file fuzzer (issue 9): mutated prototxts and caffemodels through ``load_caffe``,
a forward, ``porting inspect`` and a walker-versus-protobuf comparison.

    python tests/fuzz_models.py --count 100000 --seed 1 [--jobs N] [--out DIR]
    python tests/fuzz_models.py --replay DIR      # one saved reproducer, with its traceback

Inputs: small valid nets (the fixtures under tests/fixtures, the repository's CaffeNet and
the reference prototxts in ../shared/reference-data when present, both narrowed to at most
8 channels and 67x67 inputs; an inline net with every other supported layer type) with
random weights written by ``porting.write.write_caffemodel`` in the V2, V1 and V0 layouts,
then one to three mutations of one family:

- prototxt-structure: a field of the parsed net set to an edge value (0, -1, 2^31, 2^63,
  NaN, inf...), a name made odd (control characters, nn.Module attribute names, empty,
  another layer's name), a layer dropped, duplicated, moved or retyped, bottoms that point
  forward, to themselves or nowhere, phase and include/exclude rules, net-level inputs,
  fields added to or cleared from a layer's own ``*_param`` message;
- prototxt-text: number, enum and string tokens replaced in the text (values the text
  parser itself must refuse: 2^64, 1e309, negative for unsigned, bad escapes, bad UTF-8);
- prototxt-bytes / caffemodel-bytes: bit flips, truncation, insertion, duplication and
  deletion of ranges, splices with another seed;
- caffemodel-wire: the protobuf wire structure edited: length prefixes (off by a few,
  2^31, 2^64-1, overlong varints), keys (wire types, field numbers), BlobShape dims
  (0, negative, 2^63, 40 axes; packed or not), value counts, packed/unpacked/chunked data,
  NaN, inf and denormal bit patterns, double_data (with and without data, empty, beyond
  float32), legacy num/channels/height/width, layer entries dropped, duplicated, renamed
  (bad UTF-8), moved between V1 and V2, unknown fields of every wire type, nested groups,
  diff fields, top-level fields;
- foreign: an empty file, PNG/JPEG/GIF/zip/pickle/NumPy/HDF5/gzip bytes, random bytes,
  UTF-16 text, the prototxt and the caffemodel swapped.

Input ``i`` of ``--seed s`` is drawn from ``random.Random(f"fuzz:{s}:{i}")`` over the seed
corpus, so a seed and a count give the same inputs on every run and in any worker (the
corpus digest is printed: it differs when ../shared/reference-data is absent).

Each input runs in a forked worker under a 3 GB address-space limit (RLIMIT_AS) and a
10 s CPU-time alarm (ITIMER_PROF, so a busy shared machine does not turn slow inputs into
timeouts). A worker silent for 60 s on one input (stuck in C code, or the machine stalled)
is killed and replaced and the input runs once more; silent twice is a timeout. Outcomes:

- OK: ``load_caffe`` returned and a forward on random inputs of the declared shapes ran
  (then a backward from the sum of every blob must run, and ``save_converted`` /
  ``load_converted`` must give a net computing the same blobs);
- REFUSED: ``load_caffe`` raised ``PortingError`` with one printable line naming a file;
- FAILURE (one or more of): *exception* (any other exception type, in load, forward or
  the CLI), *memory* (MemoryError or a torch allocation failure), *timeout*, *crash* (a
  signal: a segfault, a C++ abort), *roundtrip* (the converted net computes another
  blob), *message* (a PortingError message of several lines, unescaped characters, or
  naming no file), *cli* (``porting inspect`` exit status not 0/1/2, or exit 2 without
  exactly one printable stderr line), *warning* (a Python warning that would reach
  stderr), *shape* (a top's computed shape differs from the inferred one), *differential*
  (for every caffemodel, ``porting.parse.read_caffemodel`` against protobuf's
  ``NetParameter.FromString`` by ``compare`` of tests/test_walker_protobuf.py: the same
  layers, arrays bit for bit, declared shapes and diff counts, or both refusing, with the
  exceptions documented there).

Distinct failures are keyed by (kind, exception type, innermost ``porting/`` frame
file:line) and for each the smallest reproducer is saved under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import unicodedata
import warnings
import zlib
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from porting import caffe_pb2  # noqa: E402
from porting.errors import PortingError  # noqa: E402
from porting.wire import EGROUP, I32, I64, LEN, SGROUP, VARINT, varint  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures"
SHARED = REPO.parent / "shared" / "reference-data"
MEMORY_LIMIT = 3 << 30      # bytes of address space per worker
TIME_LIMIT = 10.0           # CPU seconds per input (ITIMER_PROF in the worker)
# The budget each input is loaded with, as a user would set it: the memory default (what
# the address-space limit leaves) for a forward *and* backward, since both run, and a work
# limit that fits the time limit, so the alarm catches what the budget misjudges rather
# than nets honestly too big for 10 s.
WORK_LIMIT = 10**10         # multiply-adds of a forward and backward
WALL_LIMIT = 60.0           # a worker silent this long on one input is killed (its input retried once)
MAX_FILE = 1 << 20          # generated files are cut to this many bytes
RECYCLE = 300               # inputs per worker before it is replaced (memory hygiene)
CAP_CHANNELS, CAP_SIDE = 8, 67

# --------------------------------------------------------------------------- seeds
# Every supported type the fixtures lack, in one small V2 net.
ALL_TYPES = """name: "all_types"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 6 dim: 6 } } }
layer { name: "sig" type: "Sigmoid" bottom: "data" top: "sig" }
layer { name: "abs" type: "AbsVal" bottom: "sig" top: "abs" }
layer { name: "exp" type: "Exp" bottom: "abs" top: "exp" exp_param { base: 2 scale: 0.5 shift: -1 } }
layer { name: "log" type: "Log" bottom: "exp" top: "log" log_param { base: 10 shift: 1 } }
layer { name: "bnll" type: "BNLL" bottom: "log" top: "bnll" }
layer { name: "thr" type: "Threshold" bottom: "bnll" top: "thr" threshold_param { threshold: 0.5 } }
layer { name: "split" type: "Split" bottom: "thr" top: "s1" top: "s2" }
layer { name: "slice" type: "Slice" bottom: "s1" top: "a" top: "b" slice_param { axis: 1 slice_point: 1 } }
layer { name: "concat" type: "Concat" bottom: "b" bottom: "a" top: "cat" concat_param { axis: 1 } }
layer { name: "bias" type: "Bias" bottom: "cat" top: "biased" bias_param { axis: 1 num_axes: 1 } }
layer { name: "crop" type: "Crop" bottom: "biased" bottom: "s2" top: "crop" crop_param { axis: 2 offset: 0 } }
layer { name: "prelu" type: "PReLU" bottom: "crop" top: "crop" prelu_param { channel_shared: false } }
layer { name: "elu" type: "ELU" bottom: "crop" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "tanh" type: "TanH" bottom: "elu" top: "tanh" }
layer { name: "pow" type: "Power" bottom: "tanh" top: "pow" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "drop" type: "Dropout" bottom: "pow" top: "pow" dropout_param { dropout_ratio: 0.3 } }
layer { name: "resh" type: "Reshape" bottom: "pow" top: "resh" reshape_param { shape { dim: 0 dim: -1 dim: 6 } } }
layer { name: "flat" type: "Flatten" bottom: "resh" top: "flat" flatten_param { axis: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 5 axis: 1 } }
layer { name: "scale" type: "Scale" bottom: "ip" top: "ip" scale_param { axis: 1 bias_term: true } }
layer { name: "soft" type: "Softmax" bottom: "ip" top: "prob" softmax_param { axis: 1 } }
layer { name: "arg" type: "ArgMax" bottom: "prob" top: "arg" argmax_param { top_k: 2 out_max_val: true } }
layer { name: "clip" type: "Clip" bottom: "ip" top: "clip" clip_param { min: -0.5 max: 0.5 } }
layer { name: "swish" type: "Swish" bottom: "clip" top: "swish" swish_param { beta: 1.5 } }
layer { name: "tile" type: "Tile" bottom: "swish" top: "tile" tile_param { axis: 1 tiles: 2 } }
layer { name: "red" type: "Reduction" bottom: "tile" top: "red" reduction_param { operation: SUMSQ axis: 1 coeff: 0.5 } }
layer { name: "embed" type: "Embed" bottom: "arg" top: "emb" embed_param { num_output: 3 input_dim: 5 } }
layer { name: "mvn" type: "MVN" bottom: "data" top: "mvn" mvn_param { across_channels: true eps: 0.001 } }
layer { name: "spp" type: "SPP" bottom: "mvn" top: "spp" spp_param { pyramid_height: 2 pool: AVE } }
layer { name: "cols" type: "Im2col" bottom: "data" top: "cols" convolution_param { kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ones" type: "Power" bottom: "red" top: "ones" power_param { scale: 0 shift: 1 } }
layer { name: "reindex" type: "BatchReindex" bottom: "spp" bottom: "ones" top: "reindexed" }
layer { name: "filter" type: "Filter" bottom: "cols" bottom: "ones" top: "filtered" }
layer { name: "param" type: "Parameter" top: "par" parameter_param { shape { dim: 2 dim: 5 } } }
layer { name: "join" type: "Eltwise" bottom: "ip" bottom: "par" top: "join" }
layer { name: "h5" type: "HDF5Output" bottom: "data" bottom: "red" hdf5_output_param { file_name: "all_types.h5" } }
layer { name: "hmat" type: "Parameter" top: "H" parameter_param { shape { dim: 5 dim: 5 } } }
layer { name: "sm_loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "ones" top: "sm_loss" loss_param { ignore_label: 0 } }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "ones" top: "acc" top: "acc_class" accuracy_param { top_k: 2 } }
layer { name: "euc" type: "EuclideanLoss" bottom: "ip" bottom: "par" top: "euc" }
layer { name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "ip" bottom: "clip" top: "sce" }
layer { name: "hinge" type: "HingeLoss" bottom: "ip" bottom: "ones" top: "hinge" hinge_loss_param { norm: L2 } }
layer { name: "info" type: "InfogainLoss" bottom: "ip" bottom: "ones" bottom: "H" top: "info" }
layer { name: "contr" type: "ContrastiveLoss" bottom: "ip" bottom: "par" bottom: "ones" top: "contr" }
layer { name: "mlog" type: "MultinomialLogisticLoss" bottom: "prob" bottom: "ones" top: "mlog" }
layer { name: "seq" type: "Reshape" bottom: "ip" top: "seq" reshape_param { shape { dim: 2 dim: 1 dim: 5 } } }
layer { name: "cont" type: "Reshape" bottom: "ones" top: "cont" reshape_param { shape { dim: 2 dim: 1 } } }
layer { name: "lstm" type: "LSTM" bottom: "seq" bottom: "cont" top: "lstm" recurrent_param { num_output: 3 } }
layer { name: "rnn" type: "RNN" bottom: "seq" bottom: "cont" top: "rnn" recurrent_param { num_output: 2 } }
layer { name: "gates" type: "Parameter" top: "gates" parameter_param { shape { dim: 1 dim: 2 dim: 20 } } }
layer { name: "c_prev" type: "Reshape" bottom: "par" top: "c_prev" reshape_param { shape { dim: 1 dim: 2 dim: 5 } } }
layer { name: "cont1" type: "Reshape" bottom: "ones" top: "cont1" reshape_param { shape { dim: 1 dim: 2 } } }
layer { name: "unit" type: "LSTMUnit" bottom: "c_prev" bottom: "gates" bottom: "cont1" top: "c_t" top: "h_t" }
layer { name: "dummy" type: "DummyData" top: "dummy"
        dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "constant" value: 0.5 } } }
layer { name: "sil" type: "Silence" bottom: "arg" }
"""

# Fixture prototxts used as they are (small already); names relative to tests/fixtures.
FIXTURE_SEEDS = [
    "formats/caffe_v0_deploy.prototxt", "formats/caffe_v1_deploy.prototxt",
    "formats/caffe_v2_batchnorm.prototxt", "formats/v2_input_shape.prototxt",
    "formats/v0_simple.prototxt", "formats/v0_all_params.prototxt", "formats/v1_mixed.prototxt",
    "formats/v0_padding_two_tops.prototxt", "mutation/pools.prototxt", "mutation/zoo.prototxt",
    "trained/caffenet_tiny_deploy.prototxt", "trained/deconv_tiny_deploy.prototxt",
    "trained/resnet_tiny_deploy.prototxt", "trained/resnet_tiny_train.prototxt",
]
# Full-size nets, narrowed before use.
NARROWED_SEEDS = [REPO / "porting" / "models" / "caffenet.prototxt"]
REFERENCE_SEEDS = ["bvlc-prototxt/bvlc_alexnet.deploy.prototxt",
                   "bvlc-prototxt/bvlc_reference_caffenet.deploy.prototxt",
                   "bvlc-prototxt/bvlc_googlenet.deploy.prototxt",
                   "mfv-original/deploy_alexnet_updated.prototxt"]


@dataclasses.dataclass(frozen=True)
class Seed:
    name: str                  # e.g. "zoo@v1": the net and the caffemodel layout
    prototxt: bytes
    caffemodel: bytes | None
    weight: float = 1.0        # relative chance of being drawn


def _narrow(text: str) -> str:
    """The net with at most CAP_CHANNELS outputs per layer, batch 1 and 227-wide inputs
    made CAP_SIDE wide, so a forward takes milliseconds (V2 nets; others are returned as is)."""
    net = caffe_pb2.NetParameter()
    text_format.Parse(text, net)

    def visit(msg):
        for fd, value in msg.ListFields():
            if fd.message_type is not None:
                for m in (value if fd.is_repeated else [value]):
                    visit(m)
            elif fd.name == "num_output" and value > CAP_CHANNELS:
                setattr(msg, fd.name, CAP_CHANNELS)

    visit(net)
    shapes = [s for layer in net.layer if layer.type == "Input" for s in layer.input_param.shape]
    for shape in list(shapes) + list(net.input_shape):
        for i, d in enumerate(shape.dim):
            shape.dim[i] = 1 if i == 0 else CAP_SIDE if d == 227 else d
    for i, d in enumerate(net.input_dim):
        net.input_dim[i] = 1 if i % 4 == 0 else CAP_SIDE if d == 227 else d
    return text_format.MessageToString(net)


def _weights_for(prototxt: bytes, folder: Path, tag: str) -> list[tuple[str, str, list]] | None:
    """(name, type, random arrays) for every layer of the net, or None if it does not load."""
    from porting.net import load_caffe

    path = folder / f"{tag}.prototxt"
    path.write_bytes(prototxt)
    try:
        net = load_caffe(path)
    except PortingError:
        return None
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    layers = []
    for spec in net.graph.layers:
        arrays = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in spec.module.param_shapes]
        if spec.type == "BatchNorm" and arrays:
            arrays = [arrays[0], np.abs(arrays[1]) + 0.5, np.ones_like(arrays[2])]
        layers.append((spec.name, spec.type, arrays))
    return layers


def build_seeds(reference: bool = True) -> list[Seed]:
    """The seed corpus: each net as a prototxt alone and with a caffemodel in each layout
    its layer types allow. ``reference``: add ../shared/reference-data nets if present."""
    from porting.write import FORMATS, write_caffemodel

    texts: list[tuple[str, bytes, float]] = [("all_types", ALL_TYPES.encode(), 1.0)]
    texts += [(Path(r).stem, (FIXTURES / r).read_bytes(), 1.0) for r in FIXTURE_SEEDS]
    texts += [(p.stem, _narrow(p.read_text()).encode(), 0.5) for p in NARROWED_SEEDS]
    if reference and SHARED.is_dir():
        texts += [(Path(r).stem, _narrow((SHARED / r).read_text()).encode(), 0.3 if "googlenet" in r else 0.5)
                  for r in REFERENCE_SEEDS if (SHARED / r).is_file()]
    seeds = []
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
        folder = Path(tmp)
        for tag, text, weight in texts:
            layers = _weights_for(text, folder, tag)
            seeds.append(Seed(tag, text, None, weight * (0.5 if layers is None else 1.0)))
            for fmt in FORMATS if layers is not None else ():
                out = folder / f"{tag}.{fmt}.caffemodel"
                try:  # all layers, as Caffe saves them; else the weighted ones only (no Input in V1)
                    write_caffemodel(out, layers, format=fmt)
                except PortingError:
                    try:
                        write_caffemodel(out, [l for l in layers if l[2]], format=fmt)
                    except PortingError:  # a weighted type the older layout did not have
                        continue
                seeds.append(Seed(f"{tag}@{fmt}", text, out.read_bytes(), weight))
    return seeds


def corpus_digest(seeds: list[Seed]) -> str:
    h = hashlib.sha256()
    for s in seeds:
        h.update(s.name.encode() + b"\0" + s.prototxt + b"\0" + (s.caffemodel or b"-"))
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- edge values
INT32 = [0, 1, 2, 3, -1, -2, 7, 64, 1000, 4096, 65536, 2**30, 2**31 - 1, -2**31]
UINT32 = [0, 1, 2, 3, 7, 64, 1000, 4096, 65536, 2**31 - 1, 2**31, 2**32 - 1]
INT64 = INT32 + [2**32, 2**40, 2**62, 2**63 - 1, -2**63]
UINT64 = UINT32 + [2**32, 2**40, 2**63, 2**64 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, 1e-38, 1e10, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]
NAMES = ["", " ", "type", "forward", "train", "training", "_modules", "__class__", "__init__",
         "layers", "params", "graph", "0", "-1", "a.b", "..", "a/b", "/etc/passwd", "data",
         "x\ny", "\r", "\t", "\x1b[2J", "\x00", "\x7f", "\u202e", "\u2028", "\ufeff", "\u00a0", "é",
         "名前", "x" * 300, "${HOME}", "%s%n", "{0}", "a b"]
TYPES = ["Input", "Convolution", "Deconvolution", "Pooling", "InnerProduct", "ReLU", "Softmax",
         "Concat", "Slice", "Split", "Eltwise", "BatchNorm", "Scale", "Bias", "Flatten", "Reshape",
         "Crop", "ArgMax", "LRN", "PReLU", "ELU", "Dropout", "Power", "Exp", "Log", "Threshold",
         "Silence", "Clip", "Swish", "Tile", "Reduction", "SPP", "Im2col", "Parameter", "BatchReindex", "Filter",
         "HDF5Output", "Python", "Data", "SoftmaxWithLoss", "MVN", "Embed", "Accuracy", "EuclideanLoss",
         "SigmoidCrossEntropyLoss", "HingeLoss", "InfogainLoss", "ContrastiveLoss", "MultinomialLogisticLoss",
         "LSTM", "RNN", "LSTMUnit", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "", "convolution",
         "Convolution ", "CONVOLUTION", "\x00"]
NUMBER_TOKENS = ["0", "-0", "1", "-1", "2", "3", "07", "0x10", "2147483647", "2147483648", "-2147483648",
                 "-2147483649", "4294967295", "4294967296", "9223372036854775807", "9223372036854775808",
                 "18446744073709551615", "18446744073709551616", "99999999999999999999999999",
                 "1e308", "1e309", "-1e309", "1e-46", "3.5e38", "nan", "-nan", "inf", "-inf",
                 "infinity", "NaN", "0.5", "1.5", "-0.5", "1e5", "1f", "", "--1", "1..2", "1e", "true"]
ENUM_TOKENS = ["MAX", "AVE", "STOCHASTIC", "SUM", "PROD", "TRAIN", "TEST", "CAFFE", "CUDNN",
               "ACROSS_CHANNELS", "WITHIN_CHANNEL", "STRICT", "PERMISSIVE", "LMDB", "DEFAULT",
               "0", "1", "-1", "7", "99", "2147483648", "MAXX", "max", "true", "false", '"MAX"', "{}"]
STRING_TOKENS = ['"\\n"', '"\\x1b[2J"', '"\\000"', '"\\377\\376"', '"\\u202e"', '"\\xff"', '"\\"', '"\\q"',
                 '"' + "y" * 5000 + '"', "''", '"a" "b"', '"unterminated', "bare", '"\\U0010ffff"', '"\\ud800"']
SPECIAL_F32 = [0x7FC00000, 0x7F800001, 0x7FBFFFFF, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x00000001,
               0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000]
SPECIAL_F64 = [1e300, -1e300, 3.4028235677973366e38, 3.4028235677973362e38, 1e-320, 5e-324, math.nan,
               math.inf, -math.inf, -0.0, 1.0000000596046448]


# --------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    """One fuzz input: the files and how they were made."""
    index: int
    seed_net: str
    family: str
    mutations: list[str]
    prototxt: bytes
    caffemodel: bytes | None
    phase: str = "test"

    @property
    def size(self) -> int:
        return len(self.prototxt) + len(self.caffemodel or b"")


FAMILIES = {"prototxt-structure": 0.27, "prototxt-text": 0.12, "prototxt-bytes": 0.08,
            "caffemodel-wire": 0.33, "caffemodel-bytes": 0.12, "foreign": 0.08}


def make_case(seeds: list[Seed], seed: int, index: int) -> Case:
    """Input ``index`` of campaign ``seed``: the same on every run for the same corpus."""
    rng = random.Random(f"fuzz:{seed}:{index}")
    family = rng.choices(list(FAMILIES), list(FAMILIES.values()))[0]
    pool = [s for s in seeds if s.caffemodel is not None] if family.startswith("caffemodel") else seeds
    s = rng.choices(pool, [x.weight for x in pool])[0]
    case = Case(index, s.name, family, [], s.prototxt, s.caffemodel, "train" if rng.random() < 0.1 else "test")
    n = 1 + (rng.random() < 0.35) + (rng.random() < 0.12)
    for _ in range(n):
        MUTATORS[family](rng, case, seeds)
    case.prototxt = case.prototxt[:MAX_FILE]
    if case.caffemodel is not None:
        case.caffemodel = case.caffemodel[:MAX_FILE]
    return case


# -- bytes -----------------------------------------------------------------------
def mutate_bytes(rng: random.Random, data: bytes, others: list[bytes]) -> tuple[bytes, str]:
    """One byte-level edit: flip, set, truncate, insert, duplicate, delete, splice."""
    b = bytearray(data)
    op = rng.choice(["flip", "set", "truncate", "insert", "duplicate", "delete", "splice"])
    n = len(b)
    if n == 0:
        op = "insert"
    if op == "flip":
        for _ in range(rng.choice([1, 1, 2, 4, 8])):
            b[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif op == "set":
        for _ in range(rng.choice([1, 2, 4])):
            b[rng.randrange(n)] = rng.choice([0, 0xFF, 0x7F, 0x80, 0x0A, 0x22, 0x7B, 0x7D, rng.randrange(256)])
    elif op == "truncate":
        del b[rng.randrange(n):]
    elif op == "insert":
        at = rng.randrange(n + 1)
        b[at:at] = bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 4, 16, 64])))
    elif op == "duplicate":
        a = rng.randrange(n)
        piece = bytes(b[a:a + rng.choice([1, 4, 16, 64, 256, 4096])])
        at = rng.randrange(n + 1)
        b[at:at] = piece * rng.choice([1, 1, 2, 10, 100])
    elif op == "delete":
        a = rng.randrange(n)
        del b[a:a + rng.choice([1, 2, 8, 64, 1024])]
    else:
        other = rng.choice(others) if others else data
        cut, cut2 = rng.randrange(n + 1), rng.randrange(len(other) + 1)
        b = b[:cut] + other[cut2:]
    return bytes(b[:MAX_FILE]), f"bytes:{op}"


def _prototxt_bytes(rng, case, seeds):
    case.prototxt, what = mutate_bytes(rng, case.prototxt, [s.prototxt for s in seeds])
    _maybe_drop_model(rng, case)
    case.mutations.append(what)


def _caffemodel_bytes(rng, case, seeds):
    case.caffemodel, what = mutate_bytes(rng, case.caffemodel or b"", [s.caffemodel for s in seeds if s.caffemodel])
    case.mutations.append(what)


def _maybe_drop_model(rng, case):
    if case.caffemodel is not None and rng.random() < 0.4:
        case.caffemodel = None
        case.mutations.append("no caffemodel")


# -- prototxt text -----------------------------------------------------------------
_NUMBER = re.compile(rb"(?<=:)[ \t]*(-?(?:0x[0-9a-fA-F]+|[0-9][0-9.]*(?:[eE][-+]?[0-9]+)?|inf|nan))")
_ENUM = re.compile(rb"(?<=:)[ \t]*([A-Z][A-Z_0-9]*)\b")
_STRING = re.compile(rb"(?<=:)[ \t]*(\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*')")


def _prototxt_text(rng, case, seeds):
    text = case.prototxt
    kind = rng.choice(["number", "number", "enum", "string", "line", "brace", "encoding"])
    if kind in ("number", "enum", "string"):
        pattern, tokens = {"number": (_NUMBER, NUMBER_TOKENS), "enum": (_ENUM, ENUM_TOKENS),
                           "string": (_STRING, STRING_TOKENS)}[kind]
        spans = [m.span(1) for m in pattern.finditer(text)]
        if not spans:
            return _prototxt_bytes(rng, case, seeds)
        for a, b in sorted(rng.sample(spans, min(len(spans), rng.choice([1, 1, 2, 5]))), reverse=True):
            token = rng.choice(tokens) if kind != "string" or rng.random() < 0.5 else _quoted(rng.choice(NAMES))
            text = text[:a] + token.encode() + text[b:]
        what = f"text:{kind}"
    elif kind == "line":
        lines = text.split(b"\n")
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        op = rng.choice(["drop", "dup", "swap"])
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(j, lines[i])
        else:
            lines[i], lines[j] = lines[j], lines[i]
        text, what = b"\n".join(lines), f"text:line-{op}"
    elif kind == "brace":
        opens = [m.start() for m in re.finditer(rb"[{}]", text)]
        op = rng.choice(["drop", "nest"])
        if op == "drop" and opens:
            at = rng.choice(opens)
            text = text[:at] + text[at + 1:]
        else:
            depth = rng.choice([10, 100, 1000, 5000])
            text = text + b"layer { " + b"include { " * depth + b"}" * (depth + 1)
        what = f"text:brace-{op}"
    else:
        op = rng.choice(["bom", "crlf", "latin1", "utf16", "nul", "comment"])
        text = {"bom": lambda t: b"\xef\xbb\xbf" + t, "crlf": lambda t: t.replace(b"\n", b"\r\n"),
                "latin1": lambda t: b"# caf\xe9\n" + t.replace(b'"', b'"\xe9', 1),
                "utf16": lambda t: t.decode("latin-1").encode("utf-16"),
                "nul": lambda t: t[: len(t) // 2] + b"\x00" + t[len(t) // 2:],
                "comment": lambda t: t.replace(b"\n", b" # } {\n", 3)}[op](text)
        what = f"text:{op}"
    case.prototxt = text
    _maybe_drop_model(rng, case)
    case.mutations.append(what)


def _quoted(name: str) -> str:
    """A prototxt string literal holding ``name`` (C escapes for bytes outside ASCII print)."""
    out = []
    for byte in name.encode("utf-8"):
        ch = chr(byte)
        out.append(ch if 32 <= byte < 127 and ch not in "\"\\'" else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


# -- prototxt structure --------------------------------------------------------------
def _param_field(layer_desc, type_name: str) -> str | None:
    """The LayerParameter ``*_param`` field of a layer type (Deconvolution uses convolution's)."""
    want = "convolution" if type_name == "Deconvolution" else type_name.lower()
    for fd in layer_desc.fields:
        if fd.name.endswith("_param") and fd.name[:-6].replace("_", "") == want:
            return fd.name
    return None


def _set_fields(msg):
    """(message, field descriptor) for every field set anywhere in ``msg``."""
    for fd, value in msg.ListFields():
        yield msg, fd
        if fd.message_type is not None:
            for m in (value if fd.is_repeated else [value]):
                yield from _set_fields(m)


def _messages(msg):
    yield msg
    for fd, value in msg.ListFields():
        if fd.message_type is not None:
            for m in (value if fd.is_repeated else [value]):
                yield from _messages(m)


def _edge_value(rng, fd, names: list[str]):
    t = fd.type
    if t == fd.TYPE_STRING or t == fd.TYPE_BYTES:
        pool = TYPES if fd.name == "type" else NAMES + names
        value = rng.choice(pool)
        return value.encode() if t == fd.TYPE_BYTES else value
    if t == fd.TYPE_BOOL:
        return rng.random() < 0.5
    if t == fd.TYPE_ENUM:
        return rng.choice(fd.enum_type.values).number
    if t in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return rng.choice(FLOATS + ([1e308, -1e308] if t == fd.TYPE_DOUBLE else []))
    if t in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        return rng.choice(UINT32)
    if t in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
        return rng.choice(UINT64)
    if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        return rng.choice(INT64)
    return rng.choice(INT32)


def _assign(msg, fd, value, rng) -> None:
    """Set scalar field ``fd`` of ``msg``: replace one element of a repeated field, or append."""
    if fd.is_repeated:
        items = getattr(msg, fd.name)
        if len(items) and rng.random() < 0.6:
            items[rng.randrange(len(items))] = value
        else:
            items.append(value)
    else:
        setattr(msg, fd.name, value)


def _structure_op(rng, net, names) -> str:
    v2 = len(net.layer) > 0 or len(net.layers) == 0
    layers = net.layer if v2 else net.layers
    op = rng.choice(["value", "value", "value", "param", "param", "clear", "repeated", "layer", "layer",
                     "bottom", "top", "name", "type", "rule", "net-input"])
    if op == "value":
        fields = [(m, fd) for m, fd in _set_fields(net) if fd.message_type is None]
        if not fields:
            return "none"
        m, fd = rng.choice(fields)
        _assign(m, fd, _edge_value(rng, fd, names), rng)
        return f"value:{fd.name}"
    if op == "param" and len(layers):
        layer = rng.choice(layers)
        target = None
        if v2:
            pname = _param_field(layer.DESCRIPTOR, layer.type)
            if pname:
                target = getattr(layer, pname)
        if target is None:
            target = rng.choice(list(_messages(layer)))
        fd = rng.choice(target.DESCRIPTOR.fields)
        if fd.message_type is not None:
            sub = getattr(target, fd.name).add() if fd.is_repeated else getattr(target, fd.name)
            sub.SetInParent()
            if sub.DESCRIPTOR.fields and rng.random() < 0.7:
                sfd = rng.choice(sub.DESCRIPTOR.fields)
                if sfd.message_type is None:
                    _assign(sub, sfd, _edge_value(rng, sfd, names), rng)
                    return f"param:{fd.name}.{sfd.name}"
            return f"param:{fd.name}"
        for _ in range(rng.choice([1, 1, 2, 5, 40])):
            _assign(target, fd, _edge_value(rng, fd, names), rng)
        return f"param:{fd.name}"
    if op == "clear":
        fields = list(_set_fields(net))
        if not fields:
            return "none"
        m, fd = rng.choice(fields)
        m.ClearField(fd.name)
        return f"clear:{fd.name}"
    if op == "repeated":
        fields = [(m, fd) for m, fd in _set_fields(net) if fd.is_repeated and fd.message_type is None]
        if not fields:
            return "none"
        m, fd = rng.choice(fields)
        items = getattr(m, fd.name)
        how = rng.choice(["drop", "dup", "reverse", "many"])
        values = list(items)
        if how == "drop":
            del values[rng.randrange(len(values))]
        elif how == "dup":
            values.insert(rng.randrange(len(values) + 1), rng.choice(values))
        elif how == "reverse":
            values.reverse()
        else:
            values += [rng.choice(values)] * rng.choice([10, 40, 1000])
        m.ClearField(fd.name)
        getattr(m, fd.name).extend(values)
        return f"repeated-{how}:{fd.name}"
    if op == "layer" and len(layers):
        how = rng.choice(["drop", "dup", "move", "swap", "many"])
        i = rng.randrange(len(layers))
        copy = [type(l)() for l in layers]
        for c, l in zip(copy, layers):
            c.CopyFrom(l)
        if how == "drop":
            del copy[i]
        elif how == "dup":
            copy.insert(rng.randrange(len(copy) + 1), copy[i])
        elif how == "move":
            copy.insert(rng.randrange(len(copy)), copy.pop(i))
        elif how == "swap":
            j = rng.randrange(len(copy))
            copy[i], copy[j] = copy[j], copy[i]
        else:
            copy += [copy[i]] * rng.choice([50, 500])
        del layers[:]
        for c in copy:
            layers.add().CopyFrom(c)
        return f"layer-{how}"
    if op in ("bottom", "top") and len(layers):
        layer = rng.choice(layers)
        items = getattr(layer, op)
        blobs = [t for l in layers for t in l.top] or ["data"]
        how = rng.choice(["set", "add", "clear", "self", "forward"])
        if how == "clear":
            del items[:]
        elif how == "self":
            items.append(layer.top[0] if len(layer.top) else "x")
        elif how == "forward":
            items.append(blobs[-1])
        else:
            value = rng.choice(blobs + NAMES)
            if how == "set" and len(items):
                items[rng.randrange(len(items))] = value
            else:
                items.append(value)
        return f"{op}-{how}"
    if op == "name" and len(layers):
        layer = rng.choice(layers)
        inner = layer.layer if not v2 and layer.HasField("layer") else layer
        inner.name = rng.choice(NAMES + [l.name for l in layers])
        return "name"
    if op == "type" and len(layers):
        layer = rng.choice(layers)
        if v2:
            layer.type = rng.choice(TYPES)
        elif layer.HasField("layer"):
            layer.layer.type = rng.choice(["conv", "pool", "innerproduct", "relu", "padding", "data", "nope", ""])
        else:
            layer.type = rng.choice(caffe_pb2.V1LayerParameter.LayerType.values())
        return "type"
    if op == "rule" and len(layers):
        layer = rng.choice(layers)
        rule = (layer.include if rng.random() < 0.5 else layer.exclude).add()
        what = rng.choice(["phase", "min_level", "max_level", "stage", "not_stage"])
        if what == "phase":
            rule.phase = rng.choice([caffe_pb2.TRAIN, caffe_pb2.TEST])
        elif what in ("min_level", "max_level"):
            setattr(rule, what, rng.choice(INT32))
        else:
            getattr(rule, what).append(rng.choice(NAMES))
        return f"rule:{what}"
    if op == "net-input":
        how = rng.choice(["input", "input_dim", "input_shape", "clear-inputs", "state", "force_backward"])
        if how == "input":
            net.input.append(rng.choice(["data", "extra"] + NAMES))
        elif how == "input_dim":
            net.input_dim.extend(rng.choice(INT32) for _ in range(rng.choice([1, 3, 4, 8])))
        elif how == "input_shape":
            net.input_shape.add().dim.extend(rng.choice(INT64) for _ in range(rng.choice([0, 1, 4, 40])))
        elif how == "clear-inputs":
            for f in ("input", "input_dim", "input_shape"):
                net.ClearField(f)
        elif how == "state":
            net.state.phase = rng.choice([caffe_pb2.TRAIN, caffe_pb2.TEST])
            net.state.level = rng.choice(INT32)
        else:
            net.force_backward = True
        return f"net:{how}"
    return "none"


def _prototxt_structure(rng, case, seeds):
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(case.prototxt.decode("utf-8", "replace"), net)
    except Exception:  # an earlier byte mutation broke the text: edit the text instead
        return _prototxt_text(rng, case, seeds)
    blobs = [t for l in list(net.layer) + list(net.layers) for t in l.top]
    names = [l.name for l in net.layer] + blobs
    try:
        what = _structure_op(rng, net, names)
    except (ValueError, TypeError, OverflowError) as err:  # protobuf refused the value
        what = f"structure-refused-by-protobuf:{type(err).__name__}"
    case.prototxt = text_format.MessageToString(net).encode("utf-8")
    _maybe_drop_model(rng, case)
    case.mutations.append(f"structure:{what}")


# -- caffemodel wire ------------------------------------------------------------------
# LEN fields parsed as sub-messages: message kind -> field number -> kind.
WIRE_SCHEMA = {"net": {100: "layer", 2: "v1layer", 8: "shape"}, "layer": {7: "blob"},
               "v1layer": {6: "blob", 1: "v0layer"}, "v0layer": {50: "blob"}, "blob": {7: "shape"},
               "shape": {}}


@dataclasses.dataclass
class Node:
    """One wire field. ``value``: int (VARINT), bytes (I32, I64, raw LEN), list of Node
    (a parsed LEN message) or bytes written verbatim when ``no`` is None (junk)."""
    no: int | None
    wire: int
    value: object
    kind: str = ""               # message kind of a parsed LEN value
    key_raw: bytes | None = None  # overrides the key's encoding
    len_raw: bytes | None = None  # overrides the length prefix's encoding


def overlong(value: int, extra: int) -> bytes:
    """``value`` as a varint padded with ``extra`` redundant continuation bytes."""
    return varint(value, len(varint(value)) + extra)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def parse_wire(data: bytes, kind: str = "net") -> list[Node]:
    """The fields of ``data`` (a seed's well-formed message); raises ValueError otherwise."""
    nodes, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        no, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _read_varint(data, pos)
            nodes.append(Node(no, wire, value))
        elif wire in (I32, I64):
            width = 4 if wire == I32 else 8
            nodes.append(Node(no, wire, data[pos:pos + width]))
            pos += width
        elif wire == LEN:
            n, pos = _read_varint(data, pos)
            payload = data[pos:pos + n]
            pos += n
            sub = WIRE_SCHEMA.get(kind, {}).get(no)
            nodes.append(Node(no, wire, parse_wire(payload, sub), sub) if sub else Node(no, wire, payload))
        else:
            raise ValueError("groups are not parsed")
        if pos > len(data):
            raise ValueError("truncated")
    return nodes


def serialize(nodes: list[Node]) -> bytes:
    out = bytearray()
    for n in nodes:
        if n.no is None:
            out += n.value
            continue
        out += n.key_raw if n.key_raw is not None else varint(n.no << 3 | n.wire)
        if n.wire == VARINT:
            out += varint(n.value)
        elif n.wire == LEN:
            payload = serialize(n.value) if isinstance(n.value, list) else n.value
            out += (n.len_raw if n.len_raw is not None else varint(len(payload))) + payload
        else:
            out += n.value
    return bytes(out)


def _walk(nodes: list[Node], kind: str = "net"):
    """(parent list, node, parent kind) for every node, depth first."""
    for n in nodes:
        yield nodes, n, kind
        if isinstance(n.value, list):
            yield from _walk(n.value, n.kind)


def _of_kind(tree, kind):
    return [n for _, n, _ in _walk(tree) if n.kind == kind and isinstance(n.value, list)]


def _floats(n: int, rng) -> bytes:
    return struct.pack(f"<{n}f", *(rng.uniform(-1, 1) for _ in range(n)))


def _packed(no: int, payload: bytes) -> Node:
    return Node(no, LEN, payload)


def _w_length(rng, tree):
    nodes = [n for _, n, _ in _walk(tree) if n.wire == LEN and n.no is not None]
    n = rng.choice(nodes)
    true = len(serialize(n.value) if isinstance(n.value, list) else n.value)
    n.len_raw = rng.choice([varint(true + 1), varint(max(true - 1, 0)), varint(true + rng.randrange(2, 100)),
                            varint(0), varint(2**31 - 1), varint(2**31), varint(2**32 + true), varint(2**63),
                            varint(2**64 - 1), overlong(true, rng.randrange(1, 6)), b"\xff" * 10 + b"\x01",
                            b"\x80" * 9])
    return f"length:field{n.no}"


def _w_key(rng, tree):
    _, n, _ = rng.choice(list(_walk(tree)))
    if n.no is None:
        return "none"
    how = rng.choice(["overlong", "wire", "number"])
    if how == "overlong":
        n.key_raw = overlong(n.no << 3 | n.wire, rng.randrange(1, 6))
    elif how == "wire":
        n.key_raw = varint(n.no << 3 | rng.choice([w for w in range(8) if w != n.wire]))
    else:
        n.key_raw = varint(rng.choice([0, 1, 2, 7, 100, 2**29 - 1, 19000, 536870911, 2**32]) << 3 | n.wire)
    return f"key-{how}:field{n.no}"


def _w_dims(rng, tree):
    blobs = _of_kind(tree, "blob")
    if not blobs:
        return "none"
    blob = rng.choice(blobs)
    dims = rng.choice([[], [0], [-1], [1, -1], [2**31], [2**31 - 1, 2], [2**63 - 1], [2**32, 2**32],
                       [1] * 40, [0, 2**40], [3, 0, 5], [-(2**63)], [2**62, 4],
                       [rng.choice(INT64) for _ in range(rng.randrange(1, 6))]])
    if rng.random() < 0.5:
        shape = [_packed(1, b"".join(varint(d) for d in dims))]
    else:
        shape = [Node(1, VARINT, d) for d in dims]
    blob.value = [n for n in blob.value if n.no != 7]
    blob.value.insert(rng.randrange(len(blob.value) + 1), Node(7, LEN, shape, "shape"))
    return f"dims:{len(dims)}"


def _data_nodes(tree):
    return [(blob, n) for blob in _of_kind(tree, "blob") for n in blob.value if n.no == 5 and n.wire == LEN]


def _w_count(rng, tree):
    found = _data_nodes(tree)
    if not found:
        return "none"
    blob, n = rng.choice(found)
    how = rng.choice(["fewer", "more", "empty", "chunks", "extra-chunk"])
    if how == "fewer":
        n.value = n.value[: max(0, len(n.value) - 4 * rng.choice([1, 2, 10]))]
    elif how == "more":
        n.value += _floats(rng.choice([1, 2, 10, 1000]), rng)
    elif how == "empty":
        n.value = b""
    elif how == "chunks":
        i = blob.value.index(n)
        cut = 4 * rng.randrange(len(n.value) // 4 + 1)
        blob.value[i:i + 1] = [_packed(5, n.value[:cut]), _packed(5, n.value[cut:])]
    else:
        blob.value.append(_packed(5, _floats(rng.choice([1, 3]), rng)))
    return f"count:{how}"


def _w_packing(rng, tree):
    found = _data_nodes(tree)
    if not found:
        return "none"
    blob, n = rng.choice(found)
    i = blob.value.index(n)
    values = [n.value[k:k + 4] for k in range(0, len(n.value) - 3, 4)]
    how = rng.choice(["unpacked", "mixed", "interrupted", "ragged", "packed-double-width"])
    if how == "unpacked":
        blob.value[i:i + 1] = [Node(5, I32, v) for v in values]
    elif how == "mixed":
        half = len(values) // 2
        blob.value[i:i + 1] = [Node(5, I32, v) for v in values[:half]] + [_packed(5, b"".join(values[half:]))]
    elif how == "interrupted":
        recs = [Node(5, I32, v) for v in values]
        recs.insert(rng.randrange(len(recs) + 1), rng.choice([Node(6, I32, b"\0\0\0\0"), Node(99, VARINT, 1),
                                                             Node(5, I64, b"\0" * 8)]))
        blob.value[i:i + 1] = recs
    elif how == "ragged":
        n.value = n.value[: max(0, len(n.value) - rng.choice([1, 2, 3]))] if n.value else b"\0"
    else:
        blob.value[i:i + 1] = [Node(5, I64, v + v) for v in values[:8]]
    return f"packing:{how}"


def _w_nan(rng, tree):
    found = _data_nodes(tree)
    if not found:
        return "none"
    _, n = rng.choice(found)
    b = bytearray(n.value)
    if len(b) < 4:
        return "none"
    for _ in range(rng.choice([1, 2, 10])):
        k = 4 * rng.randrange(len(b) // 4)
        b[k:k + 4] = struct.pack("<I", rng.choice(SPECIAL_F32))
    n.value = bytes(b)
    return "nan-bits"


def _w_double(rng, tree):
    found = _data_nodes(tree)
    if not found:
        return "none"
    blob, n = rng.choice(found)
    count = len(n.value) // 4
    values = [rng.choice(SPECIAL_F64) if rng.random() < 0.3 else rng.uniform(-1, 1) for _ in range(count)]
    payload = struct.pack(f"<{count}d", *values)
    if rng.random() < 0.1:  # a NaN with a payload
        payload = struct.pack("<Q", 0x7FF0000000000001) + payload[8:]
    how = rng.choice(["replace", "both", "empty", "fewer", "unpacked", "diff"])
    i = blob.value.index(n)
    if how == "replace":
        blob.value[i] = _packed(8, payload)
    elif how == "both":
        blob.value.insert(rng.randrange(len(blob.value) + 1), _packed(8, payload))
    elif how == "empty":
        blob.value.insert(i + 1, _packed(8, b""))
    elif how == "fewer":
        blob.value[i] = _packed(8, payload[:-8])
    elif how == "unpacked":
        blob.value[i:i + 1] = [Node(8, I64, payload[k:k + 8]) for k in range(0, len(payload), 8)]
    else:
        blob.value.append(_packed(9, payload))
    return f"double:{how}"


def _w_legacy(rng, tree):
    blobs = _of_kind(tree, "blob")
    if not blobs:
        return "none"
    blob = rng.choice(blobs)
    dims = rng.choice([[1, 1, 1, 1], [0, 0, 0, 0], [-1, 1, 1, 1], [2**31 - 1] * 4, [1, 1, 65536, 65536],
                       [rng.choice(INT32) for _ in range(4)], [3], [1, 1]])
    how = rng.choice(["replace", "add"])
    if how == "replace":
        blob.value = [n for n in blob.value if n.no != 7]
    blob.value[:0] = [Node(f, VARINT, d) for f, d in zip((1, 2, 3, 4), dims)]
    return f"legacy-dims:{how}"


def _w_layers(rng, tree):
    entries = [n for n in tree if n.no in (100, 2) and isinstance(n.value, list)]
    if not entries:
        return "none"
    how = rng.choice(["drop", "dup", "swap", "rename", "retype", "to-v1", "v2-beside-v1", "many", "blob-drop",
                      "blob-dup", "blob-empty"])
    e = rng.choice(entries)
    i = tree.index(e)
    name_no = 4 if e.no == 2 else 1
    if how == "drop":
        del tree[i]
    elif how == "dup":
        tree.insert(rng.randrange(len(tree) + 1), dataclasses.replace(e))
    elif how == "swap":
        j = tree.index(rng.choice(entries))
        tree[i], tree[j] = tree[j], tree[i]
    elif how == "rename":
        name = rng.choice([b"", b"\xff\xfe", b"\xc3", b"a\x00b", b"\x1b[31m", "名".encode(), b"x" * 1000]
                          + [n.encode() for n in NAMES[:12]])
        e.value = [n for n in e.value if n.no != name_no] + [Node(name_no, LEN, name)]
    elif how == "retype":
        if e.no == 100:
            e.value = [n for n in e.value if n.no != 2] + [Node(2, LEN, rng.choice(TYPES).encode())]
        else:
            e.value = [n for n in e.value if n.no != 5] + [Node(5, VARINT, rng.choice([0, 4, 14, 39, 40, 999, -1]))]
    elif how in ("to-v1", "v2-beside-v1") and e.no == 100:
        name = next((n.value for n in e.value if n.no == 1 and isinstance(n.value, bytes)), b"")
        blobs = [dataclasses.replace(n, no=6) for n in e.value if n.no == 7]
        v1 = Node(2, LEN, [Node(4, LEN, name), Node(5, VARINT, 4)] + blobs, "v1layer")
        if how == "to-v1":
            tree[i] = v1
        else:
            tree.insert(rng.randrange(len(tree) + 1), v1)
    elif how == "many":
        tree.extend(dataclasses.replace(e) for _ in range(rng.choice([100, 2000])))
    else:
        blob_no = {100: 7, 2: 6}[e.no]
        blobs = [n for n in e.value if n.no == blob_no]
        if not blobs:
            return "none"
        b = rng.choice(blobs)
        if how == "blob-drop":
            e.value.remove(b)
        elif how == "blob-dup":
            e.value.insert(rng.randrange(len(e.value) + 1), b)
        else:
            e.value.append(Node(blob_no, LEN, [], "blob"))
    return f"layers:{how}"


def _groups(no: int, depth: int) -> bytes:
    return varint(no << 3 | SGROUP) * depth + varint(no << 3 | EGROUP) * depth


def _w_unknown(rng, tree):
    holders = [(tree, "net")] + [(n.value, n.kind) for _, n, _ in _walk(tree) if isinstance(n.value, list)]
    nodes, _ = rng.choice(holders)
    no = rng.choice([15, 99, 999, 19000, 2**29 - 1])
    junk = rng.choice([
        varint(no << 3 | VARINT) + varint(rng.choice(UINT64)),
        varint(no << 3 | I32) + b"\x01\x02\x03\x04",
        varint(no << 3 | I64) + b"\x01" * 8,
        varint(no << 3 | LEN) + varint(5) + b"hello",
        _groups(no, rng.choice([1, 2, 10, 97, 98, 99, 100, 101, 1000])),
        varint(no << 3 | EGROUP),
        varint(no << 3 | SGROUP),
        varint(no << 3 | SGROUP) + varint(no + 1 << 3 | EGROUP),
        varint(no << 3 | 6) + b"\x00",
        varint(no << 3 | 7),
    ])
    nodes.insert(rng.randrange(len(nodes) + 1), Node(None, 0, junk))
    return "unknown-field"


def _w_diff(rng, tree):
    blobs = _of_kind(tree, "blob")
    if not blobs:
        return "none"
    blob = rng.choice(blobs)
    no = rng.choice([6, 9])
    width = 4 if no == 6 else 8
    how = rng.choice(["packed", "unpacked", "ragged"])
    count = rng.choice([0, 1, 5, 100])
    if how == "packed":
        blob.value.append(_packed(no, b"\x01" * (width * count)))
    elif how == "unpacked":
        blob.value += [Node(no, I32 if width == 4 else I64, b"\x01" * width) for _ in range(count)]
    else:
        blob.value.append(_packed(no, b"\x01" * (width * count + 1)))
    return f"diff:{how}"


def _w_toplevel(rng, tree):
    node = rng.choice([Node(1, LEN, rng.choice(NAMES).encode()), Node(3, LEN, b"data"), Node(4, VARINT, 7),
                       Node(4, LEN, varint(1) + varint(3)), Node(5, VARINT, 1), Node(6, LEN, b"\x08\x01"),
                       Node(100, VARINT, 5), Node(2, I32, b"\0\0\0\0"), Node(100, LEN, b""),
                       Node(8, LEN, varint(1 << 3) + varint(2**63))])
    tree.insert(rng.randrange(len(tree) + 1), node)
    return f"toplevel:field{node.no}"


WIRE_OPS = [_w_length, _w_key, _w_dims, _w_count, _w_packing, _w_nan, _w_double, _w_legacy, _w_layers,
            _w_unknown, _w_diff, _w_toplevel]
WIRE_WEIGHTS = [2, 1, 2, 2, 2, 1, 2, 1, 2, 2, 1, 1]


def _caffemodel_wire(rng, case, seeds):
    try:
        tree = parse_wire(case.caffemodel)
    except ValueError:  # an earlier edit broke the wire structure: edit bytes instead
        return _caffemodel_bytes(rng, case, seeds)
    op = rng.choices(WIRE_OPS, WIRE_WEIGHTS)[0]
    what = op(rng, tree)
    case.caffemodel = serialize(tree)
    case.mutations.append(f"wire:{what}")


# -- foreign -------------------------------------------------------------------------
def _foreign_bytes(rng, case, seeds) -> tuple[bytes, str]:
    import gzip
    import pickle
    import zipfile

    model = next((s.caffemodel for s in seeds if s.caffemodel), b"")
    kind = rng.choice(["empty", "png", "jpeg", "gif", "zip", "pickle", "npy", "hdf5", "gzip", "random",
                       "utf16", "prototxt", "caffemodel", "one-byte", "zeros"])
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps({"conv1.weight": [1.0, 2.0]}, protocol=2))
            z.writestr("archive/version", "3\n")
        return buf.getvalue(), kind
    data = {
        "empty": b"",
        "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(rng.randrange(256) for _ in range(64)),
        "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00" + bytes(range(64)),
        "gif": b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + bytes(32),
        "pickle": pickle.dumps({"layers": [1, 2, 3], "name": "CaffeNet"}, protocol=rng.choice([0, 2, 4])),
        "npy": (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }"
                + b" " * 50 + b"\n" + bytes(12)),
        "hdf5": b"\x89HDF\r\n\x1a\n" + bytes(64),
        "gzip": gzip.compress(model, mtime=0),
        "random": bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 100, 4096]))),
        "utf16": case.prototxt.decode("latin-1").encode("utf-16"),
        "prototxt": case.prototxt,
        "caffemodel": model,
        "one-byte": bytes([rng.randrange(256)]),
        "zeros": bytes(rng.choice([1, 8, 1000])),
    }[kind]
    return data, kind


def _foreign(rng, case, seeds):
    data, kind = _foreign_bytes(rng, case, seeds)
    if rng.random() < 0.6:
        case.caffemodel = data
        case.mutations.append(f"foreign-caffemodel:{kind}")
    else:
        case.prototxt = data
        case.mutations.append(f"foreign-prototxt:{kind}")


MUTATORS = {"prototxt-structure": _prototxt_structure, "prototxt-text": _prototxt_text,
            "prototxt-bytes": _prototxt_bytes, "caffemodel-wire": _caffemodel_wire,
            "caffemodel-bytes": _caffemodel_bytes, "foreign": _foreign}


# --------------------------------------------------------------------------- checks
class FuzzTimeout(BaseException):
    """Raised by the per-input alarm (a BaseException, so ``except Exception`` in the
    code under test does not swallow it)."""


_SILENT_BY_DEFAULT = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
_HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}  # what porting.errors promises never to print raw


def _printable_line(text: str) -> bool:
    return not any(unicodedata.category(ch) in _HIDDEN for ch in text)


def _rel(filename: str) -> str:
    path = Path(filename)
    try:
        return str(path.resolve().relative_to(REPO))
    except (ValueError, OSError):
        parts = filename.split("site-packages/")
        return parts[-1] if len(parts) > 1 else path.name


def _where(tb) -> str:
    """The innermost frame in porting/ (else the innermost frame) as file:line."""
    frames = traceback.extract_tb(tb)
    if not frames:
        return "?"
    project = [f for f in frames if _rel(f.filename).startswith("porting/")]
    if project:
        return f"{_rel(project[-1].filename)}:{project[-1].lineno}"
    harness = [f for f in frames if _rel(f.filename).startswith("tests/")]
    f = frames[-1]
    return f"no porting frame: {_rel(f.filename)}:{f.lineno}" + (f" from {harness[-1].name}" if harness else "")


def _is_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "not enough memory", "Cannot allocate memory", "bad_alloc"))


def _failure(kind: str, what: str, where: str, message: str, stage: str, detail: str = "") -> dict:
    return {"kind": kind, "what": what, "where": where, "message": message[:300], "stage": stage,
            "detail": detail[-6000:]}


def _exception_failure(err: BaseException, stage: str) -> dict:
    kind = "timeout" if isinstance(err, FuzzTimeout) else "memory" if _is_memory(err) else "exception"
    detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return _failure(kind, type(err).__name__, _where(err.__traceback__), repr(err)[:300], stage, detail)


def _message_failures(err: PortingError, files: list[Path], stage: str) -> list[dict]:
    """The PortingError promise: one printable line that starts with one of the files."""
    text, out = str(err), []
    where = _where(err.__traceback__)
    if "\n" in text or not _printable_line(text):
        out.append(_failure("message", "PortingError not one printable line", where, repr(text), stage))
    if not any(text.startswith(str(f) + ":") for f in files):
        out.append(_failure("message", "PortingError names no file", where, repr(text), stage))
    return out


def _template(message: str) -> str:
    """A walker message with the path dropped and numbers as N (a failure key)."""
    text = message.split(": ", 1)[-1]
    return re.sub(r"\b\d+\b", "N", text)[:90]


def differential(path: Path, mutations: list[str]) -> list[dict]:
    """``read_caffemodel`` against protobuf's parse of the same bytes, by the rule of
    tests/test_walker_protobuf.py (its ``compare``: the same layers, arrays bit for bit,
    shapes and diff counts, or both refusing, with its documented exceptions)."""
    from test_walker_protobuf import compare

    stage = "differential"
    try:
        compare(path.read_bytes(), path)
    except FuzzTimeout:
        raise
    except AssertionError as err:
        first = (str(err).splitlines() or [""])[0]
        if first.startswith("ours refused what protobuf accepts"):  # keyed by the walker's message
            where = _template(first.split(": ", 1)[-1])
        else:
            where = "after " + " + ".join(re.sub(r"\d+", "N", m) for m in mutations)
        return [_failure("differential", "walker and protobuf differ", where[:120],
                         first or repr(err), stage, traceback.format_exc())]
    except BaseException as err:  # reported once more by the load stage, under the same key
        return [_exception_failure(err, stage)]
    return []


def _cli_failures(argv: list[str], phase: str) -> list[dict]:
    """``porting inspect``: exit 0, 1 (an internal error: the exception is the failure) or
    2 with exactly one printable line on stderr."""
    from porting import cli

    # The inspect subcommand's namespace, built directly: build_parser imports every
    # feature module (legacy stack, verify, export), which the file check does not need.
    args = argparse.Namespace(command="inspect", func=cli._inspect, prototxt=argv[0],
                              caffemodel=argv[1] if len(argv) > 1 else None, phase=phase)
    caught: list[BaseException] = []
    inner = args.func

    def func(a):
        try:
            return inner(a)
        except BaseException as err:
            caught.append(err)
            raise

    args.func = func
    err_text, out_text = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err_text), contextlib.redirect_stdout(out_text):
        rc = cli.run_command("porting", args)
    stderr = err_text.getvalue()
    if caught and isinstance(caught[0], FuzzTimeout):
        raise caught[0]
    if rc == 1 and caught:
        return [_exception_failure(caught[0], "cli")]
    if rc == 2:
        lines = stderr.split("\n")
        if len(lines) == 2 and not lines[1] and _printable_line(lines[0]):
            return []
        # Keyed by what the first line says (the extra lines' source), not by the error.
        first = re.sub(r"'[^']*'|\"[^\"]*\"|(?<=layer )[^:]*|(?<=parameter )\w+", "…",
                       lines[0].replace(argv[0], "PROTOTXT"))
        return [_failure("cli", "exit 2 without exactly one printable stderr line",
                         "stderr: " + re.sub(r"\b\d+\b", "N", first)[:100], repr(stderr[:300]), "cli")]
    if rc == 0:
        if not all(_printable_line(line) for line in stderr.splitlines()) or "Traceback" in stderr:
            return [_failure("cli", "exit 0 with unprintable stderr", "?", repr(stderr[:300]), "cli")]
        return []
    return [_failure("cli", f"exit {rc}", "?", repr(stderr[:300]), "cli")]


def check_case(case: Case, folder: Path, stage=lambda name: None) -> dict:
    """Run one input (its files written into ``folder``): {"index", "outcome": "ok" | "refused"
    | "failure", "failures": [one dict per distinct key]}; ``stage(name)`` is told each stage."""
    import torch

    from porting.budget import Budget
    from porting.net import load_caffe

    proto = folder / "net.prototxt"
    proto.write_bytes(case.prototxt)
    model = folder / "net.caffemodel"
    if case.caffemodel is not None:
        model.write_bytes(case.caffemodel)
    elif model.exists():
        model.unlink()
    files = [proto] + ([model] if case.caffemodel is not None else [])
    failures: list[dict] = []
    outcome = "refused"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if case.caffemodel is not None:
                stage("differential")
                failures += differential(model, case.mutations)
            stage("load")
            try:
                net = load_caffe(proto, model if case.caffemodel is not None else None, phase=case.phase,
                                 budget=Budget.default(work=WORK_LIMIT, backward=True))
            except PortingError as err:
                failures += _message_failures(err, files, "load")
            except FuzzTimeout:
                raise
            except BaseException as err:
                failures.append(_exception_failure(err, "load"))
            else:
                step = "forward"
                stage(step)
                try:
                    g = torch.Generator().manual_seed(case.index)
                    inputs = {k: torch.randn(v, generator=g).requires_grad_() for k, v in net.inputs.items()}
                    blobs = net(**inputs)
                    outcome = "ok"
                    failures += _shape_failures(net)
                    step = "backward"
                    stage(step)
                    grads = [t.sum() for t in blobs.values() if t.requires_grad]
                    if grads:
                        torch.stack(grads).sum().backward()
                    blobs = {k: t.detach() for k, t in blobs.items()}
                    inputs = {k: t.detach() for k, t in inputs.items()}
                    step = "roundtrip"
                    stage(step)
                    failures += _roundtrip_failures(net, inputs, blobs, folder / "net.safetensors", case.phase)
                    del net, blobs, inputs
                except FuzzTimeout:
                    raise
                except PortingError as err:  # a net that loads but refuses to run (Dropout at TRAIN)
                    if "\n" in str(err) or not _printable_line(str(err)):
                        failures.append(_failure("message", "PortingError not one printable line",
                                                 _where(err.__traceback__), repr(str(err)), step))
                except BaseException as err:
                    failures.append(_exception_failure(err, step))
            stage("cli")
            failures += _cli_failures([str(f) for f in files], case.phase)
        except FuzzTimeout as err:
            failures.append(_exception_failure(err, "timeout"))
    for w in caught:
        if issubclass(w.category, _SILENT_BY_DEFAULT):  # Python does not print these by default
            continue
        failures.append(_failure("warning", w.category.__name__, f"{_rel(w.filename)}:{w.lineno}",
                                 str(w.message)[:300], "any"))
    for f in failures:  # no worker folder in messages
        f["message"] = f["message"].replace(str(folder), "DIR")
        f["detail"] = f["detail"].replace(str(folder), "DIR")
        f["where"] = f["where"].replace(str(folder), "DIR")
    seen, unique = set(), []
    for f in failures:
        if key_of(f) not in seen:
            seen.add(key_of(f))
            unique.append(f)
    return {"index": case.index, "outcome": "failure" if unique else outcome, "failures": unique}


def _roundtrip_failures(net, inputs, blobs, path: Path, phase: str) -> list[dict]:
    """``save_converted`` then ``load_converted`` (what ``porting convert`` writes): the
    same blobs bit for bit (NaN as NaN), or a one-line PortingError."""
    import torch

    from porting.saved import load_converted, save_converted

    try:
        save_converted(net, path, phase=phase)
        back = load_converted(path)
        with torch.no_grad():
            again = back(**inputs)
    except FuzzTimeout:
        raise
    except PortingError as err:
        if "\n" in str(err) or not _printable_line(str(err)):
            return [_failure("message", "PortingError not one printable line", _where(err.__traceback__),
                             repr(str(err)), "roundtrip")]
        return []
    except BaseException as err:
        return [_exception_failure(err, "roundtrip")]
    finally:
        path.unlink(missing_ok=True)
    for name, value in blobs.items():
        other = again.get(name)
        same = other is not None and other.shape == value.shape and bool(
            ((other == value) | (other.isnan() & value.isnan())).all())
        if not same:
            return [_failure("roundtrip", "converted net computes another blob", "porting/saved.py",
                             f"blob {name!r} differs after save_converted/load_converted", "roundtrip")]
    return []


def _shape_failures(net) -> list[dict]:
    """Each layer's computed tops against the shapes its module inferred (layers whose
    name is unique; a repeated name keeps only its last outputs). Tops of a layer whose
    first dim is decided at run time (Filter: ``first_dim_at_run_time``), and every blob
    computed from them, are not compared."""
    names = Counter(spec.name for spec in net.graph.layers)
    dynamic: set[str] = set()
    for spec in net.graph.layers:
        if getattr(spec.module, "first_dim_at_run_time", False) or dynamic & set(spec.bottoms):
            dynamic.update(spec.tops)
            continue
        outputs = net.layer_outputs.get(spec.name)
        if names[spec.name] != 1 or outputs is None:
            continue
        for top, want, got in zip(spec.tops, spec.module.top_shapes, outputs):
            if tuple(want) != tuple(got.shape):
                return [_failure("shape", "computed top shape differs from inferred", f"layer type {spec.type}",
                                 f"{top!r}: inferred {tuple(want)}, computed {tuple(got.shape)}", "forward")]
    return []


def key_of(failure: dict) -> tuple[str, str, str]:
    return failure["kind"], failure["what"], failure["where"]


# --------------------------------------------------------------------------- workers
def _limit_resources() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def alarm(signum, frame):
        raise FuzzTimeout(f"more than {TIME_LIMIT:g} s of CPU time")

    signal.signal(signal.SIGPROF, alarm)


def _worker(conn, seeds: list[Seed], campaign_seed: int, quiet: bool) -> None:
    import torch

    torch.set_num_threads(1)
    if quiet:  # the code under test may log or print; the parent's terminal holds the progress bar
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    _limit_resources()
    with tempfile.TemporaryDirectory(prefix="fuzz-worker-") as tmp:
        folder = Path(tmp)
        while True:
            try:
                index = conn.recv()
            except EOFError:
                return
            if index is None:
                return
            case = make_case(seeds, campaign_seed, index)
            signal.setitimer(signal.ITIMER_PROF, TIME_LIMIT)
            try:
                result = check_case(case, folder, lambda name: conn.send(("stage", name)))
            except FuzzTimeout as err:  # the alarm hit the harness itself, between stages
                result = {"index": index, "outcome": "failure", "failures": [_exception_failure(err, "timeout")]}
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
            result["family"], result["size"] = case.family, case.size
            conn.send(("result", result))


class _Slot:
    def __init__(self, ctx, seeds, campaign_seed, quiet):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, seeds, campaign_seed, quiet), daemon=True)
        self.proc.start()
        child.close()
        self.index: int | None = None
        self.started = 0.0
        self.stage = ""
        self.done = 0

    def give(self, index: int) -> None:
        self.index, self.started, self.stage = index, time.monotonic(), "start"
        with contextlib.suppress(OSError):  # a dead worker: wait() sees its end of file
            self.conn.send(index)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            with contextlib.suppress(OSError, BrokenPipeError):
                self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


@dataclasses.dataclass
class Campaign:
    seed: int
    count: int
    jobs: int
    corpus: str
    n_seeds: int
    outcomes: Counter = dataclasses.field(default_factory=Counter)
    failure_kinds: Counter = dataclasses.field(default_factory=Counter)   # inputs with a failure of the kind
    by_family: dict = dataclasses.field(default_factory=dict)             # family -> Counter of outcomes
    distinct: dict = dataclasses.field(default_factory=dict)              # key -> {"count", "first", ...}
    wall: float = 0.0
    stalls: int = 0                                                       # inputs retried after a stall
    reproducers: dict = dataclasses.field(default_factory=dict)           # key -> folder

    @property
    def failures(self) -> int:
        return self.outcomes["failure"]

    def add(self, result: dict) -> None:
        self.outcomes[result["outcome"]] += 1
        self.by_family.setdefault(result.get("family", "?"), Counter())[result["outcome"]] += 1
        for kind in {f["kind"] for f in result["failures"]}:
            self.failure_kinds[kind] += 1
        for f in result["failures"]:
            entry = self.distinct.setdefault(key_of(f), {"count": 0, "best": None, "failure": f})
            entry["count"] += 1
            rank = (result.get("size", 0), result["index"])
            if entry["best"] is None or rank < entry["best"]:
                entry["best"], entry["failure"] = rank, f

    def table(self) -> str:
        n = sum(self.outcomes.values())
        rate = n / self.wall if self.wall else 0.0
        lines = [f"hostile-file fuzz: seed {self.seed}, {n} inputs, {self.jobs} jobs, {self.n_seeds} seed nets "
                 f"(corpus {self.corpus}), {self.wall:.1f} s ({rate:.1f} inputs/s)", "",
                 "| outcome | inputs | share |", "|---|---:|---:|"]
        for label, key in (("OK (loaded, forward ran)", "ok"), ("REFUSED (one-line PortingError)", "refused"),
                           ("FAILURE", "failure")):
            lines.append(f"| {label} | {self.outcomes[key]} | {100 * self.outcomes[key] / max(n, 1):.1f} % |")
        for kind, c in sorted(self.failure_kinds.items()):
            lines.append(f"| - {kind} | {c} | {100 * c / max(n, 1):.2f} % |")
        lines += ["", "| mutation family | inputs | OK | REFUSED | FAILURE |", "|---|---:|---:|---:|---:|"]
        for fam in FAMILIES:
            c = self.by_family.get(fam, Counter())
            lines.append(f"| {fam} | {sum(c.values())} | {c['ok']} | {c['refused']} | {c['failure']} |")
        lines += ["", f"distinct failures: {len(self.distinct)}"
                  + (f" (workers killed after {WALL_LIMIT:g} s without an answer, inputs run again: "
                     f"{self.stalls})" if self.stalls else "")]
        if self.distinct:
            lines += ["", "| # | kind | what | where | inputs | example | reproducer |",
                      "|---|---|---|---|---:|---|---|"]
            for i, (key, e) in enumerate(sorted(self.distinct.items(), key=lambda kv: -kv[1]["count"]), 1):
                msg = e["failure"]["message"].replace("|", "\\|")[:110]
                repro = self.reproducers.get(key, f"--seed {self.seed} input {e['best'][1]}")
                lines.append(f"| {i} | {key[0]} | {key[1]} | {key[2]} | {e['count']} | {msg} | {repro} |")
        return "\n".join(lines)


def run_campaign(seed: int, count: int, jobs: int | None = None, seeds: list[Seed] | None = None,
                 out: Path | None = None, progress: bool = False, start: int = 0) -> Campaign:
    """Run inputs ``start .. start+count-1`` of campaign ``seed`` in ``jobs`` forked workers."""
    import multiprocessing
    from multiprocessing.connection import wait

    import test_walker_protobuf  # noqa: F401  (imported once here, not in every forked worker)

    seeds = build_seeds() if seeds is None else seeds
    jobs = max(1, jobs or os.cpu_count() or 1)
    ctx = multiprocessing.get_context("fork")
    campaign = Campaign(seed, count, jobs, corpus_digest(seeds), len({s.name.split("@")[0] for s in seeds}))
    bar = None
    if progress:
        from tqdm import tqdm
        tqdm.monitor_interval = 0  # no monitor thread: workers are forked from this process
        bar = tqdm(total=count, unit="input", file=sys.stderr, smoothing=0.05,
                   mininterval=0.2 if sys.stderr.isatty() else 30)
    todo = iter(range(start, start + count))
    retry: list[int] = []   # inputs whose worker stalled once (the machine, or the input?)
    stalled: set[int] = set()

    def next_index():
        return retry.pop() if retry else next(todo, None)

    slots = [_Slot(ctx, seeds, seed, True) for _ in range(jobs)]
    t0 = time.monotonic()

    def finish(slot_, result_):
        campaign.add(result_)
        slot_.index = None
        slot_.done += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(failures=campaign.failures, distinct=len(campaign.distinct), refresh=False)

    def dead(slot_, kind, what):
        stage = slot_.stage
        index = slot_.index
        case = make_case(seeds, seed, index)
        f = _failure(kind, what, f"stage {stage}", f"{what} in stage {stage}", stage)
        finish(slot_, {"index": index, "outcome": "failure", "failures": [f], "family": case.family,
                       "size": case.size})

    try:
        for slot in slots:
            nxt = next_index()
            if nxt is not None:
                slot.give(nxt)
        while any(s.index is not None for s in slots):
            busy = {s.conn: s for s in slots if s.index is not None}
            for conn in wait(list(busy), timeout=0.5):
                slot = busy[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    slot.proc.join(1)
                    code = slot.proc.exitcode
                    if code is not None and code < 0:
                        what = f"killed by {signal.Signals(-code).name}"
                    else:
                        what = f"exited with status {code}"
                    dead(slot, "crash", what)
                    slot.stop(kill=True)
                    slots[slots.index(slot)] = slot = _Slot(ctx, seeds, seed, True)
                else:
                    if msg[0] == "stage":
                        slot.stage = msg[1]
                        continue
                    finish(slot, msg[1])
                if slot.done >= RECYCLE:
                    slot.stop()
                    slots[slots.index(slot)] = slot = _Slot(ctx, seeds, seed, True)
                nxt = next_index()
                if nxt is not None:
                    slot.give(nxt)
            now = time.monotonic()
            for i, slot in enumerate(slots):
                if slot.index is None or now - slot.started <= WALL_LIMIT:
                    continue
                if slot.index in stalled:  # the second time: the input's fault
                    dead(slot, "timeout", f"no answer in {WALL_LIMIT:g} s, twice")
                else:  # a shared machine can stall a worker: run the input again in a fresh one
                    stalled.add(slot.index)
                    retry.append(slot.index)
                    campaign.stalls += 1
                slot.stop(kill=True)
                slots[i] = _Slot(ctx, seeds, seed, True)
                nxt = next_index()
                if nxt is not None:
                    slots[i].give(nxt)
    finally:
        for slot in slots:
            slot.stop(kill=slot.index is not None)
        if bar is not None:
            bar.close()
    campaign.wall = time.monotonic() - t0
    if out is not None:
        save_reproducers(campaign, seeds, Path(out))
    return campaign


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60]


def save_reproducers(campaign: Campaign, seeds: list[Seed], out: Path) -> None:
    """One folder per distinct failure: net.prototxt, net.caffemodel (if any), case.json."""
    from porting.files import write_atomic

    ranked = sorted(campaign.distinct.items(), key=lambda kv: -kv[1]["count"])
    for i, (key, e) in enumerate(ranked, 1):
        case = make_case(seeds, campaign.seed, e["best"][1])
        folder = out / f"{i:02d}-{_slug(key[0] + '-' + key[1] + '-' + key[2])}"
        write_atomic(folder / "net.prototxt", case.prototxt)
        if case.caffemodel is not None:
            write_atomic(folder / "net.caffemodel", case.caffemodel)
        info = {"key": list(key), "inputs": e["count"], "campaign_seed": campaign.seed, "index": case.index,
                "corpus": campaign.corpus, "seed_net": case.seed_net, "family": case.family,
                "mutations": case.mutations, "phase": case.phase, "failure": e["failure"]}
        write_atomic(folder / "case.json", json.dumps(info, indent=1).encode())
        campaign.reproducers[key] = f"{folder}"


def replay(path: Path) -> int:
    """Run one reproducer folder (or a prototxt with an optional .caffemodel beside it)
    in this process under the same limits; print what happened; 1 if it still fails."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    proto = folder / "net.prototxt" if path.is_dir() else path
    model = proto.with_suffix(".caffemodel")
    info = json.loads((folder / "case.json").read_text()) if (folder / "case.json").is_file() else {}
    case = Case(info.get("index", 0), info.get("seed_net", "?"), info.get("family", "?"), info.get("mutations", []),
                proto.read_bytes(), model.read_bytes() if model.is_file() else None, info.get("phase", "test"))
    if info:
        print(f"recorded: {info['key']} ({info['family']}: {', '.join(info['mutations'])}; phase {info['phase']})")
    import torch

    torch.set_num_threads(1)
    _limit_resources()
    with tempfile.TemporaryDirectory(prefix="fuzz-replay-") as tmp:
        signal.setitimer(signal.ITIMER_PROF, TIME_LIMIT)
        try:
            result = check_case(case, Path(tmp), lambda name: print(f"stage {name}", flush=True))
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
    print(f"outcome: {result['outcome'].upper()}")
    for f in result["failures"]:
        print(f"- {f['kind']}: {f['what']} at {f['where']} (stage {f['stage']}): {f['message']}")
        if f["detail"]:
            print(f["detail"])
    return 1 if result["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10000, help="inputs to run (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed (default 0)")
    p.add_argument("--start", type=int, default=0, help="first input index (default 0)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes (default: CPU count)")
    p.add_argument("--out", type=Path, help="save one reproducer folder per distinct failure here")
    p.add_argument("--no-reference", action="store_true", help="leave out ../shared/reference-data nets")
    p.add_argument("--replay", type=Path, help="run one reproducer folder and print its traceback")
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    seeds = build_seeds(reference=not args.no_reference)
    campaign = run_campaign(args.seed, args.count, args.jobs, seeds, args.out, progress=True, start=args.start)
    print(campaign.table())
    return 1 if campaign.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
