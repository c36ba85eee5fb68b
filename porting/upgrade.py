"""Upgrade any Caffe 1.0 net definition to the current (V2) form, as Caffe itself does.

``upgrade_net`` follows ``UpgradeNetAsNeeded`` of Caffe 1.0 (src/caffe/util/upgrade_proto.cpp),
step by step and in the same order:

1. V0 -> V1 (``UpgradeV0Net``): ``padding`` layers are folded into the pad of the conv or
   pool layer that reads them, then each ``layers { layer { ... } }`` becomes a V1 layer
   (V0 type string -> V1 enum, flat V0 fields -> ``*_param`` messages). Only the name,
   layers, input, input_dim and force_backward of the net survive, as in Caffe.
2. Old data-transformation fields (scale, mean_file, crop_size, mirror inside
   data/image_data/window_data params) move to ``transform_param``.
3. V1 -> V2 (``UpgradeV1Net``): enum type -> type string, blobs_lr / weight_decay /
   param / blob_share_mode -> ``param`` specs, every ``*_param`` copied, include/exclude
   kept. V2 ``layer`` entries next to V1 ``layers`` are dropped, as Caffe drops them.
4. Net-level ``input`` + ``input_dim`` / ``input_shape`` -> one ``Input`` layer named
   "input" placed first (``UpgradeNetInput``); inputs without dims are just removed.
5. BatchNorm layers declaring exactly three ``param`` specs get lr_mult and decay_mult 0
   on each (``UpgradeNetBatchNorm`` as of BVLC/caffe PR #5184, in Caffe 1.0).

What Caffe aborts on (an unknown V0 type, a bottom no layer produced, a padding layer
feeding a non-conv layer, input dims that do not match the inputs) is a PortingError
naming the file and place. What Caffe only logs ("continuing anyway": a V0 field the
layer type does not take) is logged on the ``porting.upgrade`` logger and dropped.
"""
from __future__ import annotations

import logging

from google.protobuf.descriptor import FieldDescriptor

from porting import caffe_pb2
from porting.errors import PortingError, shown

log = logging.getLogger(__name__)

V1 = caffe_pb2.V1LayerParameter

# UpgradeV1LayerType: V1 enum value -> V2 type string (NONE -> "").
V1_LAYER_TYPES: dict[int, str] = {
    V1.NONE: "", V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL", V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution", V1.DECONVOLUTION: "Deconvolution", V1.DATA: "Data",
    V1.DROPOUT: "Dropout", V1.DUMMY_DATA: "DummyData", V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise", V1.EXP: "Exp", V1.FLATTEN: "Flatten", V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output", V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData", V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct", V1.LRN: "LRN", V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss", V1.MVN: "MVN",
    V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU", V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax", V1.SOFTMAX_LOSS: "SoftmaxWithLoss", V1.SPLIT: "Split",
    V1.SLICE: "Slice", V1.TANH: "TanH", V1.WINDOW_DATA: "WindowData", V1.THRESHOLD: "Threshold",
}
# The reverse, for writing V1 files.
V2_TO_V1_TYPE: dict[str, int] = {name: value for value, name in V1_LAYER_TYPES.items() if name}

# UpgradeV0LayerType: V0 type string -> V1 enum value.
V0_LAYER_TYPES: dict[str, int] = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN, "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL, "images": V1.IMAGE_DATA, "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING,
    "relu": V1.RELU, "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT, "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

# UpgradeV0LayerParameter: V0 field -> {V0 layer type: (V1 sub-message, its field)}.
# A V0 field set on a layer type not listed is dropped with a logged error, as in Caffe.
_V0_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"),
                   "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"),
               "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "batchsize": {"data": ("data_param", "batch_size"),
                  "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "rand_skip": {"data": ("data_param", "rand_skip"), "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", None)},
}
# V0 fields that go to transform_param whatever the layer type.
_V0_TRANSFORM = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size", "mirror": "mirror"}
_V0_POOL = {caffe_pb2.V0LayerParameter.MAX: caffe_pb2.PoolingParameter.MAX,
            caffe_pb2.V0LayerParameter.AVE: caffe_pb2.PoolingParameter.AVE,
            caffe_pb2.V0LayerParameter.STOCHASTIC: caffe_pb2.PoolingParameter.STOCHASTIC}
