"""Someone else's model loaded and run with every intermediate value recorded.

``load_module``: ``FILE.py:FACTORY`` or ``package.module:FACTORY`` (a callable returning
an ``nn.Module`` with its weights loaded), an ExportedProgram ``FILE.pt2``
(``torch.export.save``: its graph nodes are recorded in place of submodules), or a
TorchScript archive ``FILE.ts`` (``load_script``; ``_run_script`` makes its frozen graph
return every value); ``load_onnx``: an ONNX model run by ONNX Runtime (``_run_onnx``: every
value a graph output; forward only). Loading a factory or .pt2 runs that Python code and a
TorchScript archive its TorchScript: it is the user's own port, named on their command
line; an ONNX file holds no code and is checked before it runs. ``run_hooked`` runs a
module with a forward hook on every submodule; each run returns ``Output``s in the order
they complete.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from porting.errors import PortingError, shown

SCRIPT_SUFFIXES = (".ts", ".pt", ".pth", ".torchscript")  # --torch FILE: a TorchScript archive
ONNX_LIMIT = (1 << 31) - 1  # bytes of an .onnx file: protobuf's own limit (no external data is read)


# --------------------------------------------------------------------------------------
# Loading the user's module
# --------------------------------------------------------------------------------------

def load_module(spec: str):
    """``FILE.py:FACTORY`` or ``package.module:FACTORY`` -> ``FACTORY()``, an nn.Module in eval
    mode; ``FILE.pt2`` (``torch.export.save``) -> its program's module (a GraphModule, in
    the mode it was exported in); a TorchScript archive ``FILE.ts`` / ``.pt`` / ``.pth`` /
    ``.torchscript`` (``torch.jit.save``) -> ``load_script``; ``FILE.onnx`` -> ``load_onnx``.

    Runs the user's code (their own port, named by them). Anything that goes wrong while
    importing or calling it is a PortingError naming ``spec``.
    """
    if str(spec).lower().endswith(SCRIPT_SUFFIXES):
        return load_script(spec)
    if str(spec).lower().endswith(".onnx"):
        return load_onnx(spec)
    if str(spec).endswith(".pt2"):
        path = Path(spec)
        if not path.is_file():
            raise PortingError("no such file", path)
        try:
            return torch.export.load(path).module()
        except Exception as err:  # the user's own file, of torch's format
            raise PortingError(f"cannot load the exported program: {type(err).__name__}: {shown(err, 200)}",
                               path) from None
    source, _, name = str(spec).rpartition(":")
    if not source or not name.isidentifier():
        raise PortingError("expected FILE.py:FACTORY or package.module:FACTORY", place=f"--torch {shown(spec)}")
    place = f"--torch {shown(spec)}"
    try:
        if source.endswith(".py"):
            path = Path(source)
            if not path.is_file():
                raise PortingError("no such file", path)
            unique = f"_porting_foreign_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            code = importlib.util.module_from_spec(module_spec)
            folder = str(path.resolve().parent)
            sys.path.insert(0, folder)  # the port's sibling files
            try:
                module_spec.loader.exec_module(code)
            finally:
                if folder in sys.path:
                    sys.path.remove(folder)
        else:
            code = importlib.import_module(source)
        factory = getattr(code, name, None)
        if not callable(factory):
            raise PortingError(f"{shown(source)} has no callable {shown(name)}", place=place)
        module = factory()
    except PortingError:
        raise
    except Exception as err:  # the user's code: any failure is theirs, reported in one line
        raise PortingError(f"loading the module failed: {type(err).__name__}: {shown(err, 200)}",
                           place=place) from None
    if not isinstance(module, torch.nn.Module):
        raise PortingError(f"{shown(name)}() returned {type(module).__name__}, not a torch.nn.Module", place=place)
    return module.eval()


# --------------------------------------------------------------------------------------
# TorchScript archives and ONNX models
# --------------------------------------------------------------------------------------

def load_script(spec) -> torch.jit.ScriptModule:
    """A TorchScript archive (``torch.jit.save``) -> its module, in eval mode.

    What loading runs: ``torch.jit.load`` reads a zip of TorchScript source (``code/``,
    compiled by TorchScript's own compiler, not Python), constants and tensors; its data
    pickles are read by TorchScript's restricted unpickler, which builds tensors, plain
    containers and the archive's own TorchScript classes and refuses any other global (no
    Python object is unpickled). Running the module runs that TorchScript code: any
    registered torch operator, but no Python. A file without ``code/`` (e.g. a
    ``torch.save`` pickle of a module or a state dict) is refused before torch reads it.
    """
    path = Path(spec)
    if not path.is_file():
        raise PortingError("no such file", path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise PortingError(f"not a TorchScript archive ({shown(err, 120)})", path) from None
    if not any(n.split("/")[1:2] == ["code"] for n in names):
        raise PortingError("not a TorchScript archive (torch.jit.save): no code/ in the zip; a torch.save file "
                           "(a Python pickle) is never loaded", path)
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # torch's reader on the user's file
        raise PortingError(f"cannot load the TorchScript archive: {type(err).__name__}: {shown(err, 200)}",
                           path) from None
    return module.eval()


def _blocks_nodes(block):
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from _blocks_nodes(inner)


def _writes_tensor(node) -> bool:
    """Whether ``node``'s schema lets it write one of its tensor arguments in place."""
    schema = node.schema()
    if "!" not in schema:
        return False
    try:
        arguments = torch._C.parse_schema(schema).arguments
    except RuntimeError:
        return True
    return any(a.alias_info is not None and a.alias_info.is_write and v.type().kind() == "TensorType"
               for a, v in zip(arguments, node.inputs()))


