"""Reshape targets an exporter computes from the data's own dims, made constant.

PyTorch exports ``x.view(B, S, heads, head_dim)`` with dynamic ``B`` and ``S`` as
``Reshape(x, Concat(Unsqueeze(Gather(Shape(h), 0)), Unsqueeze(Gather(Shape(h), 1)), [12],
[32]))``: a Shape, two Gathers, two Unsqueezes and a Concat per target, evaluated on every run.
Reshape's own rule (``allowzero = 0``) already says "0: copy this dim of the input", so where
dim ``k`` of ``h`` is provably dim ``p`` of ``x`` at the same position ``p == k``, the part is 0,
and a target whose every part is a constant or such a dim becomes one constant, ``[0, 0, 12,
32]``: the shape arithmetic goes (cleanup removes the dead nodes). all-MiniLM-L6-v2: 24
Reshapes, 37 fewer nodes in ONNX Runtime's optimized graph.

When the two dims are the same: ONNX shape inference (on a copy of the graph without its large
weights) gives them one ``dim_param`` or one ``dim_value``, after joining the symbols of dims
that meet in a broadcast. Symbolic dims come from the graph inputs' names (one name, one value,
as ONNX reads it and the exporter meant it) and flow through the ops shape inference knows;
where it cannot follow (an Expand to a computed shape) it invents a fresh symbol, and an
elementwise op or a MatMul that broadcasts two such dims makes a third. Those are joined
(``_Symbols``): a broadcast of two unknown dims is read as equal dims, the reading ONNX
Runtime's own symbolic shape inference takes. It can be wrong only where one side is 1 at run
time and the other is not (a batch-1 attention mask stretched over a larger batch whose
activations are 1-wide in that dim): there the original target copied the 1 and the constant
one copies the stretched dim. Every compressed model is validated against the input model
afterwards. Each round's rewrites make the next Reshapes' inputs known (the merge Reshape after
attention reads the split one's output), so the search runs until nothing changes (at most
``MAX_ROUNDS``). Only top-level Reshapes with the default ``allowzero``; a part of another form
(Slice of a Shape, arithmetic on dims) leaves the target as it is.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp.graph import NodeIndex, node_attr

logger = logging.getLogger(__name__)
MAX_ROUNDS = 4
_SMALL = 64  # initializers up to this many elements keep their values in the skeleton


def _elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every large initializer reduced to its name, type and dims (shape
    inference needs nothing more of them), so no weight is copied or read from disk."""
    graph = proto.graph
    small = [t for t in graph.initializer if _elements(t) <= _SMALL
             and t.data_location != onnx.TensorProto.EXTERNAL]
    kept = {t.name for t in small} | {i.name for i in graph.input}
    stubs = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
             for t in graph.initializer if t.name not in kept]
    skeleton = helper.make_graph(_standard_nodes(graph), graph.name, [*graph.input, *stubs],
                                 list(graph.output), small, value_info=list(graph.value_info))
    return helper.make_model(skeleton, opset_imports=list(proto.opset_import),
                             ir_version=proto.ir_version)


def _standard_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes, with ONNX Runtime's MatMulIntegerToFloat (which ONNX shape inference
    does not know; the ``lower`` step writes it) as a float MatMul of the same shape, so that
    the dims flow on past it in the skeleton."""
    nodes = []
    for node in graph.node:
        if node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft":
            out = node.output[0]
            nodes += [helper.make_node("Cast", [node.input[0]], [f"{out}__a"], to=1),
                      helper.make_node("Cast", [node.input[1]], [f"{out}__b"], to=1),
                      helper.make_node("MatMul", [f"{out}__a", f"{out}__b"], [out])]
        else:
            nodes.append(node)
    return nodes


def _dims(inferred: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> dims (an int, a dim_param string, or None), where the rank is known."""
    found = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        kind = info.type.tensor_type
        if kind.HasField("shape"):
            found[info.name] = [d.dim_value if d.HasField("dim_value")
                                else (d.dim_param or None) for d in kind.shape.dim]
    for tensor in graph.initializer:
        found[tensor.name] = list(tensor.dims)
    return found


_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Equal", "Less", "Greater",
                 "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Sum",
                 "Mean", "PRelu"}