# Data layers whose params once held the transformation fields (NetNeedsDataUpgrade).
_DATA_PARAMS = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                V1.WINDOW_DATA: "window_data_param"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

UPGRADE_V0 = "V0 layers -> V1"
UPGRADE_DATA = "data-layer transformation fields -> transform_param"
UPGRADE_V1 = "V1 layers -> V2"
UPGRADE_INPUT = "net input fields -> Input layer"
UPGRADE_BATCHNORM = "BatchNorm param specs (lr_mult, decay_mult -> 0)"


def upgrade_net(net: caffe_pb2.NetParameter, source: object = None) -> caffe_pb2.NetParameter:
    """A new, fully upgraded (V2, Input-layer) copy of ``net``; ``net`` is left unchanged.

    ``source`` (the file the net came from) is named in errors.
    """
    return upgrade(net, source)[0]


def upgrade_needed(net: caffe_pb2.NetParameter, source: object = None) -> list[str]:
    """Names of the upgrade steps ``upgrade_net`` applies to ``net``, in order (empty if
    it is already current); ``source`` names the file in errors."""
    return upgrade(net, source)[1]


def upgrade(net: caffe_pb2.NetParameter, source: object = None) -> tuple[caffe_pb2.NetParameter, list[str]]:
    """``upgrade_net`` and ``upgrade_needed`` in one pass (each upgrade note logged once)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    applied = []
    if any(entry.HasField("layer") for entry in out.layers):
        out = upgrade_v0_net(out, source)
        applied.append(UPGRADE_V0)
    if _needs_data_upgrade(out):
        upgrade_data_transformation(out)
        applied.append(UPGRADE_DATA)
    if len(out.layers):
        out = upgrade_v1_net(out, source)
        applied.append(UPGRADE_V1)
    if len(out.input):
        upgrade_input(out, source)
        applied.append(UPGRADE_INPUT)
    changed = False
    for layer in out.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                before = spec.SerializeToString()
                spec.lr_mult, spec.decay_mult = 0.0, 0.0
                changed |= spec.SerializeToString() != before
    if changed:  # listed only when it changed something (modern nets already say 0)
        applied.append(UPGRADE_BATCHNORM)
    return out, applied


# --------------------------------------------------------------------------- V0 -> V1
def upgrade_v0_net(net: caffe_pb2.NetParameter, source: object = None) -> caffe_pb2.NetParameter:
    """UpgradeV0Net: a new V1 net (``layers`` entries) from a V0 one."""
    padded = fold_padding_layers(net, source)
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    for i, entry in enumerate(padded.layers):
        _upgrade_v0_layer(entry, out.layers.add(), source, i)
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    return out


def fold_padding_layers(net: caffe_pb2.NetParameter, source: object = None) -> caffe_pb2.NetParameter:
    """UpgradeV0PaddingLayers: drop each V0 ``padding`` layer, giving its pad to the conv
    or pool layer that reads its top and rewiring that layer to the padding's bottom."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    last_producer = {name: -1 for name in net.input}  # blob -> index of the layer that last wrote it
    for i, entry in enumerate(net.layers):
        v0 = entry.layer
        if v0.type != "padding":
            out.layers.add().CopyFrom(entry)
        for j, bottom in enumerate(entry.bottom):
            if bottom not in last_producer:
                raise PortingError(f"bottom blob '{shown(bottom)}' is not produced by any earlier layer",
                                   source, _v0_place(entry, i))
            producer = last_producer[bottom]
            if producer == -1 or net.layers[producer].layer.type != "padding":
                continue
            pad_entry = net.layers[producer]
            if v0.type not in ("conv", "pool"):
                raise PortingError(f"V0 padding layer '{shown(pad_entry.layer.name)}' feeds a '{shown(v0.type)}' "
                                   "layer; only conv and pool layers can take a padding layer",
                                   source, _v0_place(entry, i))
            if len(entry.bottom) != 1 or len(pad_entry.bottom) != 1 or len(pad_entry.top) != 1:
                raise PortingError("a V0 padding layer and the layer it feeds must each have one "
                                   "bottom (and the padding layer one top)", source, _v0_place(entry, i))
            target = out.layers[len(out.layers) - 1]
            target.layer.pad = pad_entry.layer.pad
            target.bottom[j] = pad_entry.bottom[0]
        for top in entry.top:
            last_producer[top] = i
    return out


