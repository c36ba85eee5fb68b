"""Data layers as net inputs (porting/layers/data_layers.py): Data, ImageData, HDF5Data,
MemoryData, WindowData, DummyData; --input-shape; a CaffeNet-style train_val in both phases
against real Caffe; TRAIN Dropout seeded as Caffe's generator.

Shapes follow Caffe 1.0's own arithmetic (src/caffe/layers/*data_layer.cpp and
DataTransformer::InferBlobShape): DummyData runs in real Caffe here, MemoryData is built by
real Caffe (its set-up shapes are read from Caffe's log; a forward needs Reset); the layers
that read a source (Data, ImageData, HDF5Data, WindowData) are checked against that
arithmetic, cited per case. No data source is ever written or read.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

from porting.errors import PortingError
from porting.layers import build_layer
from porting.layers.data_layers import caffe_net_with_inputs, parse_input_shapes
from porting.net import load_caffe
from porting.write import write_prototxt


def run(*args):
    return subprocess.run([sys.executable, "-m", "porting", *map(str, args)], capture_output=True, text=True)


def shapes_of(text: str):
    layer = build_layer(text, [])
    return layer.top_shapes, layer.shape_sources


# ------------------------------------------------------------------ shapes from parameters

def test_data_shape_from_batch_size_and_crop_size():
    # data_layer.cpp: top_shape = InferBlobShape(datum) with top_shape[0] = batch_size;
    # InferBlobShape: (1, datum C, crop or datum H, crop or datum W); label (batch_size,).
    shapes, sources = shapes_of('name: "d" type: "Data" top: "data" top: "label" '
                                'transform_param { crop_size: 227 mirror: true mean_file: "m.binaryproto" } '
                                'data_param { source: "lmdb" batch_size: 2 backend: LMDB }')
    assert shapes == [(2, None, 227, 227), (2,)]
    assert sources == ["unknown: give --input-shape data=2,C,227,227", "batch_size"]
    # Transform CHECKs mean_values_.size() == 1 or == the channels: three values say C = 3.
    shapes, sources = shapes_of('name: "d" type: "Data" top: "data" transform_param { crop_size: 5 '
                                'mean_value: 104 mean_value: 117 mean_value: 123 } data_param { batch_size: 4 }')
    assert shapes == [(4, 3, 5, 5)] and sources == ["batch_size, crop_size and mean_value count"]
    shapes, _ = shapes_of('name: "d" type: "Data" top: "data" data_param { batch_size: 4 }')
    assert shapes == [(4, None, None, None)]


def test_image_data_shape():
    # image_data_layer.cpp: ReadImageToCVMat(new_height, new_width, is_color) then
    # InferBlobShape(cv_img): C = 3 (color) or 1, H x W = crop, else the resized image.
    base = 'name: "i" type: "ImageData" top: "data" top: "label" '
    assert shapes_of(base + 'image_data_param { source: "l.txt" batch_size: 3 new_height: 40 new_width: 30 }') == (
        [(3, 3, 40, 30), (3,)], ["batch_size, is_color and new_height/new_width", "batch_size"])
    assert shapes_of(base + 'transform_param { crop_size: 20 } image_data_param { batch_size: 3 is_color: false '
                     'new_height: 40 new_width: 30 }')[0] == [(3, 1, 20, 20), (3,)]
    assert shapes_of(base + 'image_data_param { source: "l.txt" }')[0] == [(1, 3, None, None), (1,)]  # batch 1


def test_window_memory_hdf5_dummy_shapes():
    # window_data_layer.cpp: top[0] (batch_size, channels from the window file, crop, crop),
    # top[1] (batch_size, 1, 1, 1).
    assert shapes_of('name: "w" type: "WindowData" top: "data" top: "label" transform_param { crop_size: 16 } '
                     'window_data_param { source: "w.txt" batch_size: 5 }')[0] == [(5, None, 16, 16), (5, 1, 1, 1)]
    # memory_data_layer.cpp: top[0] (batch_size, channels, height, width); Forward_cpu
    # reshapes top[1] to (batch_size, 1, 1, 1) (set-up said (batch_size,)).
    assert shapes_of('name: "m" type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 '
                     'channels: 3 height: 4 width: 5 }') == ([(2, 3, 4, 5), (2, 1, 1, 1)],
                                                              ["memory_data_param", "batch_size"])
    # hdf5_data_layer.cpp: each top is its dataset's shape with batch_size first.
    assert shapes_of('name: "h" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "h.txt" '
                     'batch_size: 7 }')[0] == [(7, None, None, None)] * 2
    # dummy_data_layer.cpp: shape once or per top; legacy num/channels/height/width likewise.
    assert shapes_of('name: "x" type: "DummyData" top: "a" top: "b" dummy_data_param { shape { dim: 2 dim: 3 } '
                     'shape { dim: 4 } }')[0] == [(2, 3), (4,)]
    assert shapes_of('name: "x" type: "DummyData" top: "a" top: "b" dummy_data_param { num: 2 num: 3 '
                     'channels: 1 height: 4 width: 5 }')[0] == [(2, 1, 4, 5), (3, 1, 4, 5)]


@pytest.mark.parametrize("text, words", [
    ('name: "i" type: "ImageData" top: "d" top: "l" image_data_param { new_height: 4 }', "together"),
    ('name: "i" type: "ImageData" top: "d" top: "l" image_data_param { batch_size: 0 }', "positive batch_size"),
    ('name: "i" type: "ImageData" top: "d" top: "l" transform_param { crop_size: 9 } '
     'image_data_param { new_height: 8 new_width: 8 }', "larger than the resized image"),
    ('name: "i" type: "ImageData" top: "d" image_data_param { }', "takes 2 top"),
    ('name: "w" type: "WindowData" top: "d" top: "l" window_data_param { batch_size: 2 }', "crop_size"),
    ('name: "m" type: "MemoryData" top: "d" top: "l" memory_data_param { batch_size: 2 channels: 3 }', "positive"),
    ('name: "d" type: "Data" top: "a" top: "b" top: "c" data_param { batch_size: 1 }', "takes 1 to 2 top"),
    ('name: "d" type: "Data" top: "d" transform_param { mean_file: "m" mean_value: 1 } data_param { batch_size: 1 }',
     "mean_file and mean_value"),
    ('name: "x" type: "DummyData" top: "a" dummy_data_param { }', "shape"),
    ('name: "x" type: "DummyData" top: "a" dummy_data_param { shape { dim: 1 } num: 1 channels: 1 height: 1 '
     'width: 1 }', "both shape and"),
    ('name: "x" type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param { num: 1 num: 2 channels: 1 '
     'height: 1 width: 1 }', "2 num for 3 tops"),
])
def test_refused_as_caffe_refuses(text, words):
    with pytest.raises(ValueError, match=words):
        build_layer(text, [])


def test_dummy_data_shapes_against_caffe(caffe_worker, tmp_path):
    path = tmp_path / "dummy.prototxt"
    path.write_text('name: "dummy"\n'
                    'layer { name: "x" type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param {\n'
                    '  data_filler { type: "constant" value: 1.5 } shape { dim: 2 dim: 3 dim: 4 } shape { dim: 5 }\n'
                    '  shape { dim: 1 dim: 1 dim: 2 dim: 3 dim: 2 } } }\n'
                    'layer { name: "y" type: "DummyData" top: "d" dummy_data_param { num: 2 channels: 3 height: 1 '
                    'width: 4 } }\n'
                    'layer { name: "r" type: "ReLU" bottom: "a" top: "r" }\n')
    ref = caffe_worker.run_net(path)
    net = load_caffe(path)
    assert set(net.inputs) == {"a", "b", "c", "d"}
    for name in "abcd":
        assert net.graph.blob_shapes[name] == ref[f"blob/{name}/data"].shape
    fed = {name: torch.from_numpy(ref[f"blob/{name}/data"]) for name in "abcd"}  # the fillers' values, fed
    assert np.array_equal(net(**fed)["r"].numpy(), ref["blob/r/data"])


def test_memory_data_against_caffe_set_up(caffe_worker, tmp_path):
    """Caffe builds MemoryData (its set-up logs the top shapes) but cannot run it without
    Reset (set_input_arrays), and refuses a zero dim as the port does."""
    from porting.legacy import CaffeError

    text = ('name: "m"\nlayer {{ name: "x" type: "MemoryData" top: "a" top: "b" '
            'memory_data_param {{ batch_size: 2 channels: {} height: 4 width: 5 }} }}\n')
    path = tmp_path / "memory.prototxt"
    path.write_text(text.format(3))
    with pytest.raises(CaffeError, match="needs to be initialized by calling Reset") as err:
        caffe_worker.run_net(path)
    logged = [line.split("Top shape: ")[1] for line in err.value.log_tail.splitlines() if "Top shape: " in line]
    assert logged[-2:] == ["2 3 4 5 (120)", "2 (2)"]  # set-up; Forward_cpu makes the label 2x1x1x1
    assert load_caffe(path).inputs == {"a": (2, 3, 4, 5), "b": (2, 1, 1, 1)}
    path.write_text(text.format(0))
    with pytest.raises(CaffeError, match="must be specified and positive"):
        caffe_worker.run_net(path)
    with pytest.raises(PortingError, match="MemoryData needs batch_size, channels, height and width, all positive"):
        load_caffe(path)


# ------------------------------------------------------------------ --input-shape

def test_parse_input_shapes():
    assert parse_input_shapes(["data=2,3,227,227", "label=2", "a=b=1"]) == {
        "data": (2, 3, 227, 227), "label": (2,), "a=b": (1,)}
    for bad in ("data", "=1,2", "data=", "data=1,x", "data=-1,3", "data=1," + "1," * 32 + "1", "d=99999999999"):
        with pytest.raises(PortingError, match="--input-shape"):
            parse_input_shapes([bad])


# ------------------------------------------------------------------ a CaffeNet-style train_val

TRAIN_VAL = """name: "CaffeNetStyle"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true crop_size: 227 mean_file: "imagenet_mean.binaryproto" }
  data_param { source: "ilsvrc12_train_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { mirror: false crop_size: 227 mean_file: "imagenet_mean.binaryproto" }
  data_param { source: "ilsvrc12_val_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 8 pad: 2 kernel_size: 5 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool2" top: "fc6" inner_product_param { num_output: 32 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 32 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.3 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 10 } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc8" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }
"""
SHAPE = "data=2,3,227,227"


@pytest.fixture
def train_val(tmp_path):
    path = tmp_path / "train_val.prototxt"
    path.write_text(TRAIN_VAL)
    return path


@pytest.fixture
def train_val_weights(train_val, caffe_weights, tmp_path):
    """Weights written by real Caffe's fillers for the train_val's layers (by name): Caffe
    cannot build the Data layers without their LMDB, so it fills the Input-layer twin."""
    twin = tmp_path / "with_inputs.prototxt"
    write_prototxt(twin, caffe_net_with_inputs(load_caffe(train_val, input_shapes={"data": (2, 3, 227, 227)}).graph))
    return caffe_weights(twin, seed=3, filler="msra", bias_filler="gaussian", bias_std=0.1)


def test_inspect_shows_shape_sources(train_val):
    out = run("inspect", train_val)
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if l.startswith("input ")]
    assert lines == ["input data (Data data): 2x?x227x227, shape unknown: give --input-shape data=2,C,227,227",
                     "input label (Data data): 2, shape from batch_size"]
    out = run("inspect", train_val, "--input-shape", SHAPE, "--phase", "train")
    assert out.returncode == 0, out.stderr
    assert "input data (Data data): 2x3x227x227, shape from --input-shape" in out.stdout
    assert "2x10" in next(l for l in out.stdout.splitlines() if l.startswith("fc8 ")).split()


@pytest.mark.parametrize("args, words", [
    ((), "the shape of top data is unknown (Data reads its records' channels from its LMDB/LevelDB, which the port "
         "never opens); give --input-shape data=2,C,227,227"),
    (("--input-shape", "data=2,3,x"), "--input-shape: data=2,3,x: dims must be integers"),
    (("--input-shape", "data"), "is not NAME=N,C,H,W"),
    (("--input-shape", SHAPE, "--input-shape", "labels=2"), "--input-shape: labels: not an input of the net"),
])
def test_convert_refuses_in_one_line(train_val, tmp_path, args, words):
    out = run("convert", train_val, "-o", tmp_path / "x.safetensors", *args)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("phase", ["test", "train"])
def test_train_val_converts_in_both_phases(train_val, tmp_path, phase):
    from porting.saved import load_converted

    out = run("convert", train_val, "-o", tmp_path / "x.safetensors", "--phase", phase, "--input-shape", SHAPE)
    assert out.returncode == 0, out.stderr
    net = load_converted(tmp_path / "x.safetensors")
    assert net.inputs == {"data": (2, 3, 227, 227), "label": (2,)}
    names = [s.name for s in net.graph.layers]
    assert ("accuracy" in names) == (phase == "test") and names.count("data") == 1
    if phase == "train":
        with pytest.raises(PortingError, match="--dropout-seed"):  # TRAIN Dropout unseeded: refused
            net(data=torch.zeros(2, 3, 227, 227), label=torch.zeros(2))


def test_train_val_test_phase_matches_caffe(train_val, train_val_weights, caffe_worker, tmp_path):
    from porting.cli_verify import run_verify

    report = run_verify(train_val, train_val_weights, tmp_path / "report", onnx=False, worker=caffe_worker,
                        input_shapes={"data": (2, 3, 227, 227)})
    assert report["passed"], report["summary"]
    keys = {r["key"] for r in report["rows"]}
    assert {"blob/accuracy/data", "blob/loss/data", "top/fc8/0/data", "top/conv1/0/diff"} <= keys


def test_train_val_train_phase_matches_caffe_with_seeded_dropout(train_val, train_val_weights, caffe_worker,
                                                                  tmp_path):
    from porting.cli_verify import run_verify

    report = run_verify(train_val, train_val_weights, tmp_path / "report", onnx=False, worker=caffe_worker,
                        input_shapes={"data": (2, 3, 227, 227)}, phase="train", dropout_seed=11)
    assert report["passed"], report["summary"]
    assert "top/drop7/0/data" in {r["key"] for r in report["rows"]}
    # The masks are Caffe's: Caffe's Dropout top is non-zero exactly where the port's mask
    # keeps a unit and Caffe's own bottom (a ReLU's output) is non-zero.
    net = load_caffe(train_val, train_val_weights, phase="train", input_shapes={"data": (2, 3, 227, 227)},
                     dropout_seed=11)
    rng = np.random.default_rng(0)
    data = rng.uniform(-128, 128, (2, 3, 227, 227)).astype(np.float32)
    label = np.array([3, 7], np.float32)
    twin = tmp_path / "with_inputs.prototxt"
    write_prototxt(twin, caffe_net_with_inputs(net.graph))
    ref = caffe_worker.run_net(twin, train_val_weights, inputs={"data": data, "label": label}, phase="train", seed=11)
    with torch.no_grad():
        net(data=torch.from_numpy(data), label=torch.from_numpy(label))
    for layer in ("drop6", "drop7"):
        module = net.graph.layer(layer).module
        caffe_bottom = ref[f"top/relu{layer[-1]}/0/data"]
        assert np.array_equal(ref[f"top/{layer}/0/data"] != 0, module.mask.numpy() & (caffe_bottom != 0))
        assert 0.3 < module.mask.float().mean() < 0.9  # a real mask, not all kept or all dropped


def test_verify_cli_train_phase_exit_status(train_val, train_val_weights, tmp_path):
    out = run("verify", train_val, train_val_weights, "--report", tmp_path / "r", "--no-onnx", "--phase", "train",
              "--dropout-seed", "5", "--input-shape", SHAPE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("PASS")


# ------------------------------------------------------------------ TRAIN Dropout = Caffe's generator

DROPOUTS = """name: "drops"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 3 dim: 1000 } } }
layer { name: "d1" type: "Dropout" bottom: "x" top: "y" dropout_param { dropout_ratio: 0.3 } }
layer { name: "d2" type: "Dropout" bottom: "y" top: "y" dropout_param { dropout_ratio: 0.5 } }
layer { name: "d0" type: "Dropout" bottom: "y" top: "z" dropout_param { dropout_ratio: 0 } }
layer { name: "d3" type: "Dropout" bottom: "z" top: "w" dropout_param { dropout_ratio: 0.9 } }
"""


@pytest.mark.parametrize("seed", [0, 7, 4294967295])
def test_train_dropout_is_caffes_bit_for_bit(caffe_worker, tmp_path, seed):
    """caffe.set_random_seed(S) then Dropout's caffe_rng_bernoulli: the port's masks, tops and
    diffs are Caffe's exactly, layer after layer in forward order (ratio 0 draws its words too)."""
    path = tmp_path / "drops.prototxt"
    path.write_text(DROPOUTS)
    x = np.random.default_rng(seed % 97).uniform(-2, 2, (3, 1000)).astype(np.float32)
    g = np.random.default_rng(1).uniform(-1, 1, (3, 1000)).astype(np.float32)
    ref = caffe_worker.run_net(path, inputs={"x": x}, top_diffs={"w": g}, phase="train", seed=seed)
    net = load_caffe(path, phase="train", dropout_seed=seed)
    xt = torch.from_numpy(x).requires_grad_()
    out = net(xt)
    (grad,) = torch.autograd.grad(out["w"], xt, torch.from_numpy(g))
    for layer in ("d1", "d2", "d0", "d3"):
        assert np.array_equal(net.layer_outputs[layer][0].detach().numpy(), ref[f"top/{layer}/0/data"]), layer
    assert np.array_equal(grad.numpy(), ref["blob/x/diff"])
    again = net(torch.from_numpy(x))  # each forward restarts the generator, as the worker reseeds
    assert torch.equal(again["w"], out["w"])
    test_phase = caffe_worker.run_net(path, inputs={"x": x})  # TEST: identity, as the port
    assert np.array_equal(load_caffe(path)(torch.from_numpy(x))["w"].numpy(), test_phase["blob/w/data"])


