"""Deployment targets as data: which runtime runs and times a model, the quantize defaults that
runtime implies, the modes it supports, and how the result is checked.

A target is a frozen ``Target``. ``compress --target NAME`` (``api.compress(target=NAME)``)
applies it: its ``overrides`` (``quantize.FIELD=VALUE``) go onto every quantize step *before* the
user's ``--set`` (so the user still has the last word), a quantize mode it does not support is a
``UserError``, and after the run ``check`` says what else the result must pass (OpenVINO must
compile it; TensorRT and QNN: structural checks of their documented rules, reported as notes;
ONNX Runtime Mobile: ``write_ort`` writes the ``.ort`` file and the reduced-operator config
beside the saved model and checks it loads and matches).

``ort-cpu`` is the quantize pass's defaults (its overrides are empty); it also appends the
``lower`` step after static int8 (``lowers``: MatMul + bias Add as ONNX Runtime's
MatMulIntegerToFloat), which the other targets refuse because their runtimes cannot run it.
The others are written from their runtimes' documentation and, for ``openvino``, from what its
CPU plugin was measured to run in int8 (``docs/targets.md``). What the quantize pass cannot do
yet for a target is said in ``missing``, not papered over (QNN's Q/DQ on normalization
weights), and a mode its runtime cannot run is refused with the reason (TensorRT has no
int8-dynamic).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.errors import InvalidOutput, UserError

DEFAULT = "ort-cpu"


@dataclass(frozen=True)
class Target:
    """One deployment target; every field is plain data the CLI, api and docs read."""

    name: str
    summary: str
    runtime: str  # "onnxruntime" or "openvino": the API that loads, runs and times the result
    provider: str  # ONNX Runtime provider short name (runtime.PROVIDERS) or the OpenVINO device
    modes: tuple[str, ...]  # quantize modes this target supports
    overrides: tuple[str, ...] = ()  # quantize.FIELD=VALUE, applied before the user's --set
    # more overrides where the recipe quantizes in static int8 (placement: op types, opset)
    int8_overrides: tuple[str, ...] = ()
    min_opset: int = 13  # per-channel DequantizeLinear needs opset 13
    quantized_ops: tuple[str, ...] = ("Conv", "MatMul", "Gemm")  # ops that get QDQ (int8)
    float_ops: str = "every other op (Add, normalizations, Softmax, pooling, ...)"
    activation_dtypes: tuple[str, ...] = ("uint8",)  # what the runtime takes for activations
    symmetric_activations: bool = False  # zero points must be 0
    weight_dtypes: tuple[str, ...] = ("int8",)
    # "onnxruntime": the ONNX Runtime CPU load every result gets; "openvino": also compiled by
    # OpenVINO's CPU plugin (when installed); "structural": the documented rules, as notes.
    check: str = "onnxruntime"
    rules: tuple[str, ...] = ()  # the runtime's documented rules this target encodes
    missing: tuple[str, ...] = ()  # what the quantize pass cannot do yet for this target
    # mode -> why this target refuses it (the UserError's reason)
    refused: tuple[tuple[str, str], ...] = ()
    supported_ops: tuple[str, ...] | None = None  # None: any op the runtime has
    contrib_ops: tuple[tuple[str, str], ...] = ()  # (domain, op) it runs beside supported_ops
    writes_ort: bool = False  # also write the .ort file (ONNX Runtime Mobile)
    # Append the ``lower`` step (ONNX Runtime CPU contrib ops) after a static int8 quantize.
    lowers: bool = False
    sources: tuple[str, ...] = ()


_TRT_DOC = ("https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/"
            "quantized-types-explicit-quantization.html")
_QNN_DOC = "https://onnxruntime.ai/docs/execution-providers/QNN-ExecutionProvider.html"
_OV_DOC = "https://docs.openvino.ai/2026/openvino-workflow/model-optimization.html"
_LPT_DOC = ("https://docs.openvino.ai/2026/api/c_cpp_api/"
            "group__ov__transformation__common__api.html")

# The QNN EP's "Supported ONNX operators" table (ai.onnx domain; onnxruntime-qnn docs).
QNN_OPS = (
    "Abs", "Add", "And", "ArgMax", "ArgMin", "Asin", "Atan", "AveragePool",
    "BatchNormalization", "Cast", "Ceil", "Clip", "Concat", "Conv", "ConvTranspose", "Cos",
    "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Einsum", "Elu", "Equal", "Exp",
    "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "HardSigmoid", "HardSwish", "Identity", "InstanceNormalization",
    "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "LogSoftmax", "LpNormalization", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mod", "Mul",
    "Neg", "NonZero", "Not", "Or", "PRelu", "Pad", "Pow", "QuantizeLinear", "Reciprocal",
    "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "Relu",
    "RMSNormalization", "Reshape", "Resize", "RoiAlign", "Round", "ScatterElements",
    "ScatterND", "Sigmoid", "Sign", "Sin", "Slice", "Softmax", "Softplus", "SpaceToDepth",
    "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile", "TopK",
    "Transpose", "Unsqueeze", "Upsample", "Where",
)

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target(
        "ort-cpu", "ONNX Runtime, CPU execution provider (the default: today's placement)",
        runtime="onnxruntime", provider="cpu",
        modes=("int8", "int8-dynamic", "int4", "fp16", "bf16"), lowers=True,
        rules=(("uint8 per-tensor activations, int8 symmetric per-channel weights: the QDQ "
                "pairs ONNX Runtime fuses into QLinearConv / QLinearMatMul / "
                "MatMulIntegerToFloat"),
               ("Conv outputs (and MatMuls feeding a bias Add) get an output QDQ so QLinear "
                "kernels chain"),
               ("after static int8, the 'lower' step writes a MatMul without an output QDQ and "
                "its bias Add as one MatMulIntegerToFloat (com.microsoft), which ONNX Runtime "
                "does not fuse from QDQ itself"))),
    Target(
        "openvino", "OpenVINO, CPU plugin (its low-precision transformations)",
        runtime="openvino", provider="CPU",
        modes=("int8", "int8-dynamic", "int4", "fp16", "bf16"),
        quantized_ops=("Conv", "ConvTranspose", "MatMul", "Gemm"), min_opset=14,
        float_ops="every other op, and attention's activation x activation MatMuls",
        # Measured (docs/targets.md): the CPU plugin runs Conv and MatMul in u8 from the QDQ on
        # their inputs alone; the extra output QDQ of ort-cpu is not fused into the kernel but
        # executed as Convert + Multiply/Subtract (PP-OCRv4 rec: 45 Converts, 44 extra
        # Eltwise ops, slower than float), and uint8 x uint8 activation MatMuls stay f32 behind
        # FakeQuantize nodes.
        overrides=("quantize.output_qdq=none", "quantize.activation_matmuls=false"),
        # ConvTranspose runs as an int8 Deconvolution from the QDQ on its input and weight
        # (PP-OCRv4 det: its two upsampling layers); opset 14 so that the quantize pass writes
        # HardSwish as the HardSwish op, which OpenVINO fuses: at opset 13 it writes
        # x * HardSigmoid(x), which the CPU plugin ran as 286 ops (69 f32 Reorders) against
        # 190, twice float's latency (PP-OCRv4 det, docs/targets.md).
        # Bias correction: OpenVINO's int8 kernels shift this layout's outputs by a mean error
        # that ONNX Runtime's do not show as much; taking each layer's (W_q - W) E[x] out of its
        # bias took PP-OCRv4 det's output cosine in OpenVINO from .950 to .996 (ONNX Runtime
        # .992 -> .996) at the same speed (docs/targets.md).
        # u8s8_overflow: ONNX Runtime's kernels' matter; OpenVINO's plugin runs its own, and
        # its measured layout is int8 weights (uint8 ones are not measured there).
        # SmoothQuant: MiniLM's LayerNorm outputs also feed the residual Add, so their
        # quantizers ran as 18 standalone f32 FakeQuantize ops; smoothing through a Mul (as
        # NNCF does) lets OpenVINO fuse the Mul into them and raised the sentence cosine.
        # Feature maps (conv_adds + signed_feature_maps): the pairs between a Conv and the
        # Adds / Muls / pooling / nearest Resizes after it, which OpenVINO folds into the Conv
        # only as the output's one reader and in signed int8: PP-OCRv4 det 0.507x -> 0.448x of
        # OpenVINO float (NNCF 0.452x), docs/targets.md.
        int8_overrides=("quantize.op_types=Conv,ConvTranspose,MatMul,Gemm",
                        "quantize.min_opset=14", "quantize.bias_correction=weights",
                        "quantize.smoothquant_alpha=0.5", "quantize.conv_adds=true",
                        "quantize.signed_feature_maps=true",
                        "quantize.integer_hardswish=false", "quantize.u8s8_overflow=none"),
        check="openvino",
        rules=(("QDQ (read as FakeQuantize) on the activation and weight inputs of Conv, "
                "ConvTranspose, MatMul and Gemm: the CPU plugin runs them as u8 x i8 kernels "
                "(Convolution, Deconvolution, FullyConnected)"),
               ("no QDQ on Conv and MatMul outputs for their own sake: a Q/DQ after an op is "
                "executed as Convert + Eltwise, not fused"),
               ("a conv net's feature maps between a Conv and the Add / Multiply / pooling / "
                "Resize / Concat after it: one QDQ pair, every reader (pooling too) reading it, "
                "symmetric int8 where the range is signed: folded into the Conv as int8 "
                "output, and those ops run in i8 (quantize.conv_adds, "
                "quantize.signed_feature_maps)"),
               ("a tensor only a quantized Concat reads has no pair of its own: OpenVINO moves "
                "the Concat's FakeQuantize onto each input, and a second one there is a second "
                "requantization"),
               ("HardSwish as one op (opset 14): its x * HardSigmoid(x) form is not fused and "
                "costs layout Reorders around every occurrence"),
               ("activation x activation MatMuls run int8 only with a signed (i8) second "
                "input")),
        missing=(("fidelity in OpenVINO itself: compress validates in ONNX Runtime and only "
                  "compiles the result in OpenVINO (benchmarks/targets.py compares outputs in "
                  "both, docs/targets.md)"),
                 ("signed int8 activations for the second input of attention MatMuls "
                  "(activation_dtype allows uint8 only), so they stay float")),
        sources=(_OV_DOC, _LPT_DOC)),
    Target(
        "tensorrt", "TensorRT explicit quantization (Q/DQ), via the TensorRT EP",
        runtime="onnxruntime", provider="tensorrt", modes=("int8", "int4", "fp16"),
        overrides=("quantize.int4_format=qdq", "quantize.int4_symmetric=true"),
        # Symmetric int8 activations (zero point 0) over the calibrated ranges; QDQ on every
        # input of a conv net's residual Adds (conv_adds) so they fuse into the Conv before
        # them; no uint8 weights (the u8s8 remedy is for ONNX Runtime's x86 kernels, not
        # TensorRT's) and HardSwish as TensorRT's own op, not ort-cpu's QLinearAdd/Mul form.
        int8_overrides=("quantize.activation_dtype=int8", "quantize.conv_adds=true",
                        "quantize.u8s8_overflow=none", "quantize.integer_hardswish=false"),
        activation_dtypes=("int8",), symmetric_activations=True,
        quantized_ops=("Conv", "MatMul", "Gemm"),
        float_ops="biases (TensorRT quantizes them), normalizations, Softmax; int4 is "
                  "weight-only",
        check="structural",
        rules=(("int8 Q/DQ are symmetric: zero points must be 0, activations signed int8 "
                "per tensor, weights int8 per channel (axis 0 of Conv, the output axis of "
                "MatMul/Gemm)"),
               ("Q/DQ on both inputs of residual Add so the Add fuses into the preceding "
                "Conv's int8 kernel"),
               "no Q/DQ on biases: TensorRT quantizes the bias itself",
               "weight-only int4: DequantizeLinear with block_size (opset 21) before MatMul"),
        missing=(("fidelity in TensorRT itself: compress validates in ONNX Runtime's CPU "
                  "provider, which runs the same Q/DQ math with its own kernels"),
                 "not measured: no GPU on this machine"),
        refused=(("int8-dynamic", "TensorRT has no dynamic (run-time) int8 quantization"),),
        sources=(_TRT_DOC,)),
    Target(
        "qnn", "Qualcomm QNN EP, HTP (NPU) backend",
        runtime="onnxruntime", provider="qnn", modes=("int8", "fp16"),
        # HTP has a quantized HardSwish of its own: ort-cpu's QLinearAdd + QLinearMul form of
        # it would only add ops.
        overrides=("quantize.output_qdq=all", "quantize.activation_matmuls=true",
                   "quantize.integer_hardswish=false"),
        # A fully quantized graph: every op reads a DequantizeLinear (quantize.every_op),
        # constants included, and GELU is the one op HTP has.
        # Gather tables too: HTP gathers from a per-tensor quantized table, not int8 rows
        # with a float scale each (constant_inputs quantizes the table).
        int8_overrides=("quantize.every_op=true", "quantize.constant_inputs=true",
                        "quantize.fuse_gelu=true", "quantize.embeddings=false",
                        "quantize.u8s8_overflow=none"),
        activation_dtypes=("uint8", "uint16"), weight_dtypes=("uint8", "int8"),
        float_ops="ops whose result is not float (ArgMax, comparisons), ops inside If/Loop "
                  "bodies, ranges that hold a mask (|x| >= 1e4)",
        check="structural", supported_ops=tuple(QNN_OPS),
        # What ONNX Runtime's own QNN preprocessing writes (quantization/execution_providers/
        # qnn/preprocess.py fuses Erf GELUs into it).
        contrib_ops=(("com.microsoft", "Gelu"),),
        rules=(("a fully quantized graph: uint8 or uint16 activations around every op, so that "
                "HTP runs it as one partition"),
               ("a MatMul with a rank-2 constant weight runs as QNN FullyConnected, which takes "
                "int8 per-channel weights (onnxruntime-qnn's MatMul op builder); a MatMul "
                "between activations as QNN MatMul: (uint8, uint8), (uint8, uint16), "
                "(uint16, uint8)"),
               ("16-bit activations (A16W8) with --set quantize.activation_dtype=uint16: "
                "uint16 Q/DQ at opset 21 over the calibrated ranges, int8 weights; 16-bit "
                "Sigmoid / Tanh outputs at QNN's fixed 1/65536 / 1/32768 scales"),
               ("constants the quantized ops read (Add/Mul operands, normalization scales and "
                "biases, Gather tables) behind DequantizeLinear: the activation type, "
                "normalization scales uint8, their biases int32 (quantize.constant_inputs)"),
               ("graph outputs written by a DequantizeLinear, so the op before them is in the "
                "quantized graph"),
               "GELU as one com.microsoft.Gelu (HTP has no Erf; quantize.fuse_gelu)",
               "static shapes only; no If/Loop",
               "ops outside the QNN EP's supported list fall back to the CPU EP"),
        missing=("not measured: no Qualcomm device here",),
        refused=(("int8-dynamic", "QNN HTP needs static quantization parameters"),
                 ("int4", ("int4 weights need QNN's LPBQ form, which the quantize pass does "
                          "not write"))),
        sources=(_QNN_DOC,)),
    Target(
        "ort-mobile", "ONNX Runtime Mobile: the .ort format and a reduced-operator config",
        runtime="onnxruntime", provider="cpu",
        modes=("int8", "int8-dynamic", "int4", "fp16"),
        writes_ort=True,
        rules=("the ort-cpu placement (mobile CPUs run the same QDQ fusions)",
               ("the .ort file and required_operators.config are written by the tools in the "
               "onnxruntime wheel (onnxruntime.tools.convert_onnx_models_to_ort)"))),
)}


def get(name: str | Target | None) -> Target:
    """The target called ``name`` (None: the default), else a ``UserError`` listing them."""
    if isinstance(name, Target):
        return name
    key = (name or DEFAULT).strip().lower()
    if key not in TARGETS:
        raise UserError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[key]


def check_modes(target: Target, modes: list[str]) -> None:
    """A quantize mode the target does not support is one ``UserError`` line saying why."""
    refused = dict(target.refused)
    for mode in modes:
        if mode in target.modes:
            continue
        why = refused.get(mode, f"it supports {', '.join(target.modes)}")
        raise UserError(f"target {target.name!r} does not support quantize mode {mode!r}: {why}")


def quantize_overrides(target: Target, user: list[str] | None,
                       modes: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The target's overrides first (with its ``int8_overrides`` when one of the recipe's
    quantize ``modes`` is static int8), then the user's (a later ``--set`` wins)."""
    implied = [*target.overrides, *(target.int8_overrides if "int8" in modes else ())]
    return [*implied, *(user or [])]


