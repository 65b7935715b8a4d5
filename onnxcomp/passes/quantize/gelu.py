"""``fuse_gelu``: the Erf form of GELU as one ``com.microsoft.Gelu`` node.

Exported transformers write GELU out as ``x * 0.5 * (1 + Erf(x / sqrt 2))``, five ops. QNN's
HTP has a Gelu op and no Erf: the written-out form leaves Erf to the CPU and splits the
quantized graph into pieces (MiniLM: 6 Erfs, tiny-clip: 4). ONNX Runtime's own preprocessing for
QNN fuses the pattern with ``onnxruntime.quantization.fusions.FusionGelu`` (the forms PyTorch
and Hugging Face exports write); it is used here as it is. Exact: Gelu computes the same
function, and ONNX Runtime's CPU provider runs ``com.microsoft.Gelu`` too.

Each fused node writes the old last Mul's output name. ONNX's shape inference knows no
com.microsoft op, so without help every tensor after a Gelu would lose its type (and with it
its every_op pair): the fused outputs get the value_info shape inference found before fusing.
"""

from __future__ import annotations

import onnx

from onnxcomp.model import Model


def count_erf(proto: onnx.ModelProto) -> int:
    return sum(1 for node in proto.graph.node if node.op_type == "Erf")


def fuse(model: Model) -> tuple[Model, int]:
    """``model`` with its Erf GELUs fused (a new model; ``model`` unchanged) and how many."""
    if not count_erf(model.proto):
        return model, 0
    from onnxruntime.quantization.fusions import FusionGelu
    from onnxruntime.quantization.onnx_model import ONNXModel

    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - untyped outputs only cost the pairs after them
        inferred = proto
    typed = {v.name: v for v in inferred.graph.value_info}
    before = {node.name for node in proto.graph.node if node.op_type == "Gelu"}
    if not FusionGelu(ONNXModel(proto)).apply():
        return model, 0
    fused = [node for node in proto.graph.node
             if node.op_type == "Gelu" and node.name not in before]
    declared = {v.name for v in proto.graph.value_info}
    for node in fused:
        if node.output[0] in typed and node.output[0] not in declared:
            proto.graph.value_info.append(typed[node.output[0]])
    # The fusion appends the Gelus at the end of the node list: sort the graph.
    from onnxcomp.graph import export_model, import_proto, tidy

    result = Model(proto, model.source, model.external_data)
    return export_model(tidy(import_proto(proto, model.source)), like=result), len(fused)
