"""A Llama-style decoder-only transformer written with onnx.helper, for scale tests.

RMSNorm, rotary position embeddings, grouped-query attention with a causal mask, SwiGLU MLP,
tied-free LM head. Weights are seeded random and streamed straight into one external data file
while the graph is built, so a multi-GiB model never sits in memory: peak memory is one weight.

    python -m onnxcomp.zoo.llama OUT.onnx --preset 1b     # ~1.1 B parameters, ~4.4 GB float32
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcomp.calibration import Dataset


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 172
    vocab: int = 512
    max_positions: int = 128
    seed: int = 0
    # "scaled": the residual-branch output projections (o_proj, down_proj) start with their std
    # divided by sqrt(2 * layers), as GPT-2 and Megatron-LM initialize, so each layer adds a small
    # update to the residual stream as in trained models; "plain": every weight std 1/sqrt(fan_in)
    # (about Hugging Face Llama's 0.02 at 1B), where every layer overwrites the stream and small
    # perturbations grow from layer to layer.
    init: str = "scaled"

    def __post_init__(self) -> None:
        if self.init not in ("scaled", "plain"):
            raise ValueError(f"init must be scaled or plain, got {self.init!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide by heads, heads by kv_heads")
        if (self.hidden // self.heads) % 2:
            raise ValueError("head size must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def parameter_count(self) -> int:
        kv = self.kv_heads * self.head_dim
        per_layer = (2 * self.hidden * self.hidden + 2 * self.hidden * kv
                     + 3 * self.hidden * self.intermediate + 2 * self.hidden)
        return 2 * self.vocab * self.hidden + self.layers * per_layer + self.hidden


PRESETS = {
    "tiny": LlamaConfig(),
    "small": LlamaConfig(hidden=256, layers=4, heads=8, kv_heads=2, intermediate=688, vocab=4096),
    # TinyLlama-1.1B's shape.
    "1b": LlamaConfig(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632,
                      vocab=32000, max_positions=2048),
}


class _ExternalWriter:
    """Appends tensors to one data file and returns TensorProtos that point into it."""

    def __init__(self, data_path: Path):
        self.path = data_path
        self.handle = open(data_path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.size * array.itemsize < 1024:
            return onnx.numpy_helper.from_array(array, name)
        pad = (-self.offset) % 64  # aligned offsets let ONNX Runtime memory-map the weights
        self.handle.write(b"\0" * pad)
        self.offset += pad
        data = array.tobytes()
        self.handle.write(data)
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                            dims=array.shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(self.offset)),
                           ("length", str(len(data)))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.offset += len(data)
        return proto

    def close(self) -> None:
        self.handle.close()


def _rope_tables(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    half = config.head_dim // 2
    inv_freq = 1.0 / (10000 ** (np.arange(half) / half))
    angles = np.outer(np.arange(config.max_positions), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)  # [P, head_dim]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build(path: str | os.PathLike, config: LlamaConfig = PRESETS["tiny"]) -> Path:
    """Write the model to ``path`` (+ ``path.data``) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _ExternalWriter(path.with_name(path.name + ".data"))
    rng = np.random.default_rng(config.seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    h, hd, kv = config.hidden, config.head_dim, config.kv_heads

    residual_std = 1.0 / np.sqrt(2 * config.layers) if config.init == "scaled" else 1.0

    def weight(name: str, shape: tuple[int, ...], scale: float | None = None,
               residual: bool = False) -> str:
        std = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        std *= residual_std if residual else 1.0
        inits.append(writer.tensor(name, (rng.standard_normal(shape, dtype=np.float32) * std)
                                   .astype(np.float32)))
        return name

    def const(name: str, array: np.ndarray) -> str:
        inits.append(writer.tensor(name, np.asarray(array)))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def rms_norm(x: str, prefix: str) -> str:
        gamma = const(f"{prefix}.weight", np.ones(h, np.float32)
                      + 0.02 * rng.standard_normal(h).astype(np.float32))
        sq = node("Mul", [x, x], f"{prefix}.sq")
        mean = node("ReduceMean", [sq], f"{prefix}.mean", axes=[-1], keepdims=1)
        var = node("Add", [mean, "eps"], f"{prefix}.var")
        inv = node("Reciprocal", [node("Sqrt", [var], f"{prefix}.rms")], f"{prefix}.inv")
        return node("Mul", [node("Mul", [x, inv], f"{prefix}.normed"), gamma], f"{prefix}.out")

    def rotary(x: str, prefix: str) -> str:
        # x: [B, H, S, hd]; rotate_half(x) = concat(-x2, x1)
        x1 = node("Slice", [x, "zero1", "half1", "minus1"], f"{prefix}.x1")
        x2 = node("Slice", [x, "half1", "big1", "minus1"], f"{prefix}.x2")
        rotated = node("Concat", [node("Neg", [x2], f"{prefix}.negx2"), x1], f"{prefix}.rot",
                       axis=-1)
        return node("Add", [node("Mul", [x, "cos_s"], f"{prefix}.xcos"),
                            node("Mul", [rotated, "sin_s"], f"{prefix}.rsin")], f"{prefix}.out")

    cos, sin = _rope_tables(config)
    const("eps", np.array(1e-5, np.float32))
    const("cos_table", cos)
    const("sin_table", sin)
    for name, value in (("zero1", [0]), ("half1", [hd // 2]), ("big1", [hd]), ("minus1", [-1]),
                        ("axis0", [0]), ("one1", [1]), ("two1", [2])):
        const(name, np.array(value, np.int64))
    const("mask_big", np.array(1e9, np.float32))
    const("q_shape", np.array([0, 0, config.heads, hd], np.int64))
    const("kv_shape", np.array([0, 0, kv, hd], np.int64))
    const("merge_shape", np.array([0, 0, h], np.int64))
    const("scale", np.array(1.0 / np.sqrt(hd), np.float32))

    embed = weight("embed_tokens", (config.vocab, h), scale=0.02 * np.sqrt(h) / np.sqrt(h))
    x = node("Gather", [embed, "input_ids"], "embedded")
    # Positions 0..S-1 cut from the tables; the causal mask from a lower-triangular matrix.
    shape = node("Shape", ["input_ids"], "ids_shape")
    seq = node("Slice", [shape, "one1", "two1", "axis0"], "seq_len")
    node("Unsqueeze", [node("Slice", ["cos_table", "zero1", seq, "axis0"], "cos_p"), "axis0"],
         "cos_u")
    node("Unsqueeze", ["cos_u", "axis0"], "cos_s")
    node("Unsqueeze", [node("Slice", ["sin_table", "zero1", seq, "axis0"], "sin_p"), "axis0"],
         "sin_u")
    node("Unsqueeze", ["sin_u", "axis0"], "sin_s")
    square = node("Concat", [seq, seq], "mask_shape", axis=0)
    ones = node("ConstantOfShape", [square], "mask_ones",
                value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    lower = node("Trilu", [ones], "mask_lower", upper=0)
    # 0 where allowed, -1e9 above the diagonal.
    blocked = node("Sub", [node("Mul", [lower, "mask_big"], "mask_scaled"), "mask_big"], "mask")

    groups = config.heads // kv
    for i in range(config.layers):
        p = f"layers.{i}"
        normed = rms_norm(x, f"{p}.input_norm")
        q = node("MatMul", [normed, weight(f"{p}.q_proj", (h, h))], f"{p}.q")
        k = node("MatMul", [normed, weight(f"{p}.k_proj", (h, kv * hd))], f"{p}.k")
        v = node("MatMul", [normed, weight(f"{p}.v_proj", (h, kv * hd))], f"{p}.v")
        q = node("Transpose", [node("Reshape", [q, "q_shape"], f"{p}.q4")], f"{p}.qt",
                 perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, "kv_shape"], f"{p}.k4")], f"{p}.kt",
                 perm=[0, 2, 1, 3])
        v = node("Transpose", [node("Reshape", [v, "kv_shape"], f"{p}.v4")], f"{p}.vt",
                 perm=[0, 2, 1, 3])
        q, k = rotary(q, f"{p}.q_rope"), rotary(k, f"{p}.k_rope")
        if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads
            k = node("Reshape", [node("Tile", [node("Unsqueeze", [k, "two1"], f"{p}.k5"),
                                               f"{p}.rep"], f"{p}.k_tiled"), f"{p}.heads_shape"],
                     f"{p}.k_rep")
            v = node("Reshape", [node("Tile", [node("Unsqueeze", [v, "two1"], f"{p}.v5"),
                                               f"{p}.rep"], f"{p}.v_tiled"), f"{p}.heads_shape"],
                     f"{p}.v_rep")
            const(f"{p}.rep", np.array([1, 1, groups, 1, 1], np.int64))
            const(f"{p}.heads_shape", np.array([0, config.heads, -1, hd], np.int64))
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], f"{p}.kT",
                                                     perm=[0, 1, 3, 2])], f"{p}.qk"), "scale"],
                      f"{p}.scores")
        probs = node("Softmax", [node("Add", [scores, blocked], f"{p}.masked")], f"{p}.probs",
                     axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctx_t",
                       perm=[0, 2, 1, 3])
        merged = node("Reshape", [context, "merge_shape"], f"{p}.merged")
        attn = node("MatMul", [merged, weight(f"{p}.o_proj", (h, h), residual=True)], f"{p}.attn")
        x = node("Add", [x, attn], f"{p}.resid1")
        normed = rms_norm(x, f"{p}.post_norm")
        gate = node("MatMul", [normed, weight(f"{p}.gate_proj", (h, config.intermediate))],
                    f"{p}.gate")
        up = node("MatMul", [normed, weight(f"{p}.up_proj", (h, config.intermediate))], f"{p}.up")
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.gate_sig")], f"{p}.silu")
        down = node("MatMul", [node("Mul", [silu, up], f"{p}.swiglu"),
                               weight(f"{p}.down_proj", (config.intermediate, h),
                                      residual=True)], f"{p}.down")
        x = node("Add", [x, down], f"{p}.resid2")
    final = rms_norm(x, "final_norm")
    nodes.append(helper.make_node("Identity", [final], ["last_hidden_state"], name="hidden_out"))
    node("MatMul", [final, weight("lm_head", (h, config.vocab))], "logits")
    writer.close()

    graph = helper.make_graph(
        nodes, "llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                       ["batch", "sequence", h]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["batch", "sequence", config.vocab])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="onnxcomp.zoo.llama")
    model.ir_version = 8
    for key, value in vars(config).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"llama.{key}", str(value)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(model.SerializeToString())
    os.replace(tmp, path)
    return path


def prompts(config: LlamaConfig, count: int, length: int = 16, seed: int = 1) -> Dataset:
    """Token-id batches [1, length] (seeded)."""
    def make(i: int):
        rng = np.random.default_rng(seed * 7919 + i)
        return {"input_ids": rng.integers(1, config.vocab, size=(1, length)).astype(np.int64)}

    return Dataset(f"llama-prompts:{count}", count, make)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--init", choices=("scaled", "plain"), default="scaled")
    args = parser.parse_args()
    config = dataclasses.replace(PRESETS[args.preset], init=args.init)
    path = build(args.output, config)
    print(f"{path}: {config.parameter_count():,} parameters")


if __name__ == "__main__":
    main()