def _script_where(node) -> tuple[str, str]:
    """(module path, module class) of an inlined node, from its module hierarchy
    ("features(Sequential).conv1(Conv2d).SELF(Conv2d)" -> ("features.conv1", "Conv2d"))."""
    path, kind = [], ""
    for name, cls in re.findall(r"([^.()]+)\(([^()]*)\)", node.getModuleHierarchy()):
        if name in ("SELF", "UNKNOWN_INSTANCE"):
            break
        path.append(name)
        kind = cls.rsplit(".", 1)[-1]
    return ".".join(path), kind


def _run_script(module: torch.jit.ScriptModule, x: torch.Tensor) -> list[Output]:
    """run_hooked for a TorchScript module: every tensor its forward computes at the top
    level, in graph order.

    The module is frozen (``torch._C._freeze_module``: attributes and weights become
    constants, methods inlined; none of ``torch.jit.freeze``'s numerics-changing passes),
    constants propagated (an unused in-place branch falls away) and in-place ops rewritten
    as pure ones (``_jit_pass_remove_mutation``); the graph then returns every top-level
    tensor value along with its result and runs once in TorchScript's plain interpreter
    (``optimized_execution(False)``, so autograd sees every value). A value is named
    ``<module path>/<op>`` ("features.conv1/conv2d"; a repeat of an op in one module gets
    "_1", ...; ops of the top module's own code have no path); the last value of each
    submodule carries its class for the type hints. Values inside if/loop bodies are not
    recorded (the if's result is). Refused: a forward taking other than one tensor, and a
    graph that still writes a tensor in place (aliasing torch cannot rewrite away: a
    recorded value could change after it was recorded).
    """
    try:
        frozen = torch._C._freeze_module(module._c, [])
        graph = frozen._get_method("forward").graph.copy()
        torch._C._jit_pass_inline(graph)
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_remove_mutation(graph)
    except Exception as err:
        raise PortingError(f"cannot freeze the TorchScript module: {type(err).__name__}: {shown(err, 200)}",
                           place="--torch") from None
    arguments = list(graph.inputs())[1:]
    if len(arguments) != 1 or arguments[0].type().kind() != "TensorType":
        raise PortingError(f"the TorchScript forward takes {len(arguments)} argument(s) "
                           f"({', '.join(str(a.type()) for a in arguments)}); verify feeds it one tensor",
                           place="--torch")
    writer = next((n for n in _blocks_nodes(graph) if _writes_tensor(n)), None)
    if writer is not None:
        raise PortingError(f"the TorchScript graph writes a tensor in place ({writer.kind()}) where torch cannot "
                           "rewrite it as a pure op, so a recorded value could change after it is recorded; "
                           "not supported", place="--torch")
    values, names, kinds, seen = [], [], [], {}
    for node in graph.nodes():
        if node.kind() == "prim::Constant":
            continue
        path, kind = _script_where(node)
        for out in node.outputs():
            if out.type().kind() != "TensorType":
                continue
            op = node.kind().split("::")[-1]
            base = f"{path}/{op}" if path else op
            seen[base] = seen.get(base, -1) + 1
            values.append(out)
            names.append(base + (f"_{seen[base]}" if seen[base] else ""))
            kinds.append((path, kind))
    last = {path: i for i, (path, _) in enumerate(kinds) if path}
    result = graph.outputs().__next__()
    graph.eraseOutput(0)
    pack = graph.create("prim::TupleConstruct", [result] + values, 1)
    graph.appendNode(pack)
    pack.output().setType(torch._C.TupleType([result.type()] + [v.type() for v in values]))
    graph.registerOutput(pack.output())
    try:
        function = torch._C._create_function_from_graph("recorded_forward", graph)
        with torch.jit.optimized_execution(False):
            got = function(frozen, x)
    except Exception as err:
        raise PortingError(f"the TorchScript module failed: {type(err).__name__}: {shown(err, 200)}",
                           place="--torch") from None
    return [Output(names[i], 0, 0, kinds[i][1] if last.get(kinds[i][0]) == i else "", tensor)
            for i, tensor in enumerate(got[1:])]


