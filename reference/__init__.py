"""Code that runs inside the legacy stack (Caffe 1.0 + Python 3.9, and Python 2.7).

wire.py (both Pythons): message framing and array helpers. worker.py (Python 3 +
pycaffe): the long-lived worker. caffe_ops.py: run_net, make_weights, CaffeProxy
answers. worker2.py, py2_ops.py, caffe_proxy.py (Python 2.7): the 2016 libraries and a
way back into Caffe. The host side is porting/legacy_worker.py.
"""
