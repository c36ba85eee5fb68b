"""The committed generated module must be exactly what caffe.proto compiles to."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from porting import caffe_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_generated_module_matches_proto(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools (test extra) not installed")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'porting'}",
                    f"--python_out={tmp_path}", str(ROOT / "porting" / "caffe.proto")], check=True)
    fresh = (tmp_path / "caffe_pb2.py").read_text()
    committed = (ROOT / "porting" / "caffe_pb2.py").read_text()
    assert fresh == committed, "porting/caffe_pb2.py is stale: run `make proto`"


def test_caffe_field_numbers_and_defaults():
    # Spot checks against Caffe 1.0's caffe.proto (values that decide wire decoding).
    f = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    assert (f["convolution_param"].number, f["pooling_param"].number, f["blobs"].number) == (106, 121, 7)
    assert caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name["layer"].number == 100
    assert caffe_pb2.V1LayerParameter.DESCRIPTOR.fields_by_name["blobs"].number == 6
    assert caffe_pb2.V0LayerParameter.DESCRIPTOR.fields_by_name["blobs"].number == 50
    assert caffe_pb2.LRNParameter().beta == pytest.approx(0.75)
    assert caffe_pb2.BatchNormParameter().eps == pytest.approx(1e-5)
    assert caffe_pb2.PoolingParameter().pool == caffe_pb2.PoolingParameter.MAX
    assert caffe_pb2.ConvolutionParameter().bias_term is True
