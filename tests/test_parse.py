"""Reading prototxts and caffemodels: every layout Caffe 1.0 reads, and every bad input.

The reference for blob contents is protobuf's own full parse of the same bytes
(``NetParameter.FromString``), independent of our wire walker, or the exact float32 values
the file was built from.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from porting import caffe_pb2
from porting.errors import PortingError
from porting.parse import read_caffemodel, read_caffemodel_net, read_prototxt
from porting import wire
from porting.wire import varint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference-data"
FORMATS = Path(__file__).resolve().parent / "fixtures" / "formats"
REFERENCE_PROTOTXTS = {  # file -> (net name, number of layer entries, first layer)
    "bvlc-prototxt/bvlc_alexnet.deploy.prototxt": ("AlexNet", 24, "data"),
    "bvlc-prototxt/bvlc_googlenet.deploy.prototxt": ("GoogleNet", 143, "data"),
    "bvlc-prototxt/bvlc_reference_caffenet.deploy.prototxt": ("CaffeNet", 24, "data"),
    "mfv-original/deploy_alexnet_updated.prototxt": ("CaffeNet", 23, "conv1"),
}


# --------------------------------------------------------------------------- helpers
def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return wire.key(number, wire.LEN) + varint(len(payload)) + payload


def unpacked_floats(values) -> bytes:
    """BlobProto.data written one value per field (wire type 5), as a parser must accept."""
    return b"".join(b"\x2d" + struct.pack("<f", v) for v in values)


def unpacked_doubles(values) -> bytes:
    return b"".join(b"\x41" + struct.pack("<d", v) for v in values)


def packed_floats(values) -> bytes:
    return field(5, np.asarray(values, "<f4").tobytes())


def blob_shape(*dims) -> bytes:
    return caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=dims)).SerializeToString()


def v2_layer(name: str, *blobs: bytes) -> bytes:
    head = caffe_pb2.LayerParameter(name=name, type="InnerProduct").SerializeToString()
    return field(100, head + b"".join(field(7, b) for b in blobs))


def write(tmp_path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def protobuf_blobs(path) -> dict[str, list[np.ndarray]]:
    """Independent reference: protobuf parses the whole file; V2 layout only."""
    net = caffe_pb2.NetParameter.FromString(Path(path).read_bytes())
    return {l.name: [np.array(b.double_data if len(b.double_data) else b.data, np.float32) for b in l.blobs]
            for l in net.layer}


# --------------------------------------------------------------------------- prototxt
@pytest.mark.parametrize("relpath", sorted(REFERENCE_PROTOTXTS))
def test_reference_prototxts_parse(relpath):
    path = SHARED / relpath
    if not path.exists():
        pytest.skip("reference data absent")
    net = read_prototxt(path)
    name, n_layers, first = REFERENCE_PROTOTXTS[relpath]
    assert (net.name, len(net.layer), net.layer[0].name) == (name, n_layers, first)


def test_mfv_prototxt_keeps_legacy_input_fields():
    path = SHARED / "mfv-original" / "deploy_alexnet_updated.prototxt"
    if not path.exists():
        pytest.skip("reference data absent")
    net = read_prototxt(path)  # not upgraded: the V1-era input fields are still there
    assert list(net.input) == ["data"] and list(net.input_dim) == [1, 3, 227, 227]
    assert net.force_backward


def test_v0_and_v1_prototxts_parse():
    v0 = read_prototxt(FORMATS / "v0_simple.prototxt")
    assert [l.layer.type for l in v0.layers] == ["data", "padding", "conv", "innerproduct", "softmax_loss"]
    v1 = read_prototxt(FORMATS / "v1_mixed.prototxt")
    assert v1.layers[2].type == caffe_pb2.V1LayerParameter.CONVOLUTION
    assert list(v1.layers[2].blobs_lr) == [1, 2]


@pytest.mark.parametrize("text, line, col, problem", [
    ('name: "x"\nlayer {\n  foo: 1\n}\n', 3, 3,
     'Message type "porting_caffe.LayerParameter" has no field named "foo"'),
    ('layer {\n  name: "a"\n  type: "ReLU"\n', 3, 9, 'Expected "}"'),  # at the last token
    ('layer {\n  convolution_param { pool: MAX }\n}\n', 2, 23,
     'Message type "porting_caffe.ConvolutionParameter" has no field named "pool"'),
    ('layer { pooling_param { pool: MEDIAN } }\n', 1, 31,  # protobuf echoes the line here
     "'layer { pooling_param { pool: MEDIAN } }': "
     'Enum type "porting_caffe.PoolingParameter.PoolMethod" has no value named MEDIAN'),
])
def test_prototxt_syntax_error_names_file_line_column(tmp_path, text, line, col, problem):
    path = write(tmp_path, "net.prototxt", text.encode())
    with pytest.raises(PortingError) as err:
        read_prototxt(path)
    assert str(err.value) == f"{path}: line {line}, column {col}: {problem}"


def test_prototxt_singular_field_twice_is_an_error(tmp_path):
    # Caffe parses with TextFormat::Parse, which refuses a non-repeated field given twice.
    path = write(tmp_path, "net.prototxt", b'name: "a"\nname: "b"\n')
    with pytest.raises(PortingError, match=r"net\.prototxt: line \d+, column \d+: .*multiple \"name\""):
        read_prototxt(path)


def test_prototxt_latin1_comment_is_accepted(tmp_path):
    # Caffe's C++ text parser reads bytes; a non-UTF-8 comment does not stop it.
    path = write(tmp_path, "net.prototxt", b'# Gr\xfc\xdfe\nname: "ok"\n')
    assert read_prototxt(path).name == "ok"


def test_prototxt_missing_unreadable_and_binary(tmp_path):
    with pytest.raises(PortingError, match=r"nope\.prototxt: no such file$"):
        read_prototxt(tmp_path / "nope.prototxt")
    with pytest.raises(PortingError, match="is a directory"):
        read_prototxt(tmp_path)
    binary = write(tmp_path, "w.caffemodel", v2_layer("fc", blob_shape(2) + packed_floats([1, 2])))
    with pytest.raises(PortingError, match=r"w\.caffemodel: not a text prototxt \(NUL byte at byte \d+"):
        read_prototxt(binary)


# --------------------------------------------------------------------------- caffemodel layouts
def test_v2_blobs_match_protobuf_parse(tmp_path):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    data = (field(1, b"net") + v2_layer("fc", blob_shape(5, 7) + packed_floats(w.ravel()),
                                        blob_shape(5) + packed_floats(b))
            + field(100, caffe_pb2.LayerParameter(name="relu", type="ReLU").SerializeToString()))
    path = write(tmp_path, "w.caffemodel", data)
    ours = read_caffemodel(path)
    ref = protobuf_blobs(path)
    assert list(ours) == ["fc", "relu"] and ours["relu"] == []
    for got, want in zip(ours["fc"], ref["fc"]):
        assert got.data.dtype == np.float32 and np.array_equal(got.data, want)
    assert np.array_equal(ours["fc"][0].data, w.ravel())
    assert ours["fc"][0].shape == (5, 7) and ours["fc"][0].legacy_dims is None


def test_v1_layers_entries(tmp_path):
    values = np.arange(6, dtype=np.float32)
    blob = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3, data=values)
    entry = caffe_pb2.V1LayerParameter(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT, blobs=[blob])
    path = write(tmp_path, "w.caffemodel", caffe_pb2.NetParameter(layers=[entry]).SerializeToString())
    got = read_caffemodel(path)["ip"][0]
    assert got.legacy_dims == (1, 1, 2, 3) and got.shape is None
    assert np.array_equal(got.data, values) and got.matches((2, 3))


def test_v0_layers_entries_take_name_and_blobs_from_the_v0_layer(tmp_path):
    v0 = caffe_pb2.V0LayerParameter(name="conv1", type="conv",
                                    blobs=[caffe_pb2.BlobProto(num=2, channels=1, height=1, width=1, data=[3, 4])])
    entries = [caffe_pb2.V1LayerParameter(layer=v0, bottom=["data"], top=["conv1"]),
               caffe_pb2.V1LayerParameter(layer=caffe_pb2.V0LayerParameter(name="relu1", type="relu"))]
    # "data" is a net input: Caffe's V0 upgrade of the caffemodel aborts on an unknown bottom
    net = caffe_pb2.NetParameter(input=["data"], layers=entries)
    path = write(tmp_path, "w.caffemodel", net.SerializeToString())
    got = read_caffemodel(path)
    assert list(got) == ["conv1", "relu1"] and got["relu1"] == []
    assert np.array_equal(got["conv1"][0].data, [3, 4]) and got["conv1"][0].legacy_dims == (2, 1, 1, 1)


def test_v1_entries_win_over_v2_entries_as_in_caffe(tmp_path):
    # UpgradeV1Net drops `layer` entries when `layers` entries exist.
    v1 = caffe_pb2.V1LayerParameter(name="a", blobs=[caffe_pb2.BlobProto(data=[1])])
    v2 = caffe_pb2.LayerParameter(name="b", blobs=[caffe_pb2.BlobProto(data=[2])])
    path = write(tmp_path, "w.caffemodel", caffe_pb2.NetParameter(layers=[v1], layer=[v2]).SerializeToString())
    assert list(read_caffemodel(path)) == ["a"]


def test_repeated_layer_name_keeps_the_last_blobs(tmp_path):
    data = v2_layer("fc", blob_shape(1) + packed_floats([1])) + v2_layer("fc", blob_shape(1) + packed_floats([2]))
    assert read_caffemodel(write(tmp_path, "w.caffemodel", data))["fc"][0].data.tolist() == [2.0]


def test_legacy_dims_take_precedence_over_shape(tmp_path):
    # Blob::ShapeEquals uses num/channels/height/width whenever any of them is present;
    # the absent ones read 0.
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[3]), height=1, width=3, data=[1, 2, 3])
    path = write(tmp_path, "w.caffemodel", v2_layer("fc", blob.SerializeToString()))
    got = read_caffemodel(path)["fc"][0]
    assert got.shape is None and got.legacy_dims == (0, 0, 1, 3)


def test_blob_without_any_shape_is_scalar_shaped(tmp_path):
    path = write(tmp_path, "w.caffemodel", v2_layer("fc", packed_floats([5])))
    got = read_caffemodel(path)["fc"][0]
    assert got.shape == () and got.data.tolist() == [5.0]


# --------------------------------------------------------------------------- data encodings
def test_double_data_is_rounded_to_float32(tmp_path):
    values = [0.1, 1 / 3, 1e-50, 3.4e38, -2.5]  # 1e-50 underflows to 0 in float32
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[5]), double_data=values)
    path = write(tmp_path, "w.caffemodel", v2_layer("fc", blob.SerializeToString()))
    got = read_caffemodel(path)["fc"][0].data
    assert got.dtype == np.float32
    assert np.array_equal(got, np.array(values, np.float64).astype(np.float32))
    assert np.array_equal(got, protobuf_blobs(path)["fc"][0])


def test_double_data_wins_over_data(tmp_path):
    # Blob::FromProto reads double_data whenever it has values.
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2]), data=[9, 9], double_data=[1, 2])
    path = write(tmp_path, "w.caffemodel", v2_layer("fc", blob.SerializeToString()))
    assert read_caffemodel(path)["fc"][0].data.tolist() == [1.0, 2.0]


def test_unpacked_and_mixed_float_encodings(tmp_path):
    rng = np.random.default_rng(1)
    a, b, c = (rng.standard_normal(n).astype(np.float32) for n in (300, 4, 50))
    # data split over a packed chunk, an unpacked run, another packed chunk; plus a diff
    # field in between, which is skipped.
    blob = (blob_shape(354) + packed_floats(a) + unpacked_floats(b)
            + field(6, np.ones(3, "<f4").tobytes()) + packed_floats(c))
    unpacked_only = blob_shape(4) + unpacked_floats(b)
    doubles = blob_shape(3) + unpacked_doubles([0.5, 1e-3, 7.0])
    path = write(tmp_path, "w.caffemodel", v2_layer("mixed", blob) + v2_layer("unpacked", unpacked_only)
                 + v2_layer("doubles", doubles))
    ours, ref = read_caffemodel(path), protobuf_blobs(path)
    assert np.array_equal(ours["mixed"][0].data, np.concatenate([a, b, c]))
    assert np.array_equal(ours["mixed"][0].data, ref["mixed"][0])
    assert np.array_equal(ours["unpacked"][0].data, b)
    assert np.array_equal(ours["doubles"][0].data, np.float32([0.5, 1e-3, 7.0]))
    assert np.array_equal(ours["doubles"][0].data, ref["doubles"][0])


def test_packed_data_are_writable_views_that_leave_the_file_alone(tmp_path):
    values = np.arange(1000, dtype=np.float32)
    path = write(tmp_path, "w.caffemodel", v2_layer("fc", blob_shape(1000) + packed_floats(values)))
    before = path.read_bytes()
    data = read_caffemodel(path)["fc"][0].data
    assert data.base is not None  # a view of the map, not a copy
    data[:] = -1
    assert path.read_bytes() == before
    assert np.array_equal(read_caffemodel(path)["fc"][0].data, values)


def test_blob_over_protobufs_64mb_default_limit(tmp_path):
    values = np.linspace(-1, 1, 17_000_000, dtype=np.float32)  # 68 MB of packed floats
    path = tmp_path / "big.caffemodel"
    with open(path, "wb") as f:
        head = caffe_pb2.LayerParameter(name="big", type="InnerProduct").SerializeToString()
        blob_len = len(blob_shape(17_000_000)) + 1 + len(varint(values.nbytes)) + values.nbytes
        blob_field_len = 1 + len(varint(blob_len)) + blob_len
        f.write(varint(100 << 3 | 2) + varint(len(head) + blob_field_len) + head)
        f.write(b"\x3a" + varint(blob_len) + blob_shape(17_000_000) + b"\x2a" + varint(values.nbytes))
        f.write(values.tobytes())
    got = read_caffemodel(path)["big"][0]
    assert got.shape == (17_000_000,) and np.array_equal(got.data, values)


def test_caffemodel_net_without_data(tmp_path):
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[2, 2]), data=[1, 2, 3, 4], diff=[5, 6, 7, 8])
    layer = caffe_pb2.LayerParameter(name="fc", type="InnerProduct", bottom=["x"], top=["y"], blobs=[blob])
    path = write(tmp_path, "w.caffemodel", caffe_pb2.NetParameter(name="n", layer=[layer]).SerializeToString())
    net = read_caffemodel_net(path)
    assert net.name == "n" and net.layer[0].type == "InnerProduct" and list(net.layer[0].top) == ["y"]
    assert list(net.layer[0].blobs[0].shape.dim) == [2, 2]
    assert len(net.layer[0].blobs[0].data) == 0 and len(net.layer[0].blobs[0].diff) == 0


# --------------------------------------------------------------------------- bad caffemodels
def good_file() -> bytes:
    return (field(1, b"net") + v2_layer("a", blob_shape(3) + packed_floats([1, 2, 3]))
            + v2_layer("b", blob_shape(2) + unpacked_floats([4, 5])))


def test_every_cut_of_a_caffemodel_is_refused_or_is_a_whole_prefix(tmp_path):
    data = good_file()
    first_layer_end = len(field(1, b"net") + v2_layer("a", blob_shape(3) + packed_floats([1, 2, 3])))
    for cut in range(1, len(data)):
        path = write(tmp_path, "cut.caffemodel", data[:cut])
        if cut == first_layer_end:  # ends exactly after a whole layer: a valid, shorter file
            assert list(read_caffemodel(path)) == ["a"]
            continue
        with pytest.raises(PortingError) as err:
            read_caffemodel(path)
        message = str(err.value)
        assert message.startswith(f"{path}: "), message
        if cut > len(field(1, b"net")) + 2:  # inside a layer entry
            assert f"truncated at byte {cut} " in message, message
        else:
            assert "not a Caffe caffemodel" in message or "truncated" in message, message


@pytest.mark.parametrize("name, content, why", [
    ("empty", b"", r"empty file"),
    ("jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(range(64)),
     r"invalid wire type 7; the file looks like a JPEG image"),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(32), r"looks like a PNG image"),
    ("text", b'name: "CaffeNet"\nlayer {\n  name: "conv1"\n}\n', r"looks like text \(a prototxt\?\)"),
    ("no-layers", field(1, b"just a name"), r"no layer entries"),
])
def test_foreign_files_are_not_caffemodels(tmp_path, name, content, why):
    path = write(tmp_path, f"{name}.caffemodel", content)
    with pytest.raises(PortingError, match=rf"^{path}: not a Caffe caffemodel \(.*{why}"):
        read_caffemodel(path)


def test_random_bytes_are_not_caffemodels(tmp_path):
    rng = np.random.default_rng(20160101)
    for i in range(50):
        path = write(tmp_path, "random.caffemodel", rng.bytes(int(rng.integers(1, 4096))))
        with pytest.raises(PortingError, match=rf"^{path}: not a Caffe caffemodel \("):
            read_caffemodel(path)


def test_blob_data_of_wrong_width_is_refused(tmp_path):
    path = write(tmp_path, "w.caffemodel", v2_layer("fc", blob_shape(1) + field(5, b"\x00\x00\x80")))
    with pytest.raises(PortingError, match=r"not a Caffe caffemodel \(.*3 bytes is not a multiple of 4"):
        read_caffemodel(path)


def test_missing_and_directory_caffemodel(tmp_path):
    with pytest.raises(PortingError, match=r"nope\.caffemodel: no such file$"):
        read_caffemodel(tmp_path / "nope.caffemodel")
    with pytest.raises(PortingError, match="is a directory"):
        read_caffemodel(tmp_path)


# --------------------------------------------------------------------------- real Caffe
@pytest.mark.caffe
@pytest.mark.parametrize("name", ["caffe_v0_deploy.prototxt", "caffe_v1_deploy.prototxt"])
def test_caffe_written_caffemodel_reads_as_pycaffe_sees_it(caffe_weights, caffe_worker, name):
    prototxt = FORMATS / name
    weights = caffe_weights(prototxt, seed=3)
    ours = read_caffemodel(weights)
    theirs = caffe_worker.run_net(prototxt, weights, params=True, blobs=["prob"], capture_tops=False)
    params = {key for key in theirs if key.startswith("param/")}
    assert params and params == {f"param/{layer}/{i}" for layer, blobs in ours.items() for i in range(len(blobs))}
    for key in params:
        _, layer, i = key.split("/")
        blob = ours[layer][int(i)]
        assert blob.shape == theirs[key].shape  # Caffe 1.0 saves BlobShape, not legacy dims
        assert np.array_equal(blob.data, theirs[key].ravel())  # bit for bit: same float32 bytes