ONNX_FLOATS = {1: torch.float32, 11: torch.float64, 10: torch.float16}  # TensorProto elem_type -> dtype


@dataclass
class OnnxModel:
    """A checked ONNX model (``load_onnx``): the file, its parsed ``model`` and its one input."""

    path: Path
    model: object = field(repr=False)
    input_name: str = ""
    dtype: torch.dtype = torch.float32


def load_onnx(spec) -> OnnxModel:
    """An ONNX file, checked before anything runs or is allocated: at most ONNX_LIMIT bytes,
    parsed without external data (a tensor stored outside the file is refused: its path
    could name any file), ``onnx.checker`` (structure, opsets, each initializer's data as
    large as its declared shape) and exactly one graph input besides the initializers, of
    a float type. ONNX holds no code: running it runs ONNX Runtime's own operators."""
    try:
        import onnx
        import onnxruntime  # noqa: F401 (needed to run it: said now, before Caffe runs)
    except ImportError as err:
        raise PortingError(f"--onnx needs the onnx and onnxruntime packages (pip install onnx onnxruntime, or "
                           f"the caffe-port-harness[onnx] extra): {shown(err, 120)}", place="--onnx") from None

    path = Path(spec)
    if not path.is_file():
        raise PortingError("no such file", path)
    size = path.stat().st_size
    if size > ONNX_LIMIT:
        raise PortingError(f"{size} bytes; an ONNX file is at most {ONNX_LIMIT} (no external data)", path)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and the like
        raise PortingError(f"not an ONNX model ({type(err).__name__}: {shown(err, 120)})", path) from None
    external = next((t.name for t in _onnx_tensors(model.graph)
                     if t.data_location == onnx.TensorProto.EXTERNAL), None)
    if external is not None:
        raise PortingError(f"tensor {shown(external)} is stored outside the file (external data): not read", path)
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise PortingError(f"invalid ONNX model: {shown(err, 200)}", path) from None
    given = {t.name for t in model.graph.initializer}
    feeds = [i for i in model.graph.input if i.name not in given]
    if len(feeds) != 1:
        raise PortingError(f"verify feeds one input; the ONNX graph takes {len(feeds)} "
                           f"({', '.join(shown(i.name) for i in feeds)})", path)
    elem = feeds[0].type.tensor_type.elem_type
    if elem not in ONNX_FLOATS:
        raise PortingError(f"the ONNX input {shown(feeds[0].name)} has element type "
                           f"{onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else elem}"
                           "; verify feeds float", path)
    return OnnxModel(path, model, feeds[0].name, ONNX_FLOATS[elem])


def _onnx_tensors(graph):
    """Every TensorProto of ``graph`` and its subgraphs: initializers and node attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _onnx_tensors(sub)


def _static(value_info) -> list | None:
    """The static shape of a ValueInfoProto, None when any dimension is unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    return None if None in shape else shape