# ---------------------------------------------------------------------------------------------
# Structural checks of a target's documented rules (no device needed)

def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node values by name (not converted: weights stay bytes)."""
    found = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return found


def _quantize_nodes(graph: onnx.GraphProto, constants: dict[str, onnx.TensorProto]
                    ) -> list[tuple[onnx.NodeProto, np.ndarray | None]]:
    """Every QuantizeLinear (activations: weights are stored quantized, behind a DQ only) with
    its zero point (None when omitted: uint8 zero)."""
    found = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zero = None
            if len(node.input) > 2 and node.input[2] in constants:
                zero = numpy_helper.to_array(constants[node.input[2]])
            found.append((node, zero))
    return found


def placement_findings(model: onnx.ModelProto, target: Target) -> list[str]:
    """What in ``model`` breaks ``target``'s documented rules, one sentence each (empty: none
    found). Structural: it reads dtypes, zero points, op types and shapes, and computes
    nothing; ONNX Runtime loads the model once to tell which nodes fold away before a
    provider sees them (``folded_at_load``)."""
    target = get(target)
    graph = model.graph
    findings: list[str] = []
    constants = _constants(graph)
    quantizers = _quantize_nodes(graph, constants)
    dtypes = Counter("uint8" if zero is None else str(zero.dtype) for _, zero in quantizers)
    wrong = {d: n for d, n in dtypes.items() if d not in target.activation_dtypes}
    if wrong:
        findings.append(f"{sum(wrong.values())} activation QuantizeLinear node(s) of type "
                        f"{', '.join(sorted(wrong))}; {target.name} takes "
                        f"{', '.join(target.activation_dtypes)}")
    if target.symmetric_activations:
        nonzero = sum(1 for _, zero in quantizers if zero is not None and np.any(zero != 0))
        if nonzero:
            findings.append(f"{nonzero} activation QuantizeLinear node(s) with non-zero zero "
                            f"points; {target.name} needs symmetric quantization")
    # One ONNX Runtime load, only for the targets whose op list is checked (qnn).
    folded = folded_at_load(model) if target.supported_ops is not None else set()
    if target.supported_ops is not None:
        allowed = set(target.supported_ops) | {"Constant"}
        kept = [n for n in graph.node if n.name not in folded]
        outside = Counter(n.op_type for n in kept if n.domain in ("", "ai.onnx")
                          and n.op_type not in allowed)
        outside.update(n.op_type for n in kept if n.domain not in ("", "ai.onnx")
                       and (n.domain, n.op_type) not in target.contrib_ops)
        if outside:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(outside.items()))
            findings.append(f"ops outside {target.name}'s supported list (CPU fallback): {listed}")
    if target.name == "qnn":
        from onnxcomp.passes.quantize.every_op import tensor_types

        findings.extend(_qnn_findings(graph, constants, tensor_types(model), folded))
    if target.name == "tensorrt":
        findings.extend(_trt_findings(graph))
    return findings


def folded_at_load(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes that never reach an execution provider: ONNX Runtime folds them when
    it loads ``model`` (a Shape of a static tensor and the shape arithmetic after it, constant
    subgraphs; its basic graph optimizations run before any provider takes nodes). Read from
    the graph ONNX Runtime writes at that level; Q/DQ nodes, which it duplicates and renames,
    are left out. Where ONNX Runtime cannot load the model, the nodes whose inputs are all
    constants (transitively)."""
    import tempfile

    import onnxruntime as ort

    kept = None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as scratch:
        options.optimized_model_filepath = str(Path(scratch) / "basic.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
            optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
            kept = {node.name for node in optimized.graph.node}
        except Exception:  # noqa: BLE001 - ONNX Runtime's refusal is checked elsewhere
            kept = None
    skipped = ("QuantizeLinear", "DequantizeLinear", "Constant")
    if kept is not None:
        return {n.name for n in model.graph.node if n.op_type not in skipped
                and n.name not in kept}
    known = set(_constants(model.graph))
    folded: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in skipped and all(not i or i in known for i in node.input):
            folded.add(node.name)
            known.update(node.output)
    return folded


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _qnn_findings(graph: onnx.GraphProto, constants: dict[str, onnx.TensorProto],
                  types: dict[str, int], folded: set[str]) -> list[str]:
    """``types``: element types shape inference found; an op that reads only integer tensors
    (shape arithmetic) is not reading float activations; an untyped tensor counts as float
    (the safe side). ``folded``: nodes ONNX Runtime folds at load (``folded_at_load``)."""
    findings = []
    producers = _producers(graph)
    float_ops = Counter()
    int8_matmuls = 0
    quantized: set[str] = set()  # outputs of ops that run inside a QDQ node group
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant") or \
                node.name in folded:
            continue
        feeds = [producers.get(name) for name in node.input if name]
        if any(f is not None and f.op_type == "DequantizeLinear" for f in feeds) or (
                node.op_type in ("Relu", "Clip") and node.input[0] in quantized):
            quantized.update(node.output)  # Relu/Clip fuse into the op before them
        if node.op_type == "MatMul":
            for feed in feeds:
                if feed is not None and feed.op_type == "DequantizeLinear":
                    weight = constants.get(feed.input[0])
                    # A rank-2 constant weight makes the MatMul a QNN FullyConnected, which
                    # takes int8 per-channel weights; other ranks stay a QNN MatMul.
                    if weight is not None and weight.data_type == onnx.TensorProto.INT8 \
                            and len(weight.dims) > 2:
                        int8_matmuls += 1
                        break
        if node.output[0] not in quantized and any(
                name and name not in constants
                and types.get(name, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT
                for name in node.input):
            float_ops[node.op_type] += 1
    if int8_matmuls:
        findings.append(f"{int8_matmuls} MatMul(s) with int8 weights of rank > 2 (a QNN MatMul, "
                        "not FullyConnected): HTP MatMul takes uint8/uint16 inputs only")
    if any(n.op_type == "Erf" for n in graph.node):
        findings.append("Erf (HTP has none): GELUs written out with Erf stay on the CPU "
                        "(--set quantize.fuse_gelu=true fuses them into Gelu)")
    from onnxcomp.passes.quantize import constants as quantize_constants

    float_constants = quantize_constants.float_data_inputs(graph)
    if float_constants:
        listed = ", ".join(f"{node} <- {name}" for node, name in float_constants[:3])
        findings.append(f"{len(float_constants)} float constant(s) read as data by quantized "
                        f"ops ({listed}{' ...' if len(float_constants) > 3 else ''}): HTP needs "
                        "them through DequantizeLinear (quantize.constant_inputs)")
    float_outputs = [o.name for o in graph.output if o.name in producers
                     and producers[o.name].op_type != "DequantizeLinear"
                     and producers[o.name].output[0] in quantized]
    if float_outputs:
        findings.append(f"graph output(s) {', '.join(float_outputs[:3])} written by a quantized "
                        "op without a Q/DQ pair after it: that op runs outside HTP's quantized "
                        "graph")
    findings.extend(_fixed_16_bit_findings(graph, constants, producers))
    if float_ops:
        listed = ", ".join(f"{op} x{n}" for op, n in sorted(float_ops.items()))
        findings.append(f"ops reading float activations (not quantized: run outside HTP's "
                        f"quantized graph): {listed}")
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            findings.append(f"input {value.name!r} has dynamic dimensions: QNN needs static "
                            "shapes (fix them first)")
    return findings


def _fixed_16_bit_findings(graph: onnx.GraphProto, constants: dict[str, onnx.TensorProto],
                           producers: dict[str, onnx.NodeProto]) -> list[str]:
    """16-bit Sigmoid/Tanh outputs whose Q/DQ parameters are not the fixed ones QNN takes."""
    from onnxcomp.passes.quantize.activations import FIXED_16_BIT

    wrong = Counter()
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if source is None or source.op_type not in FIXED_16_BIT or len(node.input) < 3:
            continue
        scale, zero = (constants.get(name) for name in node.input[1:3])
        if scale is None or zero is None or zero.data_type != onnx.TensorProto.UINT16:
            continue
        want_scale, want_zero = FIXED_16_BIT[source.op_type]
        if not (np.isclose(float(numpy_helper.to_array(scale)), want_scale, rtol=1e-6, atol=0)
                and int(numpy_helper.to_array(zero)) == want_zero):
            wrong[source.op_type] += 1
    return [f"{n} 16-bit {op} output(s) not at QNN's fixed scale {FIXED_16_BIT[op][0]:.6g} / "
            f"zero point {FIXED_16_BIT[op][1]}" for op, n in sorted(wrong.items())]


def _trt_findings(graph: onnx.GraphProto) -> list[str]:
    producers = _producers(graph)
    findings = []
    unquantized_adds = 0
    for node in graph.node:
        if node.op_type != "Add":
            continue
        feeds = [producers.get(name) for name in node.input]
        from_conv = any(f is not None and f.op_type == "Conv" for f in feeds)
        if from_conv and not all(f is not None and f.op_type == "DequantizeLinear"
                                 for f in feeds):
            unquantized_adds += 1
    if unquantized_adds:
        findings.append(f"{unquantized_adds} residual Add(s) after a Conv without Q/DQ on both "
                        "inputs: TensorRT cannot fuse them into the int8 Conv")
    return findings


def describe(target: Target) -> list[str]:
    """The target as lines for reports and ``docs/targets.md``."""
    lines = [f"{target.name}: {target.summary}",
             f"  runs on: {target.runtime} ({target.provider}); modes: {', '.join(target.modes)}",
             f"  quantize overrides: {', '.join(target.overrides) or 'none (the defaults)'}",
             *([f"  static int8 also: {', '.join(target.int8_overrides)}"]
               if target.int8_overrides else []),
             f"  quantized: {', '.join(target.quantized_ops)}; float: {target.float_ops}"]
    lines += [f"  rule: {rule}" for rule in target.rules]
    lines += [f"  not implemented: {item}" for item in target.missing]
    return lines


# ---------------------------------------------------------------------------------------------
# ONNX Runtime Mobile: the .ort file and the reduced-operator config

def ort_paths(onnx_path: str | os.PathLike) -> tuple[Path, Path]:
    """Where ``write_ort`` puts OUT.ort and OUT.required_operators.config for OUT.onnx."""
    path = Path(onnx_path)
    return path.with_suffix(".ort"), path.with_suffix(".required_operators.config")


def write_ort(onnx_path: str | os.PathLike) -> tuple[Path, Path]:
    """Convert a saved model to ONNX Runtime's ``.ort`` format with the tool that ships in the
    onnxruntime wheel (``onnxruntime.tools.convert_onnx_models_to_ort``, fixed optimizations),
    next to it with the reduced-operator config (for a minimal ONNX Runtime build); then check
    that the ``.ort`` file loads and gives the ONNX model's outputs (``InvalidOutput`` if not).
    The tool's own progress output is swallowed; its errors are ``InvalidOutput``."""
    import contextlib
    import io
    import logging
    import shutil
    import tempfile

    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    source = Path(onnx_path).resolve()
    ort_path, config_path = ort_paths(source)
    with tempfile.TemporaryDirectory(prefix="onnxcomp-ort-") as tmp:
        log = io.StringIO()
        logging.disable(logging.INFO)  # the tool logs each file it writes at INFO
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                convert_onnx_models_to_ort(source, output_dir=Path(tmp),
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:
            raise InvalidOutput(f"ONNX Runtime's .ort converter refused {source.name}: "
                                f"{_first_line(exc)}") from exc
        finally:
            logging.disable(logging.NOTSET)
        made = sorted(Path(tmp).glob("*.ort"))
        configs = sorted(Path(tmp).glob("*.config"))
        if not made or not configs:
            raise InvalidOutput(f"ONNX Runtime's .ort converter wrote no .ort file for "
                                f"{source.name}: {_first_line(log.getvalue())}")
        shutil.move(str(made[0]), ort_path)
        # The config's header names the file it was generated from: the final name, not tmp.
        config_path.write_text(configs[0].read_text(encoding="utf-8").replace(
            str(made[0]), ort_path.name), encoding="utf-8")
    check_ort(source, ort_path)
    return ort_path, config_path


def check_ort(onnx_path: str | os.PathLike, ort_path: str | os.PathLike,
              tolerance: float = 1e-3) -> float:
    """The ``.ort`` file loads in ONNX Runtime and its outputs match the ONNX model's on random
    inputs (both sessions with ONNX Runtime's full optimizations): the largest difference, or
    ``InvalidOutput``."""
    import onnxruntime as ort

    from onnxcomp import calibration
    from onnxcomp.model import load

    model = load(onnx_path, load_weights=False)
    feeds = calibration.random_data(model, 1).make_batch(0)
    try:
        mobile = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidOutput(f"ONNX Runtime cannot load {ort_path}: {_first_line(exc)}") from exc
    full = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for got, want in zip(mobile.run(None, feeds), full.run(None, feeds)):
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            raise InvalidOutput(f"{ort_path}: output shape {got.shape}, the ONNX model gives "
                                f"{want.shape}")
        if got.size and np.issubdtype(got.dtype, np.number):
            diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            if diff > tolerance * max(1.0, scale):
                raise InvalidOutput(f"{ort_path}: outputs differ from the ONNX model's by "
                                    f"{diff:.3g}")
            worst = max(worst, diff)
    return worst


def _first_line(exc: BaseException | str) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else (type(exc).__name__ if isinstance(exc, BaseException) else "")
