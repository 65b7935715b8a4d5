"""The quantize pass's configuration: one frozen dataclass that checks itself.

Values from TOML recipes and ``--set quantize.FIELD=VALUE`` reach it through
``onnxcomp.recipe.coerce``, which converts them by the annotations below (``exclude=a,b`` becomes
a tuple, ``block_size = 32.0`` is refused); ``__post_init__`` then checks the ranges and choices.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp.passes.quantize.activations import DTYPES as ACTIVATION_DTYPES
from onnxcomp.passes.quantize.calib import METHODS
from onnxcomp.passes.quantize.int4 import SCALE_RULES
from onnxcomp.pipeline import option

NAME = "quantize"
INTEGER_MODES = ("int8", "int8-dynamic", "int4")
HALF_MODES = ("fp16", "bf16")
MODES = INTEGER_MODES + HALF_MODES
DEFAULT_OP_TYPES = {"int8": ("Conv", "MatMul", "Gemm"), "int8-dynamic": ("MatMul", "Gemm"),
                    "int4": ("MatMul", "Gemm"), "fp16": ("*",), "bf16": ("*",)}
BLOCK_SIZES = (16, 32, 64, 128, 256)
BIAS_CORRECTIONS = ("none", "weights", "all")
# The int8 modes' default SmoothQuant on transformers: each tensor's alpha chosen on the
# calibration data, every MatMul input (held-out MiniLM sentence cosine, int8-dynamic 0.9938 ->
# 0.9985, static int8 0.9936 -> 0.9978; docs/quantize.md).
DYNAMIC_SMOOTHQUANT = ("auto", "all")


@dataclass(frozen=True)
class Config:
    mode: str = option("int8", "int8 (static QDQ, calibrated) | int8-dynamic | int4 (weight-only) "
                               "| fp16 (half compute) | bf16 (bfloat16 weights)")
    calibration: str = option("mse", "int8 activation ranges: minmax | percentile | entropy | mse")
    percentile: float = option(99.99, "calibration = percentile: the percentile kept, in (50, 100]")
    op_types: tuple[str, ...] | None = option(
        None, "op types to quantize (none: the mode's default, Conv/MatMul/Gemm or MatMul/Gemm)")
    exclude: tuple[str, ...] = option((), "node names, op types or fnmatch patterns left float")
    per_channel: bool = option(True, "one weight scale per output channel (else per tensor)")
    activation_dtype: str = option("uint8", "static int8 activations: uint8 (asymmetric, the "
                                            "fast ONNX Runtime CPU path) | int8 (symmetric, zero "
                                            "point 0: TensorRT's explicit quantization) | uint16 "
                                            "(QNN HTP's 16-bit activations, opset 21)")
    output_qdq: str = option("conv", "int8: also QDQ the outputs of none | conv (Conv, and "
                                     "MatMuls feeding a bias Add that ONNX Runtime would "
                                     "otherwise fuse into a float Gemm) | conv-only | all sites")
    block_size: int = option(32, "int4: rows per block sharing a scale (16, 32, 64, 128, 256)")
    int4_format: str = option("matmulnbits", "int4: com.microsoft.MatMulNBits | qdq (opset 21)")
    int4_symmetric: bool = option(True, "int4: symmetric blocks (no zero points)")
    int4_scale: str = option("mse", "int4 per-block scale: mse (least squared error) | max "
                                    "(no clipping)")
    int4_method: str = option("rtn", "int4: rtn (round to nearest) | gptq (error compensation "
                                     "from calibration data)")
    int8_method: str = option("rtn", "int8 / int8-dynamic MatMul/Gemm weights (and static "
                                     "int8's pointwise Convs): rtn (round to "
                                     "nearest) | gptq (error compensation on calibration data, "
                                     "per channel)")
    min_cosine: float | None = option(None, "model output cosine to meet: int8 keeps the most "
                                            "harmful layers float, int4 raises groups to 8 bits")
    keep_float_by: str = option("harm", "int8: which layers return to float first (min_cosine): "
                                        "harm (the most harmful alone) | latency (harm per "
                                        "millisecond its int8 form saves, from ONNX Runtime's "
                                        "profiler on this model; layers slower in int8 always "
                                        "stay float)")
    smoothquant_alpha: float | str | None = option(
        None, "SmoothQuant migration strength in [0, 1], or auto (per tensor, the alpha with "
              "the least quantized-MatMul error on the calibration data); none: off, but see "
              "dynamic_smoothquant and static_smoothquant")
    smoothquant_inputs: str = option("norm", "SmoothQuant on: norm (LayerNormalization outputs, "
                                             "folded into gamma/beta where only MatMuls read "
                                             "them) | all (also every other MatMul input, "
                                             "through a Mul)")
    # int8-dynamic quantizes each activation with one scale per tensor at run time, so the few
    # large channels of a transformer's LayerNormalization output cost every other channel its
    # levels; MiniLM held-out sentence cosine 0.9938 -> 0.9985 (docs/quantize.md).
    dynamic_smoothquant: bool = option(True, "int8-dynamic with calibration data and "
                                             "smoothquant_alpha unset: SmoothQuant with alpha "
                                             "auto on every MatMul input")
    # Static int8 the same way, on transformers only (a planned MatMul reads a
    # LayerNormalization): MiniLM held-out cosine 0.9936 -> 0.9978, nearest-neighbour agreement
    # .953 both, where NNCF's int8 of the same file and data gives 0.9960 (docs/quantize.md).
    static_smoothquant: bool = option(True, "int8 on a transformer with smoothquant_alpha "
                                            "unset: SmoothQuant with alpha auto on every "
                                            "MatMul input")
    # Off by default: the ablation (benchmarks/quantize_ablation.py) measures both.
    equalize: bool = option(False, "cross-layer equalization of Conv -> Relu/LeakyRelu/PRelu/"
                                   "none -> Conv chains before quantizing (an exact float "
                                   "rewrite)")
    depthwise_equalize: bool = option(True, "int8 with per-channel weights: give each input "
                                            "channel of a depthwise Conv the same range, the "
                                            "inverse moved into its weights (an exact float "
                                            "rewrite, measured on the calibration data)")
    range_search: bool = option(False, "static int8: after calibration, scale each activation "
                                       "range by the factor (0.7-1.4) that lowers the model "
                                       "output error against float on the calibration data "
                                       "(loss-aware; fits that data's distribution)")
    u8s8_overflow: str = option("auto", "int8 modes: which layers get a remedy (u8s8_remedy) "
                                        "for uint8 x int8 pair sums that overflow int16, where "
                                        "x86 CPUs without VNNI saturate: auto (the most "
                                        "saturating on the calibration data) | all | none")
    u8s8_remedy: str = option("auto", "how u8s8_overflow fixes a layer: scale (widen the int8 "
                                      "weight scale in the channels whose pairs can overflow, "
                                      "keeping the faster u8 x s8 kernels) | u8u8 (uint8 "
                                      "weights: exact, slower) | auto (scale while the model "
                                      "output stays as close to float, else u8u8)")
    bias_correction: str = option("none", "take each layer's quantization error mean out of "
                                          "its bias (needs calibration data): none | weights "
                                          "((W_q - W) E[x]) | all (static int8: also the "
                                          "inputs' rounding and clipping)")
    fold: bool = option(True, "int8: first fold BatchNormalization and constant Mul/Add after "
                              "Convs (and before pointwise Convs) into them and write HardSwish "
                              "as one op, raising the opset to 14 for it (exact float rewrites: "
                              "fewer float ops between integer kernels)")
    embeddings: bool = option(True, "Gather tables as int8 rows, one scale per row (every mode)")
    attention: bool = option(True, "int8-dynamic: fused com.microsoft.Attention -> QAttention")
    min_opset: int | None = option(None, "raise the model to at least this opset before "
                                         "quantizing (openvino: 14, so HardSwish is written as "
                                         "the one op OpenVINO fuses)")
    every_op: bool = option(False, "int8: QDQ on the float activation inputs of every op and "
                                   "on the graph outputs, a fully quantized graph (an NPU such "
                                   "as QNN's HTP runs it as one partition); value-moving ops "
                                   "share their input's range")
    constant_inputs: bool = option(False, "int8 with every_op: the float constants quantized "
                                          "ops read as data (Add/Mul operands, normalization "
                                          "scales and biases, Gather tables) stored quantized "
                                          "behind a DequantizeLinear, as QNN's HTP needs")
    fuse_gelu: bool = option(False, "int8: the Erf form of GELU (x * 0.5 * (1 + erf(x / "
                                    "sqrt 2))) fused into one com.microsoft.Gelu before "
                                    "placing pairs (QNN's HTP runs Gelu, not Erf)")
    conv_adds: bool = option(True, "int8: QDQ on a conv net's feature-map Adds (residual, "
                                   "pyramid), squeeze-excitation Muls and Concats, and nearest "
                                   "Resizes between them sharing one range, so ONNX Runtime "
                                   "runs QLinearAdd / QLinearMul / QLinearConcat and uint8 Resize")
    saturation_ranges: bool = option(True, "int8: a tensor only saturating ops read (HardSwish "
                                           "below -3, HardSigmoid, Relu, Clip) is calibrated "
                                           "as clipped at their bounds (exact: the readers' "
                                           "outputs are the same past them)")
    integer_hardswish: bool = option(True, "int8: a HardSwish between a DequantizeLinear and a "
                                           "QuantizeLinear becomes QLinearAdd + QLinearMul "
                                           "(x * clip(x/6 + 1/2, 0, 1) on uint8) instead of "
                                           "four float passes")
    # Off by default (ONNX Runtime's feature-map kernels take uint8); the openvino target's.
    signed_feature_maps: bool = option(False, "int8: pooling and nearest-Resize readers of a "
                                              "quantized tensor read its DequantizeLinear "
                                              "(a Resize gets a copy of its output's pair), "
                                              "and QDQ pairs no Conv/"
                                              "MatMul reads take symmetric int8 where their "
                                              "range is signed (what OpenVINO folds into the "
                                              "producing Conv)")
    # Off by default: not faster on PP-OCR rec, slower on MiniLM at 128 tokens.
    activation_matmuls: bool = option(False, "int8: QDQ on both inputs of activation x "
                                             "activation MatMuls too (-> QLinearMatMul)")

    def __post_init__(self) -> None:
        for name in ("op_types", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or (value is None and name == "exclude"):
                raise ValueError(f"{name} must be a tuple of names or patterns, got {value!r}")
            if value is not None:  # a list (Python callers) becomes the declared tuple
                object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.calibration not in METHODS:
            raise ValueError(f"calibration must be one of {', '.join(METHODS)}, "
                             f"got {self.calibration!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.op_types is not None and not self.op_types:
            raise ValueError("op_types must name at least one op type")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"activation_dtype must be uint8, int8 or uint16, got "
                             f"{self.activation_dtype!r}")
        if self.activation_dtype != "uint8" and self.mode == "int8-dynamic":
            raise ValueError(f"activation_dtype = {self.activation_dtype} is static int8's: "
                             f"int8-dynamic's DynamicQuantizeLinear writes uint8 only")
        if self.min_opset is not None and (isinstance(self.min_opset, bool)
                                           or not 10 <= self.min_opset <= 23):
            raise ValueError(f"min_opset must be in [10, 23], got {self.min_opset!r}")
        if self.keep_float_by not in ("harm", "latency"):
            raise ValueError(f"keep_float_by must be harm or latency, got {self.keep_float_by!r}")
        if self.output_qdq not in ("none", "conv", "conv-only", "all"):
            raise ValueError(f"output_qdq must be none, conv, conv-only or all, got "
                             f"{self.output_qdq!r}")
        if (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                or self.block_size not in BLOCK_SIZES):
            raise ValueError(f"block_size must be 16, 32, 64, 128 or 256, got {self.block_size!r}")
        if self.int4_scale not in SCALE_RULES:
            raise ValueError(f"int4_scale must be one of {', '.join(SCALE_RULES)}, "
                             f"got {self.int4_scale!r}")
        if self.int4_method not in ("rtn", "gptq"):
            raise ValueError(f"int4_method must be rtn or gptq, got {self.int4_method!r}")
        if self.int8_method not in ("rtn", "gptq"):
            raise ValueError(f"int8_method must be rtn or gptq, got {self.int8_method!r}")
        if self.int8_method == "gptq" and not self.per_channel:
            raise ValueError("int8_method = gptq needs per_channel = true (its grid is one "
                             "scale per output channel)")
        if self.int4_format not in ("matmulnbits", "qdq"):
            raise ValueError(f"int4_format must be matmulnbits or qdq, got {self.int4_format!r}")
        if self.min_cosine is not None and not -1.0 <= float(self.min_cosine) <= 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(f"bias_correction must be one of {', '.join(BIAS_CORRECTIONS)}, "
                             f"got {self.bias_correction!r}")
        if self.u8s8_overflow not in ("auto", "all", "none"):
            raise ValueError(f"u8s8_overflow must be auto, all or none, got "
                             f"{self.u8s8_overflow!r}")
        if self.u8s8_remedy not in ("auto", "scale", "u8u8"):
            raise ValueError(f"u8s8_remedy must be auto, scale or u8u8, got "
                             f"{self.u8s8_remedy!r}")
        if self.smoothquant_inputs not in ("norm", "all"):
            raise ValueError(f"smoothquant_inputs must be norm or all, got "
                             f"{self.smoothquant_inputs!r}")
        alpha = self.smoothquant_alpha
        if alpha is not None and alpha != "auto" and (isinstance(alpha, (str, bool)) or
                                                      not 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"smoothquant_alpha must be in [0, 1] or auto, got {alpha!r}")
        for name in ("per_channel", "int4_symmetric", "embeddings", "attention",
                     "activation_matmuls", "equalize", "fold", "depthwise_equalize",
                     "dynamic_smoothquant", "static_smoothquant", "conv_adds", "every_op",
                     "constant_inputs", "fuse_gelu", "saturation_ranges", "integer_hardswish", "signed_feature_maps",
                     "range_search"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.constant_inputs and not self.every_op:
            raise ValueError("constant_inputs needs every_op (it completes a fully quantized "
                             "graph)")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        mode = arg or "int8"
        if mode not in MODES:
            raise ValueError(f"quantize mode must be one of {', '.join(MODES)}, got {mode!r}")
        return cls(mode=mode)

    @property
    def ops(self) -> tuple[str, ...]:
        return self.op_types or DEFAULT_OP_TYPES[self.mode]

    @property
    def gptq(self) -> bool:
        return self.mode == "int4" and self.int4_method == "gptq"

    def smoothing(self, has_calibration: bool) -> tuple[float | str, str] | None:
        """The SmoothQuant to apply, ``(alpha, inputs)``: the ``smoothquant_*`` fields when
        ``smoothquant_alpha`` is set, else the int8 modes' default when calibration data is
        there (applied to transformers only, ``apply`` checks), else None (off)."""
        if self.smoothquant_alpha is not None:
            alpha = self.smoothquant_alpha
            return (alpha if alpha == "auto" else float(alpha)), self.smoothquant_inputs
        if self.mode == "int8-dynamic" and self.dynamic_smoothquant and has_calibration:
            return DYNAMIC_SMOOTHQUANT
        if self.mode == "int8" and self.static_smoothquant and has_calibration:
            return DYNAMIC_SMOOTHQUANT
        return None

    @property
    def int8_gptq(self) -> bool:
        return self.mode in ("int8", "int8-dynamic") and self.int8_method == "gptq"

    def needs_calibration(self) -> str | bool:
        """What reads calibration data, for the refusal message: static int8 (activation
        ranges), SmoothQuant, GPTQ (int4, int8) and bias correction; False when nothing does."""
        if self.mode == "int8":
            return "int8 (static activation ranges)"
        if self.gptq:
            return "int4 with GPTQ"
        if self.int8_gptq:
            return f"{self.mode} with GPTQ"
        if self.smoothquant_alpha is not None:
            return f"{self.mode} with smoothquant"
        if self.bias_correction != "none":
            return f"{self.mode} with bias_correction"
        return False
