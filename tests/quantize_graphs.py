"""Tiny graphs and data for the quantize tests, built in memory with onnx.helper.

- ``conv_mlp``: Conv+bias -> Relu -> Conv -> Reshape -> MatMul -> Add -> Gemm(transB);
- ``matmul_model``: two MatMuls reading one input (optionally after a LayerNormalization);
- ``attention_block``: q/k/v projections and two activation x activation MatMuls;
- ``gather_model``: an embedding table read by Gather (tied / shared / small variants);
- ``fused_attention_model``: one com.microsoft.Attention (the fuse pass's form);
- data: ``data_for`` (random, fits the model), ``ids_batches``, ``correlated`` inputs for GPTQ.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.model import Model
from onnxcomp.report import cpu


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def conv_mlp(opset: int = 13, constant_nodes: bool = False) -> Model:
    """x[1,3,8,8] -> Conv+bias -> Relu -> Conv -> Reshape -> MatMul -> Add -> Gemm(transB)."""
    rng = np.random.default_rng(0)
    weights = {
        "W1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(8).astype(np.float32),
        "W2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
        "M": rng.standard_normal((64, 16)).astype(np.float32) * 0.1,
        "mb": rng.standard_normal(16).astype(np.float32) * 0.1,
        "G": rng.standard_normal((10, 16)).astype(np.float32) * 0.2,
        "gb": rng.standard_normal(10).astype(np.float32) * 0.1,
    }
    shapes = {"shp": np.array([1, 8, 64], np.int64), "shp2": np.array([8, 16], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Reshape", ["c2", "shp"], ["rs"], name="reshape"),
        helper.make_node("MatMul", ["rs", "M"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "mb"], ["mma"], name="mm_bias"),
        helper.make_node("Reshape", ["mma", "shp2"], ["mm2d"], name="reshape2"),
        helper.make_node("Gemm", ["mm2d", "G", "gb"], ["y"], transB=1, name="gemm"),
    ]
    initializers = [init(k, v) for k, v in shapes.items()]
    if constant_nodes:
        nodes = [helper.make_node("Constant", [], [k], value=init(k, v), name=f"const_{k}")
                 for k, v in weights.items()] + nodes
    else:
        initializers += [init(k, v) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "conv_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 10])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return Model(model)


def matmul_model(k: int = 72, n: int = 24, ln: bool = False) -> Model:
    """x[2,5,K] (-> LayerNorm) -> MatMul W[K,N] -> y, and a second MatMul on the same input."""
    rng = np.random.default_rng(1)
    inits = [init("W", rng.standard_normal((k, n)).astype(np.float32) * 0.2),
             init("W2", rng.standard_normal((k, n)).astype(np.float32) * 0.2)]
    nodes, source = [], "x"
    if ln:
        inits += [init("gamma", (1 + rng.random(k)).astype(np.float32)),
                  init("beta", rng.standard_normal(k).astype(np.float32) * 0.1)]
        nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"],
                                      axis=-1, name="ln"))
        source = "h"
    nodes += [helper.make_node("MatMul", [source, "W"], ["y"], name="mm1"),
              helper.make_node("MatMul", [source, "W2"], ["y2"], name="mm2")]
    graph = helper.make_graph(
        nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, n]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 5, n])], inits)
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def data_for(model: Model, count: int = 4, scale: float = 1.0) -> calibration.Dataset:
    base = calibration.random_data(model, count)
    return calibration.from_batches(
        [{k: (v * scale).astype(v.dtype) for k, v in batch.items()} for batch in base])


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def optimized_ops(model: Model, tmp_path) -> list[str]:
    path = tmp_path / "optimized.onnx"
    runtime.session(model, optimize=True, optimized_model_path=str(path))
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def rel_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.linalg.norm(ref - cand) / np.linalg.norm(ref))


def attention_block(d: int = 32, s: int = 6) -> Model:
    """x[2,S,D] -> q/k/v projections -> MatMul(q, k^T) -> Softmax -> MatMul(., v) -> out_proj:
    two activation x activation MatMuls (``scores``, ``context``) among four weighted ones."""
    rng = np.random.default_rng(9)
    weights = {k: (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
               for k in ("Wq", "Wk", "Wv", "Wo")}
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
             helper.make_node("MatMul", ["context", "Wo"], ["y"], name="out_proj")]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, s, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, s, d])],
        [init(k, v) for k, v in weights.items()])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


FLOAT_MATMULS = {"MatMul", "FusedMatMul"}


# --- embedding tables

V, D = 300, 32  # 9600 elements: above quantize_gather.MIN_ELEMENTS


def gather_model(tied: bool = False, second_gather: bool = False, small: bool = False) -> Model:
    """ids[2,6] -> Gather(table) -> emb (an output) -> MatMul W -> y; ``tied``: the table also
    feeds a Transpose -> MatMul lm_head; ``second_gather``: another Gather reads the same table;
    ``small``: the table is [2, D] (under MIN_ELEMENTS)."""
    rng = np.random.default_rng(7)
    rows = 2 if small else V
    # rows of very different magnitudes: per-row scales matter
    table = (rng.standard_normal((rows, D)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    inits = [init("table", table), init("W", rng.standard_normal((D, 16)).astype(np.float32))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="emb_gather"),
             helper.make_node("MatMul", ["emb", "W"], ["y"], name="proj")]
    outputs = [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [2, 6, D]),
               helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 16])]
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], name="tie_t"),
                  helper.make_node("MatMul", ["emb", "table_t"], ["logits"], name="lm_head")]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 6, rows]))
    if second_gather:
        nodes.append(helper.make_node("Gather", ["table", "ids2"], ["emb2"], name="emb_gather2"))
        outputs.append(helper.make_tensor_value_info("emb2", TensorProto.FLOAT, [3, D]))
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 6])]
    if second_gather:
        inputs.append(helper.make_tensor_value_info("ids2", TensorProto.INT64, [3]))
    graph = helper.make_graph(nodes, "emb", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return Model(model)


def ids_batches(model: Model, count: int = 3) -> calibration.Dataset:
    rows = numpy_helper.to_array(model.graph.initializer[0]).shape[0]
    rng = np.random.default_rng(3)
    batches = []
    for _ in range(count):
        ids = rng.integers(0, rows, (2, 6)).astype(np.int64)
        ids[0, 0], ids[0, 1] = 0, rows - 1  # first and last rows, and a negative index below
        ids[1, 0] = -1
        batch = {"ids": ids}
        if any(i.name == "ids2" for i in model.graph.input):
            batch["ids2"] = np.array([2, 1, rows - 2], np.int64)
        batches.append(batch)
    return calibration.from_batches(batches)


def int8_tables(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
            if t.data_type == TensorProto.INT8}


# --- fused attention

HIDDEN, HEADS, SEQ = 64, 4, 7


def fused_attention_model(**attrs) -> Model:
    """x[2,S,H] -> com.microsoft.Attention(W [H, 3H], bias, mask_index int32 [2]) -> y."""
    rng = np.random.default_rng(11)
    inits = [init("qkv_w", rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32) * 0.1),
             init("qkv_b", rng.standard_normal(3 * HIDDEN).astype(np.float32) * 0.1)]
    node = helper.make_node("Attention", ["x", "qkv_w", "qkv_b", "mask_index"], ["y"],
                            name="attn", domain="com.microsoft", num_heads=HEADS, **attrs)
    graph = helper.make_graph(
        [node], "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, SEQ, HIDDEN]),
         helper.make_tensor_value_info("mask_index", TensorProto.INT32, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, SEQ, HIDDEN])], inits)
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                         helper.make_opsetid("com.microsoft", 1)]))


def attention_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    return {"x": rng.standard_normal((2, SEQ, HIDDEN)).astype(np.float32),
            "mask_index": np.array([SEQ, SEQ - 2], np.int32)}  # second sequence padded


# --- correlated inputs (GPTQ)

def correlated(count: int, rows: int, k: int, seed: int) -> np.ndarray:
    """Inputs living mostly in a few directions, as trained models' activations do."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(7).standard_normal((6, k))
    return (rng.standard_normal((count, rows, 6)) @ basis
            + 0.05 * rng.standard_normal((count, rows, k))).astype(np.float32)


