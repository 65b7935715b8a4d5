"""The rewrite: each factored site ``x @ W`` becomes ``(x @ A) @ B``.

MatMul → MatMul(x, A), MatMul(h, B); Gemm → MatMul(x, A), Gemm(h, B, C) with C and beta on the
second (transB and alpha are already folded into the factors); a 1x1 Conv → Conv(x, A) with the
strides and pads, then a 1x1 Conv(h, B, bias). A weight shared by several sites of the same kind
is factored once and the factors are shared, across If branches too: each layer is rewritten in
the graph (or If/Loop/Scan body) that holds it, and the export writes the shared factors once, in
the innermost graph enclosing their readers.
"""

from __future__ import annotations

from typing import Any

import onnx_graphsurgeon as gs

from onnxcomp.graph import (
    constant_array,
    export_model,
    graph_nodes,
    import_graph,
    replace_node,
    tidy,
    unique_name,
)
from onnxcomp.model import Model
from onnxcomp.passes.lowrank.match import LayerPlan


def _new_nodes(graph: gs.Graph, node: gs.Node, plan: LayerPlan, a: gs.Constant,
               b: gs.Constant) -> tuple[list[gs.Node], gs.Variable, gs.Tensor | None]:
    base = node.name or f"lowrank_{plan.output}"
    hidden = gs.Variable(unique_name(graph, f"{plan.output}_lowrank_h"), dtype=a.values.dtype)
    x, outputs = node.inputs[0], list(node.outputs)
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op == "Conv":
        first = gs.Node("Conv", f"{base}_lowrank_a", inputs=[x, a], outputs=[hidden],
                        attrs={k: v for k, v in node.attrs.items()
                               if k in ("strides", "pads", "auto_pad", "kernel_shape")})
        second = gs.Node("Conv", f"{base}_lowrank_b", inputs=[hidden, b] + ([bias] if bias else []),
                         outputs=outputs, attrs={"kernel_shape": list(a.values.shape[2:])})
        return [first, second], hidden, bias
    first = gs.Node("MatMul", f"{base}_lowrank_a", inputs=[x, a], outputs=[hidden])
    if node.op == "Gemm" and bias is not None:
        second = gs.Node("Gemm", f"{base}_lowrank_b", inputs=[hidden, b, bias], outputs=outputs,
                         attrs={"alpha": 1.0, "beta": float(node.attrs.get("beta", 1.0))})
    else:
        second = gs.Node("MatMul", f"{base}_lowrank_b", inputs=[hidden, b], outputs=outputs)
    return [first, second], hidden, bias


def factor(model: Model, plans: list[LayerPlan]) -> tuple[Model, list[dict[str, Any]]]:
    """Rewrite the factored sites of ``plans`` on a copy of ``model``: the new model and, per
    layer, its details (the two new nodes last: first factor, second factor)."""
    graph = import_graph(model)
    by_output = {node.outputs[0].name: (node, holder) for node, holder in graph_nodes(graph)
                 if node.outputs}
    made: dict[str, tuple[gs.Constant, gs.Constant]] = {}
    layers = []
    for p in plans:
        if not p.factored:
            continue
        node, holder = by_output[p.output]
        if p.weight not in made:
            weight = constant_array(node.inputs[1])
            a, b = (f.astype(weight.dtype) for f in p.factors)
            if node.op == "Conv":
                ones = (1,) * (weight.ndim - 2)
                a, b = a.T.reshape((p.rank, p.K) + ones), b.T.reshape((p.N, p.rank) + ones)
            made[p.weight] = (gs.Constant(unique_name(graph, f"{p.weight}_lowrank_A"), a),
                              gs.Constant(unique_name(graph, f"{p.weight}_lowrank_B"), b))
        a, b = made[p.weight]
        x_name = node.inputs[0].name
        new, hidden, bias = _new_nodes(holder, node, p, a, b)
        replace_node(holder, node, new)
        layers.append({**p.summary(), "input": x_name, "hidden": hidden.name,
                       "factor_a": a.name, "factor_b": b.name,
                       "bias": bias.name if bias is not None else None,
                       "nodes": [n.name for n in new],
                       "layout": "conv (r,K,1,1)/(N,r,1,1)" if node.op == "Conv"
                       else "matmul (K,r)/(r,N)"})
    return export_model(tidy(graph), like=model), layers
