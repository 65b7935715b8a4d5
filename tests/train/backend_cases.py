"""ONNX's backend node tests as the twin's op-level suite.

The onnx package defines one test case per op feature (``onnx/backend/test/case/node``): a
one-node model (or its function expansion), inputs and the expected outputs. Wheels that ship the
generated folders (``onnx/backend/test/data/node/test_*``) are read from disk; wheels without
them (onnx 1.23's) generate the same cases in memory with ``collect_testcases``.

Run as a script to print the per-op table: ``python tests/train/backend_cases.py``.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.train.ops_common import WIDENED

# Tolerances: rtol 1e-4 / atol 1e-5, looser for the 16-bit float types (float16 carries about
# 3 significant digits, bfloat16 about 2).
RTOL, ATOL = 1e-4, 1e-5
TOLERANCES = {"float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1e-2)}
# Cases whose expected values are themselves rounded: compared at the case's own tolerance.
OWN_TOLERANCE = {
    "test_averagepool_2d_ceil_last_window_starts_on_pad": "expected values written with 4 digits",
}


@dataclass
class Case:
    name: str
    model: onnx.ModelProto
    inputs: list
    outputs: list
    rtol: float
    atol: float

    @property
    def ops(self) -> set[str]:
        return {n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                for n in self.model.graph.node}

    @property
    def tensors_only(self) -> bool:
        values = [v.type for v in list(self.model.graph.input) + list(self.model.graph.output)]
        return all(t.HasField("tensor_type") for t in values)


def _folder() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "node")


def _read(path: str) -> np.ndarray:
    tensor = onnx.TensorProto()
    with open(path, "rb") as f:
        tensor.ParseFromString(f.read())
    return numpy_helper.to_array(tensor)


def _from_folder(folder: str) -> list[Case]:
    cases = []
    for case_dir in sorted(glob.glob(os.path.join(folder, "test_*"))):
        data = os.path.join(case_dir, "test_data_set_0")
        model = onnx.load(os.path.join(case_dir, "model.onnx"))
        if not os.path.isdir(data):
            continue
        inputs = [_read(p) for p in sorted(glob.glob(os.path.join(data, "input_*.pb")),
                                           key=_index)]
        outputs = [_read(p) for p in sorted(glob.glob(os.path.join(data, "output_*.pb")),
                                            key=_index)]
        cases.append(Case(os.path.basename(case_dir), model, inputs, outputs, 1e-3, 1e-7))
    return cases


def _index(path: str) -> int:
    return int(os.path.basename(path).split("_")[1].split(".")[0])


@lru_cache(maxsize=1)
def node_cases() -> tuple[Case, ...]:
    folder = _folder()
    if os.path.isdir(folder) and glob.glob(os.path.join(folder, "test_*")):
        return tuple(_from_folder(folder))
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators' own numpy overflow warnings
        generated = node.collect_testcases(None)
    cases = []
    for case in generated:
        if case.kind != "node" or not case.data_sets:
            continue
        inputs, outputs = case.data_sets[0]
        cases.append(Case(case.name, case.model, list(inputs), list(outputs),
                          case.rtol, case.atol))
    return tuple(cases)


def as_array(value) -> np.ndarray:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def compare(case: Case, got: dict, names: list[str]) -> None:
    """Every expected output matches: integers and booleans exactly, floats within tolerance."""
    for name, expected in zip(names, case.outputs):
        expected = as_array(expected)
        actual = np.asarray(got[name])
        assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
        if expected.dtype.name in WIDENED:  # int4 & co. are held in a wider integer type
            expected = expected.astype(WIDENED[expected.dtype.name])
        if expected.dtype.kind in "iub":
            assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} != {expected.dtype}"
            np.testing.assert_array_equal(actual, expected, err_msg=name)
            continue
        assert actual.dtype == expected.dtype, f"{name}: {actual.dtype} != {expected.dtype}"
        rtol, atol = TOLERANCES.get(expected.dtype.name, (RTOL, ATOL))
        if case.name in OWN_TOLERANCE:
            rtol, atol = case.rtol, case.atol
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                                   rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


def run_case(case: Case) -> None:
    import torch

    from onnxcomp.model import Model
    from onnxcomp.train import Twin
    from onnxcomp.train.ops_common import to_numpy

    twin = Twin(Model(case.model))
    names = [i.name for i in case.model.graph.input]
    feeds = {name: as_array(value) for name, value in zip(names, case.inputs)}
    outputs = [o.name for o in case.model.graph.output]
    with torch.no_grad():
        got = twin.run(feeds, outputs)
    compare(case, {k: to_numpy(v) for k, v in got.items()}, outputs)


def sweep() -> tuple[Counter, Counter, dict[str, str]]:
    """Run every case whose ops are all supported: passes per op, totals per op, failures."""
    from onnxcomp.train.ops import supported_ops

    supported = set(supported_ops())
    passed, total, failures = Counter(), Counter(), {}
    for case in node_cases():
        if not case.ops <= supported or not case.tensors_only:
            continue
        for op in case.ops:
            total[op] += 1
        try:
            run_case(case)
        except Exception as exc:  # noqa: BLE001 - a sweep records every kind of failure
            failures[case.name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            continue
        for op in case.ops:
            passed[op] += 1
    return passed, total, failures


if __name__ == "__main__":
    passed, total, failures = sweep()
    for op in sorted(total):
        print(f"{op:28s} {passed[op]:4d} / {total[op]:4d}")
    print(f"cases passed: {sum(1 for _ in failures) and ''}", end="")
    for name, reason in sorted(failures.items()):
        print(f"FAIL {name}: {reason}")
