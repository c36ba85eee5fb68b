"""Net-definition upgrades against the expected outputs Caffe's authors wrote.

Fixtures in tests/fixtures/formats/ named v0_* are the inputs and expected outputs of the
test cases in Caffe 1.0's src/caffe/test/test_upgrade_proto.cpp (each file and the test
below name the case); the v1_*/v2_* ones follow upgrade_proto.cpp where Caffe has no test.
Messages are compared whole (protobuf equality), as Caffe's tests compare DebugString().
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from porting import caffe_pb2
from porting.errors import PortingError
from porting.parse import read_prototxt
from porting.upgrade import (UPGRADE_BATCHNORM, UPGRADE_DATA, UPGRADE_INPUT, UPGRADE_V0, UPGRADE_V1,
                             V1_LAYER_TYPES, fold_padding_layers, upgrade_needed, upgrade_net,
                             upgrade_v0_net, upgrade_v1_net)

FORMATS = Path(__file__).resolve().parent / "fixtures" / "formats"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"


def fixture(name: str) -> caffe_pb2.NetParameter:
    return read_prototxt(FORMATS / name)


def text_net(text: str) -> caffe_pb2.NetParameter:
    from google.protobuf import text_format
    return text_format.Parse(text, caffe_pb2.NetParameter())


# --------------------------------------------------------------------------- Caffe's own cases
def test_padding_two_tops_matches_caffe():
    """PaddingLayerUpgradeTest.TestTwoTops: one padding layer read by two convs."""
    folded = fold_padding_layers(fixture("v0_padding_two_tops.prototxt"))
    assert folded == fixture("v0_padding_two_tops.folded.prototxt")
    assert fold_padding_layers(folded) == folded  # Caffe's test checks idempotence too


def test_v0_simple_matches_caffe():
    """NetUpgradeTest.TestSimple: V0 -> V1 (UpgradeV0Net), V1 -> V2 (UpgradeV1Net)."""
    v0 = fixture("v0_simple.prototxt")
    assert upgrade_v0_net(v0) == fixture("v0_simple.v1.prototxt")
    assert upgrade_v1_net(fixture("v0_simple.v1.prototxt")) == fixture("v0_simple.v2.prototxt")
    assert upgrade_net(v0) == fixture("v0_simple.v2.prototxt")
    assert upgrade_needed(v0) == [UPGRADE_V0, UPGRADE_V1]


def test_v0_all_params_matches_caffe():
    """NetUpgradeTest.TestAllParams: every V0 field and layer type -> V1."""
    assert upgrade_v0_net(fixture("v0_all_params.prototxt")) == fixture("v0_all_params.v1.prototxt")


def test_v0_all_params_full_upgrade_gets_an_input_layer():
    net = upgrade_net(fixture("v0_all_params.prototxt"))
    expected = upgrade_v1_net(fixture("v0_all_params.v1.prototxt"))
    first = net.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["input_data"])
    assert [list(s.dim) for s in first.input_param.shape] == [[64, 3, 32, 32]]
    assert list(net.layer[1:]) == list(expected.layer)
    assert not net.input and not net.input_dim and not net.layers
    assert upgrade_needed(fixture("v0_all_params.prototxt")) == [UPGRADE_V0, UPGRADE_V1, UPGRADE_INPUT]


def test_every_v1_enum_value_has_a_v2_type():
    """NetUpgradeTest.TestUpgradeV1LayerType: each V1 type maps (NONE to "")."""
    for value in caffe_pb2.V1LayerParameter.LayerType.values():
        assert (V1_LAYER_TYPES[value] == "") == (value == caffe_pb2.V1LayerParameter.NONE)


def test_registry_v1_names_agree_with_caffes_table():
    from porting.layers import V1_TYPES
    assert "CONVOLUTION" in V1_TYPES and "INNER_PRODUCT" in V1_TYPES
    for v1_name, v2_type in V1_TYPES.items():
        assert V1_LAYER_TYPES[caffe_pb2.V1LayerParameter.LayerType.Value(v1_name)] == v2_type


# --------------------------------------------------------------------------- from upgrade_proto.cpp
def test_v1_net_with_data_fields_rules_and_inputs():
    v1 = fixture("v1_mixed.prototxt")
    assert upgrade_net(v1) == fixture("v1_mixed.v2.prototxt")
    assert upgrade_needed(v1) == [UPGRADE_DATA, UPGRADE_V1, UPGRADE_INPUT]


def test_input_shape_inputs_and_batchnorm_specs():
    net = fixture("v2_input_shape.prototxt")
    assert upgrade_net(net) == fixture("v2_input_shape.v2.prototxt")
    assert upgrade_needed(net) == [UPGRADE_INPUT, UPGRADE_BATCHNORM]
    # BatchNorm specs already at 0 change nothing, so nothing is reported.
    assert upgrade_needed(upgrade_net(net)) == []


def test_current_net_is_returned_equal_and_input_is_never_changed():
    v0 = fixture("v0_simple.prototxt")
    before = v0.SerializeToString()
    upgraded = upgrade_net(v0)
    assert v0.SerializeToString() == before
    assert upgrade_net(upgraded) == upgraded and upgrade_needed(upgraded) == []
    assert upgrade_net(upgraded) is not upgraded


def test_inputs_without_dims_are_dropped():
    # UpgradeNetInput: an input alone (as old caffemodels list it) is simply removed.
    net = upgrade_net(text_net('input: "data" layer { name: "relu" type: "ReLU" bottom: "data" top: "r" }'))
    assert not net.input and [l.name for l in net.layer] == ["relu"]


def test_v2_layers_beside_v1_layers_are_dropped(caplog):
    net = text_net('layers { name: "a" type: RELU } layer { name: "b" type: "ReLU" }')
    with caplog.at_level(logging.ERROR, logger="porting.upgrade"):
        upgraded = upgrade_net(net, source="mixed.prototxt")
    assert [l.name for l in upgraded.layer] == ["a"]
    assert "ignored" in caplog.text


def test_v0_field_the_type_does_not_take_is_dropped_with_a_log(caplog):
    net = text_net("layers { layer { name: 'r' type: 'relu' num_output: 3 } }")
    with caplog.at_level(logging.ERROR, logger="porting.upgrade"):
        upgraded = upgrade_net(net, source="old.prototxt")
    assert upgraded.layer[0].type == "ReLU" and not upgraded.layer[0].HasField("convolution_param")
    assert "num_output" in caplog.text


@pytest.mark.parametrize("relpath", [
    "bvlc-prototxt/bvlc_alexnet.deploy.prototxt",
    "bvlc-prototxt/bvlc_googlenet.deploy.prototxt",
    "bvlc-prototxt/bvlc_reference_caffenet.deploy.prototxt",
    "mfv-original/deploy_alexnet_updated.prototxt",
])
def test_reference_prototxts_upgrade(relpath):
    path = SHARED / relpath
    if not path.exists():
        pytest.skip("reference data absent")
    raw = read_prototxt(path)
    net = upgrade_net(raw, source=path)
    assert net.layer[0].type == "Input" and not net.input and not net.layers
    if relpath.startswith("mfv"):  # input + input_dim: 1x3x227x227 -> an Input layer
        assert upgrade_needed(raw) == [UPGRADE_INPUT]
        assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 227, 227]
        assert len(net.layer) == len(raw.layer) + 1
    else:
        assert upgrade_needed(raw) == [] and net == raw


# --------------------------------------------------------------------------- refused
@pytest.mark.parametrize("text, place, problem", [
    ('input: "data" input_dim: 1 input_dim: 3 input_dim: 227', "net inputs",
     "1 input(s) need 4 input_dim values, found 3"),
    ('input: "a" input: "b" input_shape { dim: 1 }', "net inputs",
     "2 input(s) but 1 input_shape(s)"),
    ("layers { layer { name: 'x' type: 'maxout' } }", "layer x", "unknown V0 layer type 'maxout'"),
    ("layers { layer { name: 'c' type: 'conv' } bottom: 'nowhere' top: 'c' }", "layer c",
     "bottom blob 'nowhere' is not produced by any earlier layer"),
    ("input: 'data' layers { layer { name: 'p' type: 'padding' pad: 1 } bottom: 'data' top: 'p' } "
     "layers { layer { name: 'r' type: 'relu' } bottom: 'p' top: 'r' }", "layer r",
     "V0 padding layer 'p' feeds a 'relu' layer"),
])
def test_what_caffe_refuses_names_file_and_place(text, place, problem):
    with pytest.raises(PortingError) as err:
        upgrade_net(text_net(text), source="old.prototxt")
    assert str(err.value).startswith(f"old.prototxt: {place}: {problem}")


# --------------------------------------------------------------------------- real Caffe
def in_test_phase(layer: caffe_pb2.LayerParameter) -> bool:
    """Net::StateMeetsRule for phase TEST only (the fixtures use no levels or stages)."""
    test = caffe_pb2.TEST
    if layer.include:
        return any(not r.HasField("phase") or r.phase == test for r in layer.include)
    return not any(not r.HasField("phase") or r.phase == test for r in layer.exclude)


def comparable(layer: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
    """The layer without what Net::Init adds (phase, blobs) or the weight maker injects
    (fillers); everything else must be the same."""
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(layer)
    out.ClearField("phase")
    out.ClearField("blobs")
    for holder in (out.convolution_param, out.inner_product_param):
        holder.ClearField("weight_filler")
        holder.ClearField("bias_filler")
    if not out.convolution_param.ListFields() and not layer.HasField("convolution_param"):
        out.ClearField("convolution_param")
    if not out.inner_product_param.ListFields() and not layer.HasField("inner_product_param"):
        out.ClearField("inner_product_param")
    return out


@pytest.mark.caffe
@pytest.mark.parametrize("name", ["caffe_v0_deploy.prototxt", "caffe_v1_deploy.prototxt",
                                  "caffe_v2_batchnorm.prototxt"])
def test_upgrade_matches_the_net_real_caffe_builds(caffe_weights, name):
    """Caffe builds the net (UpgradeNetAsNeeded, then TEST-phase filtering) and saves it
    with Net::ToProto: the layer list it saves is its upgrade of our fixture."""
    from porting.parse import read_caffemodel_net

    path = FORMATS / name
    saved = read_caffemodel_net(caffe_weights(path))
    ours = upgrade_net(read_prototxt(path), source=path)
    assert saved.name == ours.name
    assert [comparable(l) for l in saved.layer] == [comparable(l) for l in ours.layer if in_test_phase(l)]


def test_v0_int_copied_into_an_unsigned_field_wraps_as_in_cpp():
    """UpgradeV0LayerParameter copies V0's int32 new_width/new_height into ImageDataParameter's
    uint32 fields: C++ converts -2147483648 to 2147483648 and -1 to 4294967295."""
    net = text_net("layers { layer { name: 'd' type: 'images' source: 'list.txt' "
                   "new_width: -2147483648 new_height: -1 batchsize: 2 } top: 'data' top: 'label' }")
    image = upgrade_net(net).layer[0].image_data_param
    assert (image.new_width, image.new_height, image.batch_size) == (2147483648, 4294967295, 2)