def correlated_batches(x: np.ndarray) -> calibration.Dataset:
    return calibration.from_batches([{"x": xi.reshape(2, -1, xi.shape[-1])} for xi in x])


def x86_without_vnni() -> bool:
    """An x86 CPU with AVX2 but no VNNI: ONNX Runtime's u8 x s8 kernels saturate there."""
    return cpu().get("int8_dot_product") == "avx2 (no vnni)"


def saturating_conv(weight: np.ndarray) -> Model:
    """x[1,C,12,12] -> Conv 3x3 (pads 1, the weight given) -> Relu -> Conv 1x1 -> y[1,2,12,12];
    the 1x1 weights alternate in sign over the input channels (no risky pairs)."""
    out, channels = weight.shape[:2]
    head = np.where(np.arange(out) % 2, -0.5, 0.5).reshape(1, out, 1, 1) * np.ones((2, 1, 1, 1))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "head.w"], ["y"], name="head")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 12, 12])],
        [numpy_helper.from_array(weight.astype(np.float32), "w"),
         numpy_helper.from_array(head.astype(np.float32), "head.w")])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def bright_images(channels: int, count: int = 4):
    # An image-like input in [0, 1]: its uint8 values reach 255, as a first Conv's do.
    rng = np.random.default_rng(0)
    return calibration.from_batches(
        [{"x": rng.uniform(0.3, 1.0, (1, channels, 12, 12)).astype(np.float32)}
         for _ in range(count)])


def weight_values(model: Model) -> dict[str, np.ndarray]:
    """Each weight DequantizeLinear's float values."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = inits[node.input[0]].astype(np.float32)
            scale = inits[node.input[1]]
            zero = inits[node.input[2]].astype(np.float32) if len(node.input) > 2 and \
                node.input[2] else 0.0
            if q.ndim == 4:
                scale, zero = scale.reshape(-1, 1, 1, 1), np.reshape(zero, (-1, 1, 1, 1)) \
                    if np.ndim(zero) else zero
            found[node.output[0]] = (q - zero) * scale
    return found


def weight_dtypes(model: Model) -> set[int]:
    inits = {t.name: t.data_type for t in model.graph.initializer}
    return {inits[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits}


def dense_matmul(rng: np.random.Generator) -> Model:
    """x[4,32] -> MatMul -> y[4,8], the weights' magnitudes in [0.8, 1] (int8 levels near +-127
    in every column: pairs that overflow int16 for high uint8 inputs)."""
    weight = np.sign(rng.standard_normal((32, 8))) * rng.uniform(0.8, 1.0, (32, 8))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