def _fold_shapes(m, path, small: int = 1 << 16) -> dict:
    """Shape inference with the shape arithmetic folded, in place on ``m``; returns value
    name -> ValueInfoProto. Exporters compute pads and reshapes from ``Shape`` at run time
    (torch's LRN does); with the input's shape fixed, those are constants: a ``Shape`` of
    a static shape, a node of integer or boolean outputs of at most ``small`` elements all
    of whose inputs are constants (evaluated by onnx's reference evaluator) and an ``If``
    of a constant condition (replaced by its branch) become initializers or plain nodes,
    until nothing more folds. Float arithmetic is never folded: ONNX Runtime computes it.
    Control flow left after folding (If, Loop, Scan) is refused by the caller: the values
    of a subgraph are not size-checked."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph_kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    for _ in range(len(m.graph.node) + 1):
        try:
            inferred = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
        except Exception as err:
            raise PortingError(f"ONNX shape inference failed: {shown(err, 200)}", path) from None
        info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)
                + list(inferred.graph.input)}
        constants = {t.name for t in m.graph.initializer}
        kept, folded = [], False
        for node in m.graph.node:
            inputs = [i for i in node.input if i]
            shapes = [_static(info[o]) if o in info else None for o in node.output]
            exact = all(s is not None and math.prod(s) <= small for s in shapes) and all(
                info[o].type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32,
                                                       onnx.TensorProto.BOOL) for o in node.output)
            values = None
            try:
                if node.op_type == "Shape" and inputs[0] in info and _static(info[inputs[0]]) is not None:
                    given = {a.name: a.i for a in node.attribute}  # start, end: Python's slice rules
                    values = [np.asarray(_static(info[inputs[0]]), np.int64)[given.get("start", 0):given.get("end")]]
                elif node.op_type == "If" and inputs and inputs[0] in constants:
                    cond = next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == inputs[0])
                    branch = next(onnx.helper.get_attribute_value(a) for a in node.attribute
                                  if a.name == ("then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"))
                    kept.extend(branch.node)
                    m.graph.initializer.extend(branch.initializer)
                    kept.extend(onnx.helper.make_node("Identity", [b.name], [o], name=f"{node.name or o}/{k}")
                                for k, (b, o) in enumerate(zip(branch.output, node.output)))
                    folded = True
                    continue
                elif exact and all(i in constants for i in inputs) and not any(a.type in graph_kinds
                                                                                  for a in node.attribute):
                    arrays = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in inputs}
                    values = ReferenceEvaluator(node).run(None, arrays)
            except Exception as err:
                raise PortingError(f"cannot fold node {shown(node.name or node.output[0])} ({node.op_type}): "
                                   f"{type(err).__name__}: {shown(err, 120)}", path) from None
            if values is None:
                kept.append(node)
                continue
            m.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), o) for o, v in zip(node.output, values))
            folded = True
        del m.graph.node[:]
        m.graph.node.extend(kept)
        if not folded:
            return info
    return info


def _run_onnx(model: OnnxModel, x: torch.Tensor) -> list[Output]:
    """run_hooked for an ONNX model: every float tensor a top-level node computes (Constant
    nodes left out), in graph order, named by its node (``name``, else its first output's
    value name) and output index, its op type (Conv, MaxPool, ...) as the type hint.

    The input's shape is fixed to ``x``'s and shapes inferred (onnx, strict, with data
    propagation); every top-level value must then have a static shape and all of them
    together fit the memory budget (porting.budget) before ONNX Runtime runs anything.
    Control flow that does not fold away (an If on a condition of the input's values, a
    Loop, a Scan) is refused: its subgraph's sizes are not known before it runs.
    Every recorded value becomes a graph output; ONNX Runtime (CPU, graph optimizations
    off: each node as written) runs the graph once. No gradients: ONNX Runtime computes none.
    """
    import onnx
    import onnxruntime

    from porting.budget import Budget, format_bytes

    m = onnx.ModelProto()
    m.CopyFrom(model.model)
    feed = next(i for i in m.graph.input if i.name == model.input_name)
    dims = feed.type.tensor_type.shape.dim
    if len(dims) and len(dims) != x.dim() or any(d.HasField("dim_value") and d.dim_value != n
                                                 for d, n in zip(dims, x.shape)):
        raise PortingError(f"the ONNX input {shown(model.input_name)} has shape "
                           f"{'x'.join(str(d.dim_value) if d.HasField('dim_value') else '?' for d in dims)}, the net's "
                           f"is {'x'.join(map(str, x.shape))}", model.path)
    del dims[:]
    for n in x.shape:
        dims.add().dim_value = int(n)
    info = _fold_shapes(m, model.path)
    outputs_now = {o.name for o in m.graph.output}
    recorded, total, used = [], 0, set()
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if not name:
                continue
            tensor_type = info[name].type.tensor_type if name in info else None
            shape = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim] \
                if tensor_type is not None and tensor_type.HasField("shape") else None
            if shape is None or None in shape:
                raise PortingError(f"value {shown(name)} ({node.op_type}) has no static shape after shape inference; "
                                   "verify runs only graphs whose sizes are known before they run", model.path)
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
            except Exception:  # undefined, string or a type numpy lacks: counted at 8 bytes
                itemsize = 8
            total += math.prod(shape) * itemsize
            if node.op_type != "Constant" and tensor_type.elem_type in ONNX_FLOATS:
                label = node.name if node.name and node.name not in used else name
                used.add(label)
                recorded.append((name, label, i, node.op_type))
                if name not in outputs_now:
                    m.graph.output.append(info[name])
    control = next((n for n in m.graph.node if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                   for a in n.attribute)), None)
    if control is not None:
        raise PortingError(f"node {shown(control.name or control.output[0])} ({control.op_type}) runs a subgraph on a "
                           "condition or count that depends on the input: its sizes cannot be checked before it "
                           "runs; not supported", model.path)
    limit = Budget.default().memory
    if limit is not None and total > limit:
        raise PortingError(f"its values take {format_bytes(total)}, above the limit of {format_bytes(limit)} "
                           "(set --memory-limit or PORTING_MEMORY_LIMIT)", model.path)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = onnxruntime.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run([r[0] for r in recorded], {model.input_name: x.detach().to(model.dtype).numpy()})
    except Exception as err:  # ONNX Runtime on the user's model
        raise PortingError(f"ONNX Runtime failed: {type(err).__name__}: {shown(err, 200)}", model.path) from None
    return [Output(label, 0, i, op, torch.from_numpy(np.asarray(arr)))
            for (_, label, i, op), arr in zip(recorded, got)]


# --------------------------------------------------------------------------------------
# Running it with hooks
# --------------------------------------------------------------------------------------

@dataclass
class Output:
    """One tensor a submodule returned: module ``path`` ("" for the whole module), its
    ``call``-th call (0 first), element ``index`` of its output (0 for a lone tensor)."""

    path: str
    call: int
    index: int
    module_type: str
    tensor: torch.Tensor = field(repr=False)

    @property
    def name(self) -> str:
        return (self.path or "<module>") + (f"#{self.call}" if self.call else "") + f"[{self.index}]"

    def spec(self) -> dict:
        """The --map entry that names this output."""
        out = {"module": self.path, "output": self.index}
        if self.call:
            out["call"] = self.call
        return out


def run_hooked(module: torch.nn.Module, x: torch.Tensor) -> list[Output]:
    """Run ``module(x)`` recording every submodule's tensor outputs in the order they
    complete (the whole module's last). Each recorded tensor is handed on as a copy, so an
    in-place layer after it (ReLU(inplace=True)) leaves the recorded value as it was."""
    outputs: list[Output] = []
    calls: dict[str, int] = {}

    def hook(path, sub, _inputs, result):
        call = calls.get(path, 0)
        calls[path] = call + 1
        if isinstance(result, torch.Tensor):
            outputs.append(Output(path, call, 0, type(sub).__name__, result))
            return result.clone()
        if type(result) in (tuple, list):
            copies = []
            for i, item in enumerate(result):
                if isinstance(item, torch.Tensor):
                    outputs.append(Output(path, call, i, type(sub).__name__, item))
                    item = item.clone()
                copies.append(item)
            return type(result)(copies)
        return None

    if isinstance(module, torch.fx.GraphModule):
        return _run_graph(module, x)
    if isinstance(module, torch.jit.ScriptModule):
        return _run_script(module, x)
    if isinstance(module, OnnxModel):
        return _run_onnx(module, x)
    handles = [m.register_forward_hook(lambda m, i, o, p=path: hook(p, m, i, o))
               for path, m in module.named_modules()]
    try:
        module(x)
    except Exception as err:  # the user's module: its failure is a failed verification input
        raise PortingError(f"the module's forward failed: {type(err).__name__}: {shown(err, 200)}",
                           place="--torch") from None
    finally:
        for h in handles:
            h.remove()
    return outputs


def _run_graph(graph_module: torch.fx.GraphModule, x: torch.Tensor) -> list[Output]:
    """run_hooked for a graph (an exported program's module): every call_function node's
    tensor output, the node's name as its path. The last node a source module produced
    (``nn_module_stack``) carries that module's class name, for auto_map's type hints."""
    last_of: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if stack:
            where, kind = list(stack.values())[-1]
            last_of[where] = (node.name, str(getattr(kind, "__name__", kind)).rsplit(".", 1)[-1])
    kinds = dict(last_of.values())
    outputs: list[Output] = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.op != "call_function":
                return result
            items = [result] if isinstance(result, torch.Tensor) else list(result) if type(result) in (
                tuple, list) else []
            copies = []
            for i, item in enumerate(items):
                if isinstance(item, torch.Tensor):
                    outputs.append(Output(node.name, 0, i, kinds.get(node.name, ""), item))
                    item = item.clone()  # an in-place node after it (relu_) leaves the record alone
                copies.append(item)
            return copies[0] if isinstance(result, torch.Tensor) else type(result)(copies) if items else result

    try:
        Recorder(graph_module).run(x)
    except Exception as err:
        raise PortingError(f"the exported program failed: {type(err).__name__}: {shown(err, 200)}",
                           place="--torch") from None
    return outputs
