"""CaffeNet: the torch module that interprets a Graph layer by layer, pycaffe-style, and
``load_caffe``, which makes one from a prototxt and an optional caffemodel."""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from porting.budget import Budget
from porting.graph import Graph, build_graph
from porting.parse import read_caffemodel, read_prototxt
from porting.upgrade import upgrade_net


class CaffeNet(nn.Module):
    """A Caffe net as an ``nn.Module``.

    ``net(x)`` or ``net(data=x, ...)`` runs the layers in prototxt order and returns an
    OrderedDict of every blob by Caffe name (an in-place layer overwrites its blob, as in
    Caffe). ``end="fc8"`` stops after that layer (pycaffe's ``forward(end=)``). After a
    call, ``layer_outputs[name]`` holds each layer's own tops, so the value of a blob before
    an in-place layer overwrote it stays reachable. Inputs are NCHW float tensors in the
    net's own preprocessing (for CaffeNet: BGR, 0-255 minus the mean).

    Caffe accepts any layer name (empty, dotted, ``type``, ``forward``...), so the torch
    modules sit in a ``ModuleList`` by layer index (``named_parameters`` reads
    ``layers.<index>.<blob index>``) and never collide with ``nn.Module`` attributes;
    ``params``, ``layer_outputs`` and ``state_dict`` keys use the Caffe layer name. A name
    several layers share (Caffe allows it; a later one may not have weights, see
    porting.graph): ``end=`` stops at the first, as pycaffe's; ``layer_outputs`` keeps the last.
    """

    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        self.layers = nn.ModuleList(spec.module for spec in graph.layers)
        self.layer_outputs: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()

    @property
    def inputs(self) -> dict[str, tuple[int, ...]]:
        return dict(self.graph.inputs)

    @property
    def blobs_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.graph.blob_shapes)

    @property
    def params(self) -> OrderedDict[str, list[nn.Parameter]]:
        """Each weighted layer's blobs in Caffe order (pycaffe's ``net.params``)."""
        return OrderedDict((s.name, s.module.blobs) for s in self.graph.layers if s.module.param_shapes)


    def state_dict(self, *args, **kwargs):
        """Keys read ``<layer name>.<blob index>``, the name as Caffe has it (dots kept).

        Called by a parent module (with a prefix) the keys stay torch's own."""
        state = super().state_dict(*args, **kwargs)
        out = OrderedDict()
        for key, value in state.items():
            if key.startswith("layers."):  # "layers.<layer index>.<blob index>"
                _, index, blob = key.split(".", 2)
                key = f"{self.graph.layers[int(index)].name}.{blob}"
            out[key] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Takes ``state_dict()``'s keys; an unknown layer name stays as given (strict refuses it)."""
        index = {spec.name: i for i, spec in enumerate(self.graph.layers)}

        def torch_key(key: str) -> str:
            name, _, blob = key.rpartition(".")
            return f"layers.{index[name]}.{blob}" if name in index else key

        return super().load_state_dict(OrderedDict((torch_key(k), v) for k, v in state_dict.items()),
                                       strict=strict, assign=assign)

    def forward(self, *args: torch.Tensor, end: str | None = None,
                pin: Mapping[str, Sequence[torch.Tensor]] | None = None, **inputs: torch.Tensor):
        """Run the net; see the class docstring. ``pin`` maps layer names to top values.

        A pinned layer's tops take the given values while gradients still flow through
        the port's own computation (``value + (t - t.detach())``): the port's backward is
        then evaluated at another framework's forward point, so ReLU gates and max-pool
        switches follow that framework's decisions (a synchronised comparison).
        """
        names = list(self.graph.inputs)
        if args:
            if len(args) > len(names):
                raise TypeError(f"net takes {len(names)} input(s) ({', '.join(names)}), got {len(args)}")
            inputs = {**dict(zip(names, args)), **inputs}
        missing = [n for n in names if n not in inputs]
        if missing:
            raise TypeError(f"missing input blob(s): {', '.join(missing)}")
        if end is not None and end not in {s.name for s in self.graph.layers}:
            raise KeyError(f"no layer named {end!r}")
        blobs: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.layer_outputs = OrderedDict()
        for spec in self.graph.layers:
            if spec.is_input:
                tops = tuple(inputs[t] for t in spec.tops)
            else:
                tops = spec.module(*(blobs[b] for b in spec.bottoms))
            if pin and spec.name in pin:
                tops = tuple(torch.as_tensor(v, dtype=t.dtype) + (t - t.detach()) for v, t in zip(pin[spec.name], tops))
            self.layer_outputs[spec.name] = tops
            blobs.update(zip(spec.tops, tops))
            if spec.name == end:
                break
        return blobs

    def loss(self) -> torch.Tensor:
        """The loss of the last forward as Caffe's Net::Forward returns it: the sum over the
        layers that ran and their tops of loss_weight * sum(top values), each layer's own
        tops (``layer_outputs``; weights from ``porting.layers.loss.loss_weights``: 1 on a
        loss layer's first top unless ``loss_weight`` says otherwise, 0 elsewhere). Its
        backward seeds each such top with its weight, as Caffe's Net::Backward."""
        from porting.errors import PortingError
        from porting.layers.loss import loss_weights

        last = {spec.name: spec for spec in self.graph.layers}  # layer_outputs keeps the last of a name
        total = None
        for name, tops in self.layer_outputs.items():
            try:
                weights = loss_weights(last[name].module)
            except ValueError as err:
                raise PortingError(str(err), None, f"layer {name}") from None
            for weight, top in zip(weights, tops):
                if weight:
                    term = weight * top.sum()
                    total = term if total is None else total + term
        return torch.zeros(()) if total is None else total


def load_caffe(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None,
               phase: str = "test", budget: Budget | None = None,
               input_shapes: dict[str, Sequence[int]] | None = None,
               dropout_seed: int | None = None) -> CaffeNet:
    """Parse a prototxt (any Caffe 1.0 format) and optional caffemodel into a CaffeNet.

    ``budget`` (default ``Budget.default()``: PORTING_MEMORY_LIMIT / PORTING_WORK_LIMIT or
    the machine's available memory and 10^13 multiply-adds, at the prototxt's batch) is
    checked from the shapes before any parameter is created; a net beyond it is a
    PortingError naming the layer that needs the most. E.g.
    ``load_caffe(p, m, budget=Budget.default(batch=64, backward=True))``.

    ``input_shapes`` (top name -> shape) gives the shape of an input blob the prototxt
    cannot give, e.g. a Data layer's top (C, H, W are its LMDB's, which is never opened:
    ``{"data": (64, 3, 227, 227)}``), or overrides one; see porting.layers.data_layers.
    A data layer's tops are inputs, fed as ``net(data=x, label=y)`` with the blob Caffe's
    layer would output (transformed: cropped, mean-subtracted, scaled).

    ``dropout_seed``: TRAIN-phase Dropout layers draw Caffe's own masks, every forward
    starting Caffe's generator at this seed as ``caffe.set_random_seed(seed)`` before
    Caffe's forward does (porting.layers.neuron.seed_dropout); without it they are refused.
    """
    net = upgrade_net(read_prototxt(prototxt), source=prototxt)
    weights = read_caffemodel(caffemodel) if caffemodel is not None else None
    shapes = {str(k): tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    model = CaffeNet(build_graph(net, phase, weights, source=prototxt, budget=budget, input_shapes=shapes))
    if dropout_seed is not None:
        from porting.layers.neuron import seed_dropout

        seed_dropout(model, dropout_seed)
    return model
