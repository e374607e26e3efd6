"""ONNX encoders (a BERT exported with `torch.onnx.export`, ...) as embedding models.

The graph is imported with TVM's ONNX frontend (`tvm.relax.frontend.onnx.from_onnx`) and
wrapped in the `embed(input_ids, attention_mask)` entry every embedding model exports (see
entry.py): the wrapper casts the ids to the graph's input dtypes, feeds token_type_ids 0 and
position_ids 0 .. s-1 where the graph takes them, and pools the graph's token states
([batch, seq, dim]) as sentence-transformers would.

Float initializers become the artifact's weights, named as in the file (a MatMul's weight
transposed to a linear layer's [out, in]); integer and scalar initializers (shapes, axes,
divisors) become constants of the graph, since TVM's importer reads some at import time.
Constant-only subgraphs are folded first with onnx's reference evaluator: exporters leave shape
arithmetic on constants that TVM's importer cannot convert. Shapes the importer computes from
tensors of input dimensions are resolved back to those dimensions (`_resolve_data_shapes`).

Next to the .onnx file (or in its parent folder, sentence-transformers' `onnx/model.onnx`
layout): `tokenizer.json` (required), sentence-transformers' `modules.json` /
`1_Pooling/config.json` / `sentence_bert_config.json` for pooling (else mean pooling, no
normalisation, as sentence-transformers does for a bare encoder) and `config.json` for the
context window (`max_position_embeddings`; else the position table's rows).
"""

import contextlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend import nn

from relaxlm.errors import RelaxlmError
from relaxlm.tvm_api import tirx

from .checkpoint import TOKENIZER_FILES, Checkpoint
from .entry import ExportedModel
from .pooling import Pooling, pool, read_json, read_pooling

log = logging.getLogger(__name__)

ARCHITECTURE = "ONNXEncoder"
DEFAULT_CONTEXT_WINDOW = 512
# Graph inputs relaxlm can feed; any other input makes the graph something else.
INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# Graph outputs holding token states, preferred in this order to any other [b, s, d] output.
TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
# Float constants this large (Constant nodes, folded subgraphs) are weights the exporter
# inlined: stored in the artifact, like the initializers, rather than in the library.
MIN_CONSTANT_WEIGHT = 1024


@dataclass
class OnnxCheckpoint(Checkpoint):
    """An .onnx file and the folder holding its tokenizer (and pooling, config) files."""

    onnx_model: Any = field(default=None, repr=False)  # onnx.ModelProto, constants folded
    folder: Path | None = None  # tokenizer.json, modules.json, config.json
    pooling: Pooling | None = None

    @property
    def architecture(self) -> str:
        return ARCHITECTURE

    @property
    def weight_files(self) -> list[Path]:
        return [self.path]

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.folder / n for n in TOKENIZER_FILES if (self.folder / n).is_file()]

    def read(self, name: str) -> np.ndarray:
        return self.tensors[name]


def load_onnx(path: Path) -> OnnxCheckpoint:
    """Read an .onnx file (and its external data), its tokenizer folder and pooling."""
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as e:
        raise RelaxlmError(
            f"{path}: reading ONNX files needs the onnx package (pip install onnx)"
        ) from e

    try:
        model = onnx.load(str(path))
    except (DecodeError, OSError, ValueError) as e:
        raise RelaxlmError(f"{path}: not a readable ONNX model ({e})") from e
    folder = _support_folder(path)
    config = read_json(folder / "config.json")  # facts like the context window, if there
    pooling = read_pooling(folder, "mean")
    if pooling is None:
        log.warning(
            "%s has no sentence-transformers modules.json; using mean pooling without "
            "normalisation (put modules.json and 1_Pooling/config.json there to choose)",
            folder,
        )
        pooling = Pooling(modes=("mean",), normalize=False)
    graph, weights = _prepare(model, path)
    return OnnxCheckpoint(
        path=path, config=config, tensors=weights, onnx_model=graph, folder=folder, pooling=pooling
    )