def _v0_place(entry: caffe_pb2.V1LayerParameter, index: int) -> str:
    name = entry.layer.name if entry.HasField("layer") else entry.name
    return f"layer {shown(name)}" if name else f"layers entry {index}"


def _upgrade_v0_layer(entry: caffe_pb2.V1LayerParameter, out: caffe_pb2.V1LayerParameter,
                      source, index: int) -> None:
    """UpgradeV0LayerParameter: one V0 layer connection -> one V1 layer."""
    out.bottom.extend(entry.bottom)
    out.top.extend(entry.top)
    if not entry.HasField("layer"):
        return
    v0 = entry.layer
    if v0.HasField("name"):
        out.name = v0.name
    kind = v0.type
    if v0.HasField("type"):
        if kind not in V0_LAYER_TYPES:
            raise PortingError(f"unknown V0 layer type '{shown(kind)}'", source, _v0_place(entry, index))
        out.type = V0_LAYER_TYPES[kind]
    for blob in v0.blobs:
        out.blobs.add().CopyFrom(blob)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for v0_field, targets in _V0_FIELDS.items():
        if not v0.HasField(v0_field):
            continue
        if kind not in targets:
            log.error("%s: %s: V0 parameter %s does not apply to layer type %r; dropped",
                      source, _v0_place(entry, index), v0_field, kind)
            continue
        sub_name, target_field = targets[kind]
        sub = getattr(out, sub_name)
        value = getattr(v0, v0_field)
        if target_field is None:
            sub.CopyFrom(value)
        elif v0_field == "pool":
            sub.pool = _V0_POOL[value]
        elif isinstance(value, caffe_pb2.FillerParameter):
            getattr(sub, target_field).CopyFrom(value)
        elif sub.DESCRIPTOR.fields_by_name[target_field].is_repeated:
            getattr(sub, target_field).append(_converted(sub, target_field, value))  # conv pad / kernel_size / stride
        else:
            setattr(sub, target_field, _converted(sub, target_field, value))
    for v0_field, target_field in _V0_TRANSFORM.items():
        if v0.HasField(v0_field):
            setattr(out.transform_param, target_field, getattr(v0, v0_field))


_INT_BITS = {FieldDescriptor.CPPTYPE_INT32: (32, True), FieldDescriptor.CPPTYPE_UINT32: (32, False),
             FieldDescriptor.CPPTYPE_INT64: (64, True), FieldDescriptor.CPPTYPE_UINT64: (64, False)}


def _converted(message, field_name: str, value):
    """``value`` as C++ converts it into the field's integer type (UpgradeV0LayerParameter
    copies e.g. V0's int32 new_width into a uint32: -1 becomes 4294967295); others unchanged."""
    bits = _INT_BITS.get(message.DESCRIPTOR.fields_by_name[field_name].cpp_type)
    if bits is None or isinstance(value, (bool, float)):
        return value
    width, signed = bits
    value &= (1 << width) - 1
    return value - (1 << width) if signed and value >> (width - 1) else value


# --------------------------------------------------------------------------- data fields
def _needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    for entry in net.layers:
        if entry.type in _DATA_PARAMS:
            params = getattr(entry, _DATA_PARAMS[entry.type])
            if any(params.HasField(f) for f in _TRANSFORM_FIELDS):
                return True
    return False