class _Symbols:
    """Dims known equal: ints as themselves, symbols joined where they meet in a broadcast."""

    def __init__(self, graph: onnx.GraphProto, dims: dict[str, list]):
        self.parent: dict[str, str] = {}
        for node in graph.node:
            if node.domain:
                continue
            if node.op_type in _BROADCASTING:
                self._join_aligned([dims.get(n) for n in node.input if n] +
                                   [dims.get(node.output[0])])
            elif node.op_type == "MatMul" and len(node.input) == 2:
                a, b, out = dims.get(node.input[0]), dims.get(node.input[1]), \
                    dims.get(node.output[0])
                if a is None or b is None or out is None or min(len(a), len(b), len(out)) < 2:
                    continue
                self._join_aligned([a[:-2], b[:-2], out[:-2]])
                self._join([a[-2], out[-2]])
                self._join([b[-1], out[-1]])
                self._join([a[-1], b[-2]])

    @staticmethod
    def _token(dim) -> str | None:
        return None if dim is None else (f"#{dim}" if isinstance(dim, int) else dim)

    def find(self, token: str) -> str:
        while self.parent.get(token, token) != token:
            token = self.parent[token]
        return token

    def _join(self, dims: list) -> None:
        tokens = [self._token(d) for d in dims if d is not None and d != 1]
        roots = {self.find(t) for t in tokens if t is not None}
        ints = sorted(r for r in roots if r.startswith("#"))
        if len(ints) > 1:  # known sizes that differ: not a broadcast to read anything into
            return
        keep = ints[0] if ints else min(roots, default=None)
        for root in roots:
            if root != keep:
                self.parent[root] = keep

    def _join_aligned(self, shapes: list) -> None:
        if any(shape is None for shape in shapes):
            return
        rank = max((len(shape) for shape in shapes), default=0)
        for i in range(1, rank + 1):
            self._join([shape[-i] for shape in shapes if len(shape) >= i])

    def same(self, a, b) -> bool:
        ta, tb = self._token(a), self._token(b)
        return ta is not None and tb is not None and self.find(ta) == self.find(tb)


class _Graph(NodeIndex):
    """The node index plus the values of the small constants (initializers, Constant nodes)."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        super().__init__(graph)
        self.values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and not node.domain and node.attribute \
                    and node.attribute[0].name == "value":
                self.values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def shape_dim(self, part: str) -> tuple[str, int] | None:
        """(tensor, k) where ``part`` is Unsqueeze(Gather(Shape(tensor), k)) as a [1] tensor."""
        unsqueeze = self.made_by(part, "Unsqueeze")
        if unsqueeze is None:
            return None
        axes = node_attr(unsqueeze, "axes")
        if axes is None and len(unsqueeze.input) > 1:
            axes = self.values.get(unsqueeze.input[1])
        if axes is None or [int(a) for a in np.ravel(axes)] not in ([0], [-1]):
            return None
        gather = self.made_by(unsqueeze.input[0], "Gather")
        if gather is None or node_attr(gather, "axis", 0) != 0:
            return None
        index = self.values.get(gather.input[1])
        shape = self.made_by(gather.input[0], "Shape")
        if index is None or np.ndim(index) != 0 or shape is None \
                or node_attr(shape, "start", 0) != 0 or node_attr(shape, "end") is not None:
            return None
        return shape.input[0], int(index)


def _target(g: _Graph, dims: dict[str, list], symbols: _Symbols, reshape: onnx.NodeProto
            ) -> list[int] | None:
    """The constant target of ``reshape`` with 0 for each provable dim, or None."""
    concat = g.made_by(reshape.input[1], "Concat")
    data = dims.get(reshape.input[0])
    if concat is None or data is None or node_attr(reshape, "allowzero", 0):
        return None
    values: list[int] = []
    dynamic = 0
    for part in concat.input:
        constant = g.values.get(part)
        if constant is not None and constant.ndim == 1 and constant.dtype == np.int64:
            values.extend(int(v) for v in constant)
            continue
        source = g.shape_dim(part)
        if source is None:
            return None
        tensor, k = source
        source_dims = dims.get(tensor)
        position = len(values)
        if source_dims is None or position >= len(data):
            return None
        k = k + len(source_dims) if k < 0 else k
        if k != position or k >= len(source_dims):
            return None
        if not symbols.same(source_dims[k], data[position]):
            return None
        values.append(0)
        dynamic += 1
    # a 0 that was already there means "copy" in both forms; only dynamic parts are rewritten
    return values if dynamic else None


def static_targets(proto: onnx.ModelProto) -> dict[str, list[int]]:
    """Reshape output name -> its constant target (0 = copy the input's dim), for every
    top-level Reshape whose computed target is provably that. An optimization: whatever goes
    wrong on an odd model (shape inference refusing it, a tensor numpy cannot read) gives an
    empty result, said in the debug log, never an error."""
    try:
        return _static_targets(proto)
    except Exception as exc:  # noqa: BLE001
        logger.debug("static reshapes skipped: %s", exc)
        return {}


def _static_targets(proto: onnx.ModelProto) -> dict[str, list[int]]:
    skeleton = _skeleton(proto)
    found: dict[str, list[int]] = {}
    for _ in range(MAX_ROUNDS):
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
        g = _Graph(skeleton)
        dims = _dims(inferred)
        symbols = _Symbols(skeleton.graph, dims)
        new = {}
        for node in skeleton.graph.node:
            if node.op_type == "Reshape" and not node.domain and node.output[0] not in found:
                target = _target(g, dims, symbols, node)
                if target is not None:
                    new[node.output[0]] = target
        if not new:
            break
        for node in skeleton.graph.node:  # the next round sees the constant targets
            if node.op_type == "Reshape" and node.output[0] in new:
                name = f"{node.output[0]}__static_shape"
                skeleton.graph.initializer.append(
                    numpy_helper.from_array(np.array(new[node.output[0]], np.int64), name))
                node.input[1] = name
        found.update(new)
    return found