def _support_folder(path: Path) -> Path:
    """The .onnx file's folder, or its parent (sentence-transformers keeps onnx/model.onnx)."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "tokenizer.json").is_file():
            return folder
    raise RelaxlmError(
        f"{path}: no tokenizer.json next to the ONNX file (or in {path.parent.parent}); "
        "save the model's tokenizer there (tokenizer.save_pretrained(folder))"
    )


def _prepare(model, path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """The graph with constants folded, and its weights: the float initializers by name."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    for node in graph.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise RelaxlmError(
                f"{path}: node {node.name!r} ({node.op_type}) has a subgraph; control flow "
                "(If, Loop, Scan) is not supported in ONNX encoders"
            )
    consts: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        (weights if _is_weight(array, 2) else consts)[init.name] = array
    init_names = {init.name for init in graph.initializer}
    opsets = list(model.opset_import)
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None and _is_weight(value, MIN_CONSTANT_WEIGHT):
                weights[node.output[0]] = value
                continue
            if value is not None:
                consts[node.output[0]] = value
                continue
        elif _foldable(node, consts):
            try:
                values = _evaluate(node, consts, opsets)
            except Exception as e:  # any failure: the importer then reports the node itself
                log.debug("not folding %s (%s): %s", node.name, node.op_type, e)
            else:
                for name, value in zip(node.output, values, strict=True):
                    (weights if _is_weight(value, MIN_CONSTANT_WEIGHT) else consts)[name] = value
                continue
        nodes.append(node)
    nodes = _linear_layout(nodes, weights)
    # Constants still read by a kept node (or a graph output) become Constant nodes up front.
    used = {i for node in nodes for i in node.input} | {o.name for o in graph.output}
    const_nodes = [
        onnx.helper.make_node(
            "Constant", [], [name], value=numpy_helper.from_array(np.asarray(v), name)
        )
        for name, v in consts.items()
        if name in used
    ]
    weights = {name: w for name, w in weights.items() if name in used}
    new_graph = onnx.helper.make_graph(
        const_nodes + nodes,
        graph.name,
        [i for i in graph.input if i.name not in init_names],
        list(graph.output),
        initializer=[numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    prepared = onnx.helper.make_model(new_graph, opset_imports=opsets)
    prepared.ir_version = model.ir_version
    return prepared, weights


def _linear_layout(nodes: list, weights: dict[str, np.ndarray]) -> list:
    """`nodes` with each weight read only as a MatMul's right operand ([in, out]) stored
    transposed, [out, in], and read through a Transpose: the layout of a linear layer,
    `matmul(x, permute_dims(w))`, which the compiler's schedules and quantization recognise
    (and in which torch exporters' folded `onnx::MatMul_*` weights were to begin with)."""
    from onnx import helper

    uses: dict[str, set[tuple[str, int]]] = {}
    for node in nodes:
        for k, name in enumerate(node.input):
            if name in weights:
                uses.setdefault(name, set()).add((node.op_type, k))
    linear = sorted(n for n, u in uses.items() if weights[n].ndim == 2 and u == {("MatMul", 1)})
    transposes = []
    for name in linear:
        weights[name] = np.ascontiguousarray(weights[name].T)
        transposes.append(helper.make_node("Transpose", [name], [f"{name}^T"], perm=[1, 0]))
    for node in nodes:
        if node.op_type == "MatMul" and node.input[1] in linear:
            node.input[1] = f"{node.input[1]}^T"
    return transposes + nodes


def _is_weight(array: np.ndarray, min_size: int) -> bool:
    """Float tensors are weights; scalars stay constants (the importer reads some, such as a
    Pow exponent, at import time), as do integer tensors (shapes, axes, indices)."""
    return array.dtype.kind == "f" and array.size >= min_size


def _constant_value(node) -> np.ndarray | None:
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            return numpy_helper.to_array(value)
        if attr.name in ("value_float", "value_int"):
            return np.array(value, dtype=np.float32 if attr.name == "value_float" else np.int64)
        if attr.name in ("value_floats", "value_ints"):
            return np.array(value, dtype=np.float32 if attr.name == "value_floats" else np.int64)
    return None  # sparse or string constants: left to the importer


_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"}


def _foldable(node, consts: dict[str, np.ndarray]) -> bool:
    return node.op_type not in _NONDETERMINISTIC and all(i in consts for i in node.input if i)


def _evaluate(node, consts: dict[str, np.ndarray], opsets) -> list[np.ndarray]:
    """Run one node on constant inputs with onnx's reference evaluator."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    inputs = [i for i in node.input if i]
    infos = [
        helper.make_tensor_value_info(
            i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape
        )
        for i in inputs
    ]
    outs = [helper.make_empty_tensor_value_info(o) for o in node.output]
    model = helper.make_model(helper.make_graph([node], "fold", infos, outs), opset_imports=opsets)
    return [
        np.asarray(v) for v in ReferenceEvaluator(model).run(None, {i: consts[i] for i in inputs})
    ]


def export_onnx(checkpoint: OnnxCheckpoint, dtype: str):
    """The `embed` entry over the imported graph, as an ExportedModel."""

    if dtype != "float32":
        raise RelaxlmError(
            f"{checkpoint.path}: ONNX graphs compile in float32 only (asked for {dtype}); "
            "drop --dtype or export the graph in the dtype you want"
        )
    inputs, output = _check_encoder(checkpoint)
    names = list(checkpoint.tensors)
    mod = _wrap(_import(checkpoint), inputs, output, names, checkpoint)
    shapes = {n: tuple(int(d) for d in checkpoint.tensors[n].shape) for n in names}
    window = checkpoint.config.get("max_position_embeddings") or _position_rows(checkpoint)
    if window is None:
        window = checkpoint.pooling.max_seq_length or DEFAULT_CONTEXT_WINDOW
        log.warning(
            "%s: no config.json max_position_embeddings and no position table found; "
            "context window %d",
            checkpoint.path,
            window,
        )
    window = int(window)
    return ExportedModel(
        mod=mod,
        param_names=names,
        param_shapes=shapes,
        dtype=dtype,
        architecture=ARCHITECTURE,
        config=checkpoint.config,
        context_window=min(window, checkpoint.pooling.max_seq_length or window),
        vocab_size=_vocab_size(checkpoint),
        task="embed",
        embedding=checkpoint.pooling.to_manifest(),
    )


def _check_encoder(checkpoint: OnnxCheckpoint) -> tuple[list[tuple[str, str]], int]:
    """The graph's inputs as (name, dtype), and the index of its token-states output."""
    graph, path = checkpoint.onnx_model.graph, checkpoint.path
    inputs = [(i.name, _elem_dtype(i)) for i in graph.input]
    names = [n for n, _ in inputs]
    if any("past" in n or "cache" in n for n in names):
        raise RelaxlmError(
            f"{path}: inputs {names} carry a KV cache: this is a decoder export; relaxlm "
            "compiles ONNX encoders (embedding models) only"
        )
    unknown = [n for n in names if n not in INPUTS]
    if "input_ids" not in names or unknown:
        raise RelaxlmError(
            f"{path}: graph inputs {names} are not those of a text encoder; relaxlm feeds "
            f"{', '.join(INPUTS)} (input_ids required)"
        )
    ids = graph.input[names.index("input_ids")]
    dims = [d.dim_param or d.dim_value for d in ids.type.tensor_type.shape.dim]
    if len(dims) != 2 or not all(isinstance(d, str) and d for d in dims):
        raise RelaxlmError(
            f"{path}: input_ids has shape {dims}; export with dynamic batch and sequence axes "
            "(torch.onnx.export(..., dynamic_axes={'input_ids': {0: 'batch', 1: 'seq'}, ...}))"
        )
    outputs = [(o.name, len(o.type.tensor_type.shape.dim)) for o in graph.output]
    by_name = dict(outputs)
    if "logits" in by_name:
        raise RelaxlmError(
            f"{path}: the graph outputs logits (a language-model head); relaxlm compiles ONNX "
            "encoders whose output is the token states (last_hidden_state)"
        )
    for name in (*TOKEN_OUTPUTS, *by_name):
        if by_name.get(name) == 3:
            return inputs, list(by_name).index(name)
    shown = ", ".join(f"{n} (rank {r})" for n, r in outputs)
    raise RelaxlmError(
        f"{path}: no token-states output [batch, seq, dim] among the graph's outputs ({shown}); "
        "relaxlm compiles ONNX encoders and pools their last_hidden_state itself"
    )


def _elem_dtype(value_info) -> str:
    from onnx import helper

    return str(helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))


def _import(checkpoint: OnnxCheckpoint) -> tvm.IRModule:
    """TVM's import of the prepared graph: main(inputs..., weights...), weights as inputs."""
    from tvm.relax.frontend.onnx import from_onnx

    printed = io.StringIO()  # the importer prints the failing operator, then raises
    try:
        with contextlib.redirect_stdout(printed), _symbolic_range():
            return from_onnx(
                checkpoint.onnx_model, keep_params_in_input=True, sanitize_input_names=False
            )
    except tvm.error.OpNotImplemented as e:  # the message lists every unsupported op
        ops = str(e).strip().splitlines()[-1].rpartition(": ")[2]
        raise RelaxlmError(
            f"{checkpoint.path}: ONNX operator(s) {ops} not supported by TVM's ONNX importer"
        ) from e
    except Exception as e:  # any importer failure is one clear error
        found = re.search(r"Error converting operator (\w+)", printed.getvalue())
        op = f" at operator {found[1]}" if found else ""
        raise RelaxlmError(
            f"{checkpoint.path}: TVM's ONNX importer could not convert the graph{op}: "
            f"{str(e).strip().splitlines()[-1]}"
        ) from e


@contextlib.contextmanager
def _symbolic_range():
    """Within this block, TVM's ONNX importer converts Range(start, limit, step) with constant
    start and step and a symbolic limit (a dimension, Shape(x)[k]) to `arange` over it.

    Its own Range converter reads the length of any non-constant range from tensor data at run
    time; the ops after it (torch's dynamo exporter builds attention masks from such ranges)
    then have no static shape and the import fails. The converter table is a module function
    the importer calls per node, so it is swapped for this block only.
    """
    from tvm.relax.frontend.onnx import onnx_frontend

    stock = onnx_frontend._get_convert_map
    stock_range = stock()["Range"]

    class SymbolicRange(stock_range):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            start, limit, step = (onnx_frontend.get_constant(x, params) for x in inputs)
            ends = [_scalar(start), _scalar(step)]
            if None in ends or not tvm.ir.is_prim_expr(limit):
                return stock_range._impl_v12(bb, inputs, attr, params)
            dtype = str(start.value.numpy().dtype)
            return relax.op.arange(ends[0], limit, ends[1], dtype=dtype)

    onnx_frontend._get_convert_map = lambda: {**stock(), "Range": SymbolicRange}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = stock


def _scalar(x) -> int | None:
    """The value of a one-element integer constant, else None."""
    if isinstance(x, tvm.ir.GenericConst):
        array = x.value.numpy()
        if array.size == 1 and array.dtype.kind in "iu":
            return int(array.item())
    return None


def _wrap(
    mod: tvm.IRModule,
    inputs: list[tuple[str, str]],
    output: int,
    weight_names: list[str],
    checkpoint: OnnxCheckpoint,
) -> tvm.IRModule:
    """The module with one function, `embed(input_ids, attention_mask, packed_params)`: the
    imported graph's body, then pooling."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    params = list(main.params)
    graph_weights = [p.name for p in params[num_input:]]
    expected = [n.removeprefix("onnx::") for n in weight_names]  # the importer strips it
    assert graph_weights == expected, (graph_weights, expected)
    b, s = tirx.Var("batch_size", "int64"), tirx.Var("seq_len", "int64")
    # Every input's [batch, seq] axes are the wrapper's, whatever the exporter named them.
    axes = {}
    for param in params[:num_input]:
        for dim, ours in zip(param.ty.shape, (b, s), strict=True):
            if isinstance(dim, tirx.Var):
                axes[dim] = ours
    main = _resolve_data_shapes(main.bind_symbolic_vars(axes), [b, s])
    ids = relax.Var("input_ids", relax.TensorType([b, s], "int32"))
    mask = relax.Var("attention_mask", relax.TensorType([b, s], "int32"))
    packed = relax.Var("packed_params", relax.TupleType([p.ty for p in main.params[num_input:]]))
    bb = relax.BlockBuilder()
    with bb.function("embed", [ids, mask, packed], attrs={"num_input": 2}):
        with bb.dataflow():
            feeds = {
                "input_ids": ids,
                "attention_mask": mask,
                "token_type_ids": relax.op.zeros((b, s), "int32"),
                "position_ids": relax.op.broadcast_to(
                    relax.op.arange(relax.prim_value(s), dtype="int32"), (b, s)
                ),
            }
            values = [relax.op.astype(feeds[name], dtype) for name, dtype in inputs]
            values += [relax.TupleGetItem(packed, i) for i in range(len(weight_names))]
            # The graph's body, inlined: its parameters bound to the values fed.
            for param, value in zip(main.params, values, strict=True):
                bb.emit_normalized(relax.VarBinding(param, bb.normalize(value)))
            for block in main.body.blocks:
                for binding in block.bindings:
                    bb.emit_normalized(binding)
            out = main.body.body
            if isinstance(out.ty, relax.TupleType):
                out = bb.emit(relax.TupleGetItem(out, output))
            pooled = pool(nn.Tensor(_expr=out), nn.Tensor(_expr=mask), checkpoint.pooling)
            gv = bb.emit_output(pooled._expr)
        bb.emit_func_output(gv)
    return bb.get()


def _resolve_data_shapes(func: relax.Function, dims: list[tirx.Var]) -> relax.Function:
    """`func` with each shape variable the importer reads from tensor data replaced by the
    expression of the input dimensions `dims` it equals, where the tensor is integer arithmetic
    on those dimensions (Range over a sequence length computed as a tensor, ...).

    FuseOps cannot fuse around such data-dependent shapes (the VM later finds them
    uncomputed), and they would cost a copy to the host on every call.
    """
    analyzer = tvm.sym.Analyzer()
    for dim in dims:
        analyzer.update(dim, tvm.sym.ConstIntBound(1, tvm.sym.ConstIntBound.POS_INF))
    known: dict[relax.Var, list] = {}
    resolved = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            values = _int_values(binding.value, known)
            if values is None:
                continue
            known[binding.var] = values
            if isinstance(binding, relax.MatchCast) and isinstance(binding.ty, relax.ShapeType):
                for have, want in zip(values, binding.ty.values or [], strict=False):
                    if isinstance(want, tirx.Var) and want not in resolved:
                        resolved[want] = analyzer.simplify(have)
    return func.bind_symbolic_vars(resolved) if resolved else func


_ELEMENTWISE = {
    "relax.add": lambda x, y: x + y,
    "relax.subtract": lambda x, y: x - y,
    "relax.multiply": lambda x, y: x * y,
    "relax.floor_divide": tirx.floordiv,
    "relax.maximum": tirx.max,
    "relax.minimum": tirx.min,
}
_SAME_VALUES = {
    "relax.reshape",
    "relax.expand_dims",
    "relax.squeeze",
    "relax.flatten",
    "relax.shape_to_tensor",
    "relax.tensor_to_shape",
}


def _int_values(expr: relax.Expr, known: dict[relax.Var, list]) -> list | None:
    """The int64 elements of a small integer tensor or shape as expressions, if known."""
    if isinstance(expr, relax.Var):
        if expr in known:
            return known[expr]
        if isinstance(expr.ty, relax.ShapeType) and expr.ty.values is not None:
            return [v if str(v.dtype) == "int64" else tirx.Cast("int64", v) for v in expr.ty.values]
        return None
    if isinstance(expr, relax.ShapeExpr):
        return list(expr.values)
    if isinstance(expr, tvm.ir.GenericConst):
        array = expr.value.numpy()
        if array.dtype.kind not in "iu" or array.size > 8:
            return None
        return [tirx.IntImm("int64", int(v)) for v in array.ravel()]
    if not isinstance(expr, relax.Call) or not isinstance(expr.op, tvm.ir.Op):
        return None
    name = expr.op.name
    args = [_int_values(a, known) if isinstance(a, relax.Expr) else None for a in expr.args]
    if name in _SAME_VALUES or (name == "relax.astype" and str(expr.ty.dtype).startswith("int")):
        return args[0]
    if name == "relax.shape_of":
        shape = expr.args[0].ty.shape
        return list(shape.values) if isinstance(shape, relax.ShapeExpr) else None
    if name == "relax.negative" and args[0] is not None:
        return [-v for v in args[0]]
    if name in _ELEMENTWISE and None not in args[:2]:
        x, y = args[0], args[1]
        if len(x) != len(y) and 1 not in (len(x), len(y)):
            return None
        n = max(len(x), len(y))
        return [_ELEMENTWISE[name](x[i % len(x)], y[i % len(y)]) for i in range(n)]
    if name == "relax.take" and None not in args[:2]:
        if all(isinstance(i, tirx.IntImm) for i in args[1]):
            return [args[0][int(i) % len(args[0])] for i in args[1]]
    return None


def _position_rows(checkpoint: OnnxCheckpoint) -> int | None:
    """Rows of the position table: the smallest weight gathered by indices the graph computes
    (or position_ids), not by input_ids or token_type_ids. Longer inputs would read past it."""
    rows = [
        checkpoint.tensors[node.input[0]].shape[0]
        for node in checkpoint.onnx_model.graph.node
        if node.op_type == "Gather"
        and node.input[0] in checkpoint.tensors
        and node.input[1] not in ("input_ids", "token_type_ids")
    ]
    if rows:
        log.info("%s: context window %d, the position table's rows", checkpoint.path, min(rows))
    return min(rows, default=None)


def _vocab_size(checkpoint: OnnxCheckpoint) -> int:
    """Rows of the table input_ids index (a Gather on it), else config.json's vocab_size."""
    for node in checkpoint.onnx_model.graph.node:
        if node.op_type == "Gather" and list(node.input[1:]) == ["input_ids"]:
            table = checkpoint.tensors.get(node.input[0])
            if table is not None:
                return int(table.shape[0])
    if "vocab_size" in checkpoint.config:
        return int(checkpoint.config["vocab_size"])
    raise RelaxlmError(
        f"{checkpoint.path}: cannot tell the vocabulary size (no embedding table read by "
        "input_ids, no config.json vocab_size); put the model's config.json next to the file"
    )