def upgrade_data_transformation(net: caffe_pb2.NetParameter) -> None:
    """UpgradeNetDataTransformation, in place: data-layer scale/mean_file/crop_size/mirror move to
    transform_param. As in Caffe, every such layer ends up with both messages present,
    even empty ones."""
    for entry in net.layers:
        if entry.type not in _DATA_PARAMS:
            continue
        params = getattr(entry, _DATA_PARAMS[entry.type])
        params.SetInParent()
        entry.transform_param.SetInParent()
        for f in _TRANSFORM_FIELDS:
            if params.HasField(f):
                setattr(entry.transform_param, f, getattr(params, f))
                params.ClearField(f)


# --------------------------------------------------------------------------- V1 -> V2
def upgrade_v1_net(net: caffe_pb2.NetParameter, source: object = None) -> caffe_pb2.NetParameter:
    """UpgradeV1Net: a new V2 net (``layer`` entries) from a V1 one; the rest is copied."""
    if len(net.layer):
        log.error("%s: the net has both V1 'layers' and V2 'layer' entries; the %d 'layer' "
                  "entries are ignored, as Caffe ignores them", source, len(net.layer))
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    del out.layer[:]
    for i, entry in enumerate(net.layers):
        _upgrade_v1_layer(entry, out.layer.add(), source, i)
    return out


# Every *_param of V1LayerParameter (and transform_param, loss_param): Caffe copies each.
_V1_PARAM_MESSAGES = [f.name for f in V1.DESCRIPTOR.fields if f.name.endswith("_param")]


def _upgrade_v1_layer(entry: caffe_pb2.V1LayerParameter, out: caffe_pb2.LayerParameter,
                      source, index: int) -> None:
    """UpgradeV1LayerParameter: one V1 layer -> one V2 LayerParameter."""
    out.bottom.extend(entry.bottom)
    out.top.extend(entry.top)
    if entry.HasField("name"):
        out.name = entry.name
    for rule in entry.include:
        out.include.add().CopyFrom(rule)
    for rule in entry.exclude:
        out.exclude.add().CopyFrom(rule)
    if entry.HasField("type"):
        if entry.type not in V1_LAYER_TYPES:
            raise PortingError(f"unknown V1 layer type {entry.type}", source,
                               f"layer {shown(entry.name)}" if entry.name else f"layers entry {index}")
        out.type = V1_LAYER_TYPES[entry.type]
    for blob in entry.blobs:
        out.blobs.add().CopyFrom(blob)

    def spec(i: int) -> caffe_pb2.ParamSpec:
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(entry.param):
        spec(i).name = name
    for i, mode in enumerate(entry.blob_share_mode):
        spec(i).share_mode = {V1.STRICT: caffe_pb2.ParamSpec.STRICT,
                              V1.PERMISSIVE: caffe_pb2.ParamSpec.PERMISSIVE}[mode]
    for i, lr in enumerate(entry.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(entry.weight_decay):
        spec(i).decay_mult = decay
    out.loss_weight.extend(entry.loss_weight)
    for name in _V1_PARAM_MESSAGES:
        if entry.HasField(name):
            getattr(out, name).CopyFrom(getattr(entry, name))
    if entry.HasField("layer"):
        log.error("%s: layers entry %d still holds a V0 layer; ignored", source, index)


# --------------------------------------------------------------------------- inputs
def upgrade_input(net: caffe_pb2.NetParameter, source: object = None) -> None:
    """UpgradeNetInput: ``input`` + ``input_shape`` (or 4 ``input_dim`` per input) -> an
    Input layer named "input" placed first; inputs without shapes are simply dropped
    (old caffemodels list them). In place."""
    n_inputs, n_shapes, n_dims = len(net.input), len(net.input_shape), len(net.input_dim)
    if n_shapes and n_shapes != n_inputs:
        raise PortingError(f"{n_inputs} input(s) but {n_shapes} input_shape(s); give one per input",
                           source, "net inputs")
    if not n_shapes and n_dims and n_dims != 4 * n_inputs:
        raise PortingError(f"{n_inputs} input(s) need {4 * n_inputs} input_dim values, found {n_dims}",
                           source, "net inputs")
    if n_shapes or n_dims:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if n_shapes:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i: 4 * i + 4])
        layers = [layer] + list(net.layer)
        del net.layer[:]
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")
