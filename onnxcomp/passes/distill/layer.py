"""A student layer (MatMul, Gemm, Conv) seen as one [K, N] weight and a bias, for the closed-form
refit: where its bias lives (its own input, or the Add after a MatMul, also through a Q/DQ pair),
whether the weight can be re-fitted (MatMul, Gemm, 1×1 ungrouped Conv), and copy-on-write setters
that give a shared tensor a copy of its own."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.passes.distill.config import Config


class Layer:
    """A student layer's weight/bias in a uniform [K, N] view, and how to write them back."""

    @classmethod
    def open(cls, proto: onnx.ModelProto, node: onnx.NodeProto,
             need_weight: bool) -> Layer | str:
        """The layer, or why it cannot be repaired."""
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            return f"op {node.op_type} is not re-fitted"
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            return "Gemm with transA"
        layer = cls(proto, node)
        if layer.weight_name not in layer.inits and need_weight:
            return "its weight is not a float initializer"
        return layer

    def __init__(self, proto: onnx.ModelProto, node: onnx.NodeProto):
        self.proto, self.node = proto, node
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.op = node.op_type
        self.trans_b = self.op == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        self.weight_name = node.input[1] if len(node.input) > 1 else None
        self.kn = None
        if self.weight_name in self.inits:
            weight = numpy_helper.to_array(self.inits[self.weight_name])
            self.weight_shape, self.dtype = weight.shape, weight.dtype
            if self.op == "Conv":
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                if weight.shape[2:] == (1,) * (weight.ndim - 2) and group == 1:
                    self.kn = weight.reshape(weight.shape[0], -1).T
            elif weight.ndim == 2:
                self.kn = weight.T if self.trans_b else weight
        self.bias_name, self.bias_add = self._find_bias()

    def _find_bias(self) -> tuple[str | None, onnx.NodeProto | None]:
        if self.op in ("Conv", "Gemm") and len(self.node.input) > 2 and \
                self.node.input[2] in self.inits:
            return self.node.input[2], None
        if self.op == "MatMul":
            out = self.node.output[0]
            users = [n for n in self.proto.graph.node if out in n.input]
            # A quantized output (MatMul → QuantizeLinear → DequantizeLinear → Add) still ends
            # in the bias Add: look through the pair.
            for op in ("QuantizeLinear", "DequantizeLinear"):
                if len(users) == 1 and users[0].op_type == op:
                    out = users[0].output[0]
                    users = [n for n in self.proto.graph.node if out in n.input]
            if len(users) == 1 and users[0].op_type == "Add":
                other = [i for i in users[0].input if i != out]
                if other and other[0] in self.inits:
                    bias = numpy_helper.to_array(self.inits[other[0]])
                    if bias.ndim == 1:
                        return other[0], users[0]
        return None, None

    def refusal(self, repair: str, config: Config) -> str | None:
        """Why neither a re-fit nor a bias correction applies, or None."""
        if repair == "refit" and self.kn is not None:
            return None
        if self.bias_name is None:
            return "nothing to re-fit: the weight is not refittable and there is no bias"
        if not config.bias_correction:
            return "only a bias correction applies and bias_correction = false"
        return None

    def action(self, repair: str, teacher_output: str) -> str:
        if repair == "refit" and self.kn is not None:
            what = "weights+bias" if self.bias_name is not None else "weights"
            return f"refit {what} to teacher tensor {teacher_output}"
        return f"bias correction to teacher tensor {teacher_output}"

    def bias(self) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[self.bias_name]) if self.bias_name else None

    def snapshot(self) -> dict[str, onnx.TensorProto]:
        saved = {}
        for name in (self.weight_name, self.bias_name):
            if name in self.inits:
                saved[name] = onnx.TensorProto()
                saved[name].CopyFrom(self.inits[name])
        return saved

    def restore(self, saved: dict[str, onnx.TensorProto]) -> None:
        for name, tensor in saved.items():
            self.inits[name].CopyFrom(tensor)

    def set_weight(self, kn: np.ndarray) -> None:
        value = kn.T.reshape(self.weight_shape) if self.op == "Conv" else (
            kn.T if self.trans_b else kn)
        self._replace("weight", value.astype(self.dtype))

    def set_bias(self, bias: np.ndarray) -> None:
        dtype = numpy_helper.to_array(self.inits[self.bias_name]).dtype
        self._replace("bias", bias.astype(dtype))

    def _replace(self, which: str, value: np.ndarray) -> None:
        name = self.weight_name if which == "weight" else self.bias_name
        users = sum(name in n.input for n in self.proto.graph.node)
        if users > 1:  # a shared tensor: this layer gets its own copy, the others keep theirs
            new_name = f"{name}__distill_{self.node.name or self.node.output[0]}"
            tensor = numpy_helper.from_array(value, new_name)
            self.proto.graph.initializer.append(tensor)
            self.inits[new_name] = self.proto.graph.initializer[-1]
            holder = self.bias_add if (which == "bias" and self.bias_add is not None) else self.node
            for i, item in enumerate(holder.input):
                if item == name:
                    holder.input[i] = new_name
            setattr(self, f"{which}_name", new_name)
            return
        self.inits[name].CopyFrom(numpy_helper.from_array(value, name))