def test_data_layer_input_not_as_given_is_preprocessing(tmp_path):
    """A port fed channel-swapped data departs at the Data layer, blamed on preprocessing."""
    from porting.verify import default_objective, port_arrays, random_inputs, verify_arrays

    path = tmp_path / "small.prototxt"
    path.write_text('name: "small"\n'
                    'layer { name: "data" type: "Data" top: "data" top: "label" transform_param { crop_size: 6 '
                    'mean_value: 1 mean_value: 2 mean_value: 3 } data_param { source: "db" batch_size: 2 } }\n'
                    'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                    'inner_product_param { num_output: 4 } }\n'
                    'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }\n')
    net = load_caffe(path)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.from_numpy(np.random.default_rng(5).normal(0, 0.1, tuple(p.shape)).astype(np.float32)))
    obj = default_objective(net.graph)
    assert obj.layer == "fc"
    inputs = random_inputs(net.graph, seed=6)
    assert set(np.unique(inputs["label"])) <= {0, 1, 2, 3}  # class indices of fc's 4 outputs
    reference = port_arrays(net, inputs, obj)
    swapped = dict(inputs, data=np.ascontiguousarray(inputs["data"][:, ::-1]))
    v = verify_arrays(net, reference, port_arrays(net, swapped, obj), objective=obj, inputs=inputs)
    assert (v.departure.layer, v.departure.layer_type) == ("data", "Data")
    assert v.summary == ("FAIL at the forward of layer data (Data): port did not get the input it was "
                         "given (preprocessing).")


def test_export_takes_input_shape(tmp_path):
    pytest.importorskip("onnx")
    path = tmp_path / "data_conv.prototxt"
    path.write_text('name: "dc"\n'
                    'layer { name: "data" type: "Data" top: "data" transform_param { crop_size: 8 } '
                    'data_param { source: "db" batch_size: 1 } }\n'
                    'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
                    'convolution_param { num_output: 2 kernel_size: 3 } }\n')
    out = run("export", path, "--onnx", tmp_path / "x.onnx")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--input-shape data=1,C,8,8" in out.stderr
    out = run("export", path, "--onnx", tmp_path / "x.onnx", "--input-shape", "data=1,3,8,8", "--compare")
    assert out.returncode == 0, out.stderr
    import onnx

    model = onnx.load(str(tmp_path / "x.onnx"))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert (model.graph.input[0].name, dims) == ("data", [1, 3, 8, 8])
