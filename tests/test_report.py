"""Drift reports (porting/report.py): files, JSON schema round trip, self-contained HTML, drift-diff."""
from __future__ import annotations

import argparse
import base64
import html
import copy
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from porting import PortingError, load_caffe
from porting.layers import LAYERS
from porting.report import (SCHEMA, SCHEMA_VERSION, add_parser, build_report, drift_diff, drift_table, dumps,
                            load_report, plot_errors, read_synsets, render_markdown, top5_table, write_report)
from porting.verify import default_objective, float64_twin, port_arrays, random_inputs, verify_arrays

NEEDED = {"Input", "Convolution", "ReLU", "Pooling", "InnerProduct", "Softmax"}
needs_layers = pytest.mark.skipif(not NEEDED <= set(LAYERS), reason="layer types not registered yet")

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 3 stride: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 7 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture(scope="module")
def verification(tmp_path_factory):
    """A verification where the candidate's conv1 output carries a 1e-3 relative error."""
    path = tmp_path_factory.mktemp("net") / "small.prototxt"
    path.write_text(NET)
    net = load_caffe(path)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blobs in net.params.values():
            blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * (2 / blobs[0][0].numel()) ** 0.5)
            blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.1)
    obj = default_objective(net.graph)
    inputs = random_inputs(net.graph, seed=1)
    net64 = float64_twin(net)
    reference, exact = port_arrays(net, inputs, obj), port_arrays(net64, inputs, obj)
    conv = net.graph.layer("conv1").module
    original = conv.forward
    conv.forward = lambda x: tuple(t * (1 + 1e-3) for t in original(x))
    candidate = port_arrays(net, inputs, obj)
    return verify_arrays(net64, reference, candidate, objective=obj, exact=exact)


@pytest.fixture(scope="module")
def report(verification):
    synsets = [f"class {i}" for i in range(7)]
    top5 = top5_table(np.eye(2, 7) * 0.5 + 0.1, np.eye(2, 7)[::-1] * 0.5 + 0.1, labels=["a.jpg", "b.jpg"],
                      synsets=synsets)
    return build_report(verification, net={"name": "small", "prototxt_sha256": "ab" * 32},
                        inputs={"kind": "random", "seed": 1, "batch": 2},
                        provenance={"versions": {"caffe": "1.0.0"}}, top5=top5)


@needs_layers
def test_report_content(report, verification):
    assert report["schema"] == SCHEMA and report["schema_version"] == SCHEMA_VERSION
    assert report["passed"] is False and report["exit_status"] == 1
    assert report["departure"]["layer"] == "conv1" and report["departure"]["frameworks"] == ["port"]
    keys = [r["key"] for r in report["rows"]]
    assert len(keys) == len(set(keys)) == len(verification.rows)
    row = next(r for r in report["rows"] if r["key"] == "top/conv1/0/data")
    assert row["max_rel"] == pytest.approx(1e-3, rel=1e-3) and not row["passed"]
    assert row["overwritten_by"] == "relu1" and row["closer"] == "caffe"
    assert set(row["vs_float64"]) == {"caffe", "port"}
    assert report["provenance"]["harness"]["torch"] == torch.__version__
    assert report["provenance"]["reference"]["versions"]["caffe"] == "1.0.0"
    assert "gamma_n" in report["rounding_rule"]


@needs_layers
def test_json_round_trip_with_non_finite_numbers(report, tmp_path):
    changed = copy.deepcopy(report)
    changed["rows"][0]["max_rel"] = math.inf
    changed["rows"][1]["max_rel"] = math.nan
    text = dumps(changed)
    json.loads(text)  # strict JSON: no bare NaN / Infinity
    assert "NaN" not in text and "Infinity" not in text
    path = tmp_path / "report.json"
    path.write_text(text)
    back = load_report(path)
    assert back["rows"][0]["max_rel"] == math.inf and math.isnan(back["rows"][1]["max_rel"])
    assert [r["key"] for r in back["rows"]] == [r["key"] for r in report["rows"]]
    assert back["departure"] == json.loads(dumps(report))["departure"]


