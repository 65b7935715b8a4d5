"""The op table against ONNX's own backend node tests (one case per op feature, expected outputs
computed by ONNX's reference).

Every case whose ops are all in the table runs. A case the twin legitimately can't run is listed
below with its reason and must be refused loudly (``Unsupported``, naming node and feature),
never skipped in silence; a listed case that starts to pass fails here so the list stays true.
Per-op counts: ``python tests/train/backend_cases.py``.
"""

from __future__ import annotations

import onnx
import pytest

torch = pytest.importorskip("torch")

from train import backend_cases

from onnxcomp.model import Model
from onnxcomp.train import Twin
from onnxcomp.train.ops import supported_ops
from onnxcomp.train.ops_common import Unsupported
from onnxcomp.train.twin import WIDENED_OK

T = onnx.TensorProto
# Element types torch has no kernels for: float8 and float4 variants, uint32/uint64, strings;
# the 2- and 4-bit integers and uint16 are held widened, exact only in quantize/dequantize and
# data movement (WIDENED_OK).
NO_TORCH_TYPE = {T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ,
                 T.FLOAT4E2M1, T.FLOAT8E8M0, T.UINT32, T.UINT64, T.STRING}
WIDENED_ONLY_IN_QDQ = {T.INT4, T.UINT4, T.INT2, T.UINT2, T.UINT16}

RANDOM_MASK = "Dropout training_mode with ratio > 0 draws a random mask"
KNOWN_UNSUPPORTED = {
    "test_resize_downsample_scales_cubic_antialias": "Resize antialias=1",
    "test_resize_downsample_scales_linear_antialias": "Resize antialias=1",
    "test_resize_downsample_sizes_cubic_antialias": "Resize antialias=1",
    "test_resize_downsample_sizes_linear_antialias": "Resize antialias=1",
    "test_training_dropout": RANDOM_MASK,
    "test_training_dropout_default": RANDOM_MASK,
    "test_training_dropout_default_mask": RANDOM_MASK,
    "test_training_dropout_mask": RANDOM_MASK,
}


def _types(case: backend_cases.Case) -> set[int]:
    graph = case.model.graph
    found = {v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name in ("to", "output_dtype"):
                found.add(attribute.i)
            if attribute.type == onnx.AttributeProto.TENSOR:
                found.add(attribute.t.data_type)
    return found


def unsupported_reason(case: backend_cases.Case) -> str | None:
    if case.name in KNOWN_UNSUPPORTED:
        return KNOWN_UNSUPPORTED[case.name]
    types = _types(case)
    missing = types & NO_TORCH_TYPE
    if missing:
        return "element type " + ", ".join(T.DataType.Name(t) for t in sorted(missing))
    widened = types & WIDENED_ONLY_IN_QDQ
    cast_to = {a.i for n in case.model.graph.node for a in n.attribute if a.name == "to"}
    if widened and (not case.ops <= WIDENED_OK or cast_to & WIDENED_ONLY_IN_QDQ):
        return "element type " + ", ".join(T.DataType.Name(t) for t in sorted(widened)) + \
            " outside quantize/dequantize and data movement"
    return None


SUPPORTED = set(supported_ops())
CASES = [c for c in backend_cases.node_cases() if c.ops <= SUPPORTED and c.tensors_only]


@pytest.mark.parametrize("case", [c for c in CASES if unsupported_reason(c) is None],
                         ids=lambda c: c.name)
def test_backend_case(case):
    backend_cases.run_case(case)


@pytest.mark.parametrize("case", [c for c in CASES if unsupported_reason(c) is not None],
                         ids=lambda c: c.name)
def test_known_unsupported_case_is_refused_loudly(case):
    with pytest.raises(Unsupported, match="not supported"):
        backend_cases.run_case(case)


def test_every_listed_case_exists():
    names = {c.name for c in CASES}
    assert set(KNOWN_UNSUPPORTED) <= names


def test_most_ops_are_covered_by_backend_cases():
    covered = {op for c in CASES if unsupported_reason(c) is None for op in c.ops}
    # Ops with no runnable backend case are tested elsewhere (MatMulNBits: against ONNX
    # Runtime in test_twin.py).
    assert SUPPORTED - covered <= {"com.microsoft:MatMulNBits"}, sorted(SUPPORTED - covered)


def test_a_refusal_names_node_and_feature():
    case = next(c for c in CASES if c.name == "test_resize_downsample_scales_linear_antialias")
    with pytest.raises(Unsupported, match="Resize node .*antialias=1 is not supported"):
        Twin(Model(case.model)).run(
            {i.name: backend_cases.as_array(v) for i, v in zip(case.model.graph.input,
                                                              case.inputs)})
