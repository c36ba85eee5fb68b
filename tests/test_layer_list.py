"""The layer list: ``porting layers`` against the registry, ``verified_by`` of every built-in
type, and the README's list kept equal to ``porting layers --markdown --builtin``."""
from __future__ import annotations

import json
import re
from pathlib import Path

from porting import caffe_pb2
from porting.cli import main
from porting.cli_layers import CAFFE_1_TYPES, layer_list, markdown
from porting.layers import BUILT_IN, LAYERS, REFUSED, param_fields

ROOT = Path(__file__).resolve().parent.parent
README_BLOCK = re.compile(r"<!-- porting layers -->\n(.*?)\n<!-- /porting layers -->", re.S)


def test_every_builtin_type_names_the_tests_that_check_it():
    """Each registered built-in type lists test files that exist and name it in quotes (the
    test iterates over what is registered, so a type counts once its module lands)."""
    problems = []
    for type_name, cls in sorted(LAYERS.items()):
        if cls.origin != BUILT_IN:
            continue
        if not cls.verified_by:
            problems.append(f"{type_name}: no verified_by")
        for path in cls.verified_by:
            file = ROOT / path
            if not file.is_file():
                problems.append(f"{type_name}: {path} does not exist")
            elif f'"{type_name}"' not in file.read_text():
                problems.append(f'{type_name}: {path} never names "{type_name}"')
    assert not problems, "\n".join(problems)


def test_param_fields_are_layer_parameter_fields():
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    for type_name, cls in LAYERS.items():
        if cls.origin == BUILT_IN:
            assert all(f in fields and f.endswith("_param") for f in param_fields(cls)), type_name
    assert param_fields(LAYERS["Deconvolution"]) == ("convolution_param",)
    assert param_fields(LAYERS["InnerProduct"]) == ("inner_product_param",)
    assert param_fields(LAYERS["PReLU"]) == ("prelu_param",) and param_fields(LAYERS["Split"]) == ()


def test_porting_layers_lists_the_registry(capsys):
    assert len(set(CAFFE_1_TYPES)) == len(CAFFE_1_TYPES) == 61
    assert main(["layers", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["type"] for r in data["layers"]] == sorted(set(LAYERS) - set(REFUSED), key=str.lower)
    assert data["refused"] == [{"type": "Python", "reason": REFUSED["Python"]}]
    assert data["missing"] == [t for t in CAFFE_1_TYPES if t not in LAYERS and t not in REFUSED]
    conv = next(r for r in data["layers"] if r["type"] == "Convolution")
    assert conv["v1"] == "CONVOLUTION" and conv["origin"] == "built-in" and "num_output" in conv["params"][
        "convolution_param"] and "tests/test_layers_caffe.py" in conv["verified_by"]
    assert main(["layers", "--missing"]) == 0
    assert capsys.readouterr().out.split() == data["missing"]
    assert main(["layers"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["type", "V1", "name", "from", "parameters", "verified", "by"]
    assert any(line.startswith("Python ") and "REFUSED" in line for line in table)
    summary = next(line for line in table if line.startswith(f"{len(data['layers'])} layer types"))
    assert "of Caffe 1.0's 61 types supported, 1 refused" in summary


def test_readme_lists_the_layers():
    """Regenerate with: porting layers --markdown --builtin (between the README's markers)."""
    block = README_BLOCK.search((ROOT / "README.md").read_text())
    assert block is not None, "README.md lacks the <!-- porting layers --> block"
    assert block.group(1) == markdown(layer_list(builtin_only=True)), \
        "README.md's layer list is stale: put the output of `porting layers --markdown --builtin` between its markers"