def test_load_report_refuses_other_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{broken")
    with pytest.raises(PortingError, match="x.json.*not JSON"):
        load_report(bad)
    bad.write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(PortingError, match="not a drift report"):
        load_report(bad)
    bad.write_text(json.dumps({"schema": SCHEMA, "schema_version": 99, "rows": []}))
    with pytest.raises(PortingError, match="schema_version 99"):
        load_report(bad)
    with pytest.raises(PortingError, match="cannot read"):
        load_report(tmp_path / "absent.json")


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action", "poster"):
                self.refs.append((tag, name, value or ""))


@needs_layers
def test_written_files_and_self_contained_html(report, tmp_path):
    paths = write_report(report, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors.png", "report.html", "report.json",
                                                                  "report.md"]
    assert load_report(paths["json"])["rows"][0]["key"] == report["rows"][0]["key"]
    page = paths["html"].read_text()
    parser = _Refs()
    parser.feed(page)
    assert "link" not in parser.tags and "iframe" not in parser.tags
    assert parser.refs and all(v.startswith("data:") for _, _, v in parser.refs), parser.refs
    assert not re.search(r"url\(\s*['\"]?(?!data:)", page)  # no CSS fetches either
    png = base64.b64decode(parser.refs[0][2].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == paths["png"].read_bytes()
    for text in ("conv1", "Point of departure", "class 0", "b.jpg", "FAIL"):
        assert text in page
    # the one-line verdict comes first, the long paragraph after it
    summary = html.escape(report["summary"], quote=True)
    assert report["summary"].startswith("FAIL at the forward of layer conv1")
    assert page.index(summary) < page.index(html.escape(report["verdict"][:60], quote=True))
    md = paths["md"].read_text()
    assert "## Point of departure" in md and "| conv1 | Convolution |" in md and "(errors.png)" in md


@needs_layers
def test_plot_is_a_png_of_two_panels(report):
    from matplotlib.image import imread
    import io

    image = imread(io.BytesIO(plot_errors(report)), format="png")
    height, width = image.shape[:2]
    assert width > 1000 and height > 700  # two stacked panels at 110 dpi
    assert image[..., :3].std() > 0.05  # not blank


@needs_layers
def test_markdown_lists_failed_rows(report):
    md = render_markdown(report, image=None)
    failed = [r for r in report["rows"] if not r["passed"] and r["view"] == "top"]
    assert failed and md.count("| FAIL |") >= len(failed)
    assert "![" not in md


def test_top5_table_and_synsets(tmp_path):
    path = tmp_path / "synset_words.txt"
    path.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn0000 \n")
    names = read_synsets(path)
    assert names == ["tench, Tinca tinca", "goldfish, Carassius auratus", "n0000"]
    rows = top5_table(np.array([[0.1, 0.7, 0.2]]), np.array([[0.6, 0.3, 0.1]]), synsets=names, k=2)
    assert rows[0]["label"] == "input 0"
    assert [e["name"] for e in rows[0]["caffe"]] == ["goldfish, Carassius auratus", "n0000"]
    assert [e["class"] for e in rows[0]["port"]] == [0, 1] and rows[0]["port"][0]["score"] == 0.6
    path.write_text("n01 one\n\nn02 two\n")        # a blank line would shift the classes after it
    with pytest.raises(PortingError, match="line 2 is blank"):
        read_synsets(path)
    path.write_bytes(b"n01 caf\xe9\n")
    with pytest.raises(PortingError, match="not UTF-8 text"):
        read_synsets(path)
    path.write_text("n01 one\nn02 two\n\n\n")      # blank lines at the end are no classes
    assert read_synsets(path) == ["one", "two"]


# ---------------------------------------------------------------------------- drift-diff

def _mini(rows):
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "net": {},
            "rows": [{"key": k, "layer": k.split("/")[1], "max_rel": v, "passed": p} for k, v, p in rows]}


def test_drift_diff_classifies_moves():
    old = _mini([("top/a/0/data", 1e-7, True), ("top/b/0/data", 1e-6, True), ("top/c/0/data", 1e-9, True),
                 ("top/d/0/data", 5e-5, True), ("top/gone/0/data", 1e-7, True)])
    new = _mini([("top/a/0/data", 1.5e-7, True), ("top/b/0/data", 1e-5, True), ("top/c/0/data", 3e-8, True),
                 ("top/d/0/data", 2e-4, False), ("top/new/0/data", 1e-7, True)])
    rows = {r.key: r for r in drift_diff(old, new, factor=2.0)}
    assert (rows["top/a/0/data"].moved, rows["top/a/0/data"].what) == (False, "steady")
    assert (rows["top/b/0/data"].moved, rows["top/b/0/data"].what) == (True, "worse")
    assert rows["top/b/0/data"].factor == pytest.approx(10)
    assert not rows["top/c/0/data"].moved  # 1e-9 -> 3e-8: both below float32's u, nothing to tell apart
    assert rows["top/d/0/data"].what == "now fails"
    assert rows["top/gone/0/data"].what == "removed" and rows["top/new/0/data"].what == "added"
    table = drift_table(list(rows.values()))
    assert "top/b/0/data" in table and "top/a/0/data" not in table and "4 of 6 arrays moved" in table
    assert "top/a/0/data" in drift_table(list(rows.values()), only_moved=False)
    with pytest.raises(PortingError, match="factor"):
        drift_diff(old, new, factor=1.0)


def test_drift_diff_command_exit_status(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    base = _mini([("top/a/0/data", 1e-7, True), ("top/b/0/data", 1e-6, True)])
    moved = _mini([("top/a/0/data", 1e-7, True), ("top/b/0/data", 8e-6, True)])
    (tmp_path / "old.json").write_text(dumps(base))
    (tmp_path / "same.json").write_text(dumps(base))
    (tmp_path / "moved.json").write_text(dumps(moved))

    def run(*argv):
        args = parser.parse_args(["drift-diff", *map(str, argv)])
        return args.func(args)

    assert run(tmp_path / "old.json", tmp_path / "same.json") == 0
    assert "0 of 2 arrays moved" in capsys.readouterr().out
    assert run(tmp_path / "old.json", tmp_path / "moved.json") == 1
    assert "top/b/0/data" in capsys.readouterr().out
    assert run(tmp_path / "old.json", tmp_path / "moved.json", "--factor", "10") == 0
    with pytest.raises(PortingError):
        run(tmp_path / "old.json", tmp_path / "absent.json")


@needs_layers
def test_drift_diff_between_real_reports(report):
    same = drift_diff(report, copy.deepcopy(report))
    assert same and not any(r.moved for r in same)
    fixed = copy.deepcopy(report)
    for row in fixed["rows"]:
        row["max_rel"], row["passed"] = 0.0, True
    rows = drift_diff(report, fixed)
    assert {r.what for r in rows if r.moved} == {"now passes"}
