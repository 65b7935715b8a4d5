"""Property-based tests (hypothesis): random small graphs through every pass that runs without
torch, each through the Pipeline (``spec.run``: plan, then apply).

For every drawn graph (a chain of MatMul/Gemm/Relu/residual blocks, or of Conv 1x1/3x3, BN,
Relu and residual blocks; widths 4..32; random seeds) and every pass configuration below:

- the input model is not mutated (its serialization is byte-identical before and after);
- the output passes onnx.checker and loads in ONNX Runtime;
- the outputs keep their names, shapes and dtypes, and stay within the pass's stated tolerance
  (see ``CASES``: each tolerance says why it is what it is);
- a second run on the pass's own output is idempotent in the way that pass promises.

CI budget: ``ONNXCOMP_HYPOTHESIS_EXAMPLES`` examples per case (default 15, derandomized so CI
is reproducible). For a long run that draws fresh graphs each time (skipped otherwise)::

    ONNXCOMP_HYPOTHESIS_LONG=1 ONNXCOMP_HYPOTHESIS_EXAMPLES=300 \
        python -m pytest -q tests/passes/test_properties.py -m slow
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import builders
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.measure.compare import per_sample_cosine
from onnxcomp.model import Model
from onnxcomp.passes import PASSES
from onnxcomp.pipeline import Context, PassRecord

EXAMPLES = int(os.environ.get("ONNXCOMP_HYPOTHESIS_EXAMPLES", "15"))
CI = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LONG = settings(CI, max_examples=max(EXAMPLES, 200), derandomize=False)

CALIBRATION_BATCHES = 8
EVALUATION_BATCHES = 4
BATCH = 4  # rows per batch of the dense chains (conv chains have a fixed batch of 1)


# --- the graphs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainSpec:
    """A drawn graph, as data (hypothesis prints this on a failure: rebuild it with
    ``builders.chain(spec.layers, spec.in_width, spec.out_width, spec.seed, spec.conv)``)."""

    layers: tuple[builders.Layer, ...]
    in_width: int
    out_width: int
    seed: int
    conv: bool

    def build(self) -> Model:
        return builders.chain(self.layers, self.in_width, self.out_width, self.seed, self.conv)


WIDTHS = st.integers(4, 32)


@st.composite
def layers(draw, conv: bool) -> builders.Layer:
    kind = draw(st.sampled_from(builders.CONV_KINDS if conv else builders.DENSE_KINDS))
    sized = kind in ("matmul", "gemm", "conv1", "conv3")
    return builders.Layer(kind, draw(WIDTHS) if sized else 0)


@st.composite
def chains(draw) -> ChainSpec:
    conv = draw(st.booleans())
    return ChainSpec(tuple(draw(st.lists(layers(conv), min_size=1, max_size=5))),
                     draw(WIDTHS), draw(WIDTHS), draw(st.integers(0, 2**16)), conv)


# --- checks shared by every pass -----------------------------------------------------------------


def outputs(model: Model, data: calibration.Dataset) -> list[dict[str, np.ndarray]]:
    session = runtime.session(model, optimize=False)
    return [runtime.run(session, batch) for batch in data]


def max_relative_error(reference: list[dict[str, np.ndarray]],
                       candidate: list[dict[str, np.ndarray]]) -> float:
    """max |ref - cand| / max |ref| over every output of every batch."""
    worst = 0.0
    for ref, cand in zip(reference, candidate):
        for name in ref:
            a, b = ref[name].astype(np.float64), cand[name].astype(np.float64)
            worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)))
    return worst


def check_valid(model: Model) -> None:
    onnx.checker.check_model(model.proto)
    runtime.session(model, optimize=False)  # raises UserError if ONNX Runtime refuses it


def check_signature(before: list[dict[str, np.ndarray]], after: list[dict[str, np.ndarray]]
                    ) -> None:
    for ref, cand in zip(before, after):
        assert sorted(ref) == sorted(cand)
        for name in ref:
            assert cand[name].shape == ref[name].shape, name
            assert cand[name].dtype == ref[name].dtype, name
            assert np.isfinite(cand[name]).all(), name


def serialized(model: Model) -> bytes:
    return model.proto.SerializeToString(deterministic=True)


# --- what each pass promises ---------------------------------------------------------------------


@dataclass
class Run:
    """One pass run on one graph: the teacher, the result and the data around it."""

    teacher: Model
    model: Model
    record: PassRecord
    ctx: Context
    calibration: calibration.Dataset
    evaluation: calibration.Dataset
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """A pass configuration, its numerical promise and its idempotence promise."""

    id: str
    pass_name: str
    short: str | None = None
    overrides: dict = field(default_factory=dict)
    # (run, teacher outputs, student outputs) -> None; asserts the pass's tolerance
    tolerance: Callable[[Run, list, list], None] | None = None
    # run -> None; runs the pass again on its output and asserts what it promises
    again: Callable[[Run], None] | None = None
    # passes run first, in the same context (distill repairs what prune changed): (name,
    # short form) or (name, short form, {field: value})
    before: tuple[tuple, ...] = ()

    def config(self):
        spec = PASSES[self.pass_name]
        base = spec.config_type.from_short(self.short)
        return type(base)(**{**vars(base), **self.overrides}) if self.overrides else base


def exact(run: Run, teacher: list, student: list) -> None:
    # cleanup rewrites without changing the function (constant folding through ONNX Runtime in
    # float32, Identity removal): only float rounding of folded constants may differ.
    assert max_relative_error(teacher, student) <= 1e-5


def relative_l2(reference: list[dict[str, np.ndarray]], candidate: list[dict[str, np.ndarray]]
                ) -> float:
    """||ref - cand|| / ||ref|| over every output of every batch, flattened together.

    Per-sample cosines are no measure on random graphs: a narrow Relu bottleneck gives some
    samples an all-zero output, where any error makes the cosine 0."""
    names = sorted(reference[0])
    a = np.concatenate([r[n].ravel() for r in reference for n in names]).astype(np.float64)
    b = np.concatenate([c[n].ravel() for c in candidate for n in names]).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))


def relative_error_at_most(bound: float) -> Callable[[Run, list, list], None]:
    """Measured on the calibration data: static int8 fits its activation ranges there, and a
    held-out sample beyond them is clipped by design (how well 32 rows of calibration data
    generalize is a question about the data, not a property of the pass)."""
    def check(run: Run, teacher: list, student: list) -> None:
        error = relative_l2(outputs(run.teacher, run.calibration),
                            outputs(run.model, run.calibration))
        assert error <= bound, f"relative L2 error {error:.4f} > {bound}"
    return check


def same_as_its_input(run: Run, teacher: list, student: list) -> None:
    # lower rewrites a static-int8 MatMul + bias Add as one MatMulIntegerToFloat: the same
    # integer arithmetic, so the outputs are its input's up to float rounding (the QDQ graph
    # runs unoptimized here: dequantized float MatMuls, another accumulation order).
    assert max_relative_error(outputs(run.extra["input"], run.evaluation), student) <= 1e-4


def fewer_parameters(run: Run, teacher: list, student: list) -> None:
    # prune and lowrank change the function by design: no output tolerance holds for every
    # random graph. What they promise is a smaller model with the same interface.
    assert run.record.params_after <= run.record.params_before


def distill_no_worse(run: Run, teacher: list, student: list) -> None:
    # distill keeps a repair only if the outputs got closer to the teacher on the calibration
    # data (else it undoes it): so on that data it is never worse than the pruned student.
    # (the same measure it uses: mean per-sample cosine of the graph output)
    pruned = outputs(run.extra["input"], run.calibration)
    reference = outputs(run.teacher, run.calibration)
    repaired = outputs(run.model, run.calibration)
    assert _mean_cosine(reference, repaired) >= _mean_cosine(reference, pruned) - 1e-6
    # Only initializer values change, never the graph's structure.
    assert [n.op_type for n in run.model.graph.node] == \
        [n.op_type for n in run.extra["input"].graph.node]
    assert run.record.params_after == run.record.params_before


def _mean_cosine(reference: list, candidate: list) -> float:
    return float(np.mean([per_sample_cosine(ref[name], cand[name]).mean()
                          for ref, cand in zip(reference, candidate) for name in ref]))


def again(run: Run, case: Case) -> tuple[Model, PassRecord]:
    spec = PASSES[case.pass_name]
    data = calibration.random_data(run.model, CALIBRATION_BATCHES, seed=1, batch=BATCH)
    return spec.run(run.model, case.config(), Context(calibration=data, teacher=run.model))


def nothing_more(case: Case) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        result, record = again(run, case)
        assert not record.modified, f"second {case.id} changed {record.touched}"
        assert result is run.model
    return check


def refuses_quantized(case: Case) -> Callable[[Run], None]:
    # quantize refuses a model an earlier quantization touched (its Q/DQ or integer ops would
    # be quantized twice); when the first run found nothing to quantize, the second finds
    # nothing either.
    def check(run: Run) -> None:
        if run.record.modified:
            with pytest.raises(UserError, match="already quantized"):
                again(run, case)
        else:
            nothing_more(case)(run)
    return check


def prunes_what_is_left(case: Case) -> Callable[[Run], None]:
    # prune's ratio is a share of the channels each group has *now*: a second run cuts again
    # (fewer parameters, still valid), it does not stop. What holds is determinism: the same
    # input gives the same output.
    def check(run: Run) -> None:
        result, record = again(run, case)
        check_valid(result)
        assert record.params_after <= record.params_before
        repeat, _ = PASSES[case.pass_name].run(run.teacher, case.config(),
                                               Context(calibration=run.calibration,
                                                       teacher=run.teacher))
        assert serialized(repeat) == serialized(run.model)
    return check


def distill_settles(run: Run) -> None:
    # A second distill re-fits the same layers again. It is not a fixed point (the ridge term
    # and the layer-by-layer order move the weights a little each time: up to 3% of the output
    # scale seen on a 4-wide chain), so what it promises is its own rule again: a repair is
    # kept only if the outputs get closer to the teacher on the calibration data.
    result, record = PASSES["distill"].run(run.model, PASSES["distill"].config_type(), run.ctx)
    if not record.modified:
        assert result is run.model
        return
    reference = outputs(run.teacher, run.calibration)
    assert _mean_cosine(reference, outputs(result, run.calibration)) >= \
        _mean_cosine(reference, outputs(run.model, run.calibration)) - 1e-6
    assert [n.op_type for n in result.graph.node] == [n.op_type for n in run.model.graph.node]


def _cases() -> list[Case]:
    cases = [
        Case("cleanup", "cleanup", tolerance=exact),
        # Quantization bounds: relative L2 error of the outputs on the calibration data,
        # measured on 1,200 graphs drawn like these; each bound is about 1.3-2x the worst seen,
        # so it catches a broken quantizer (wrong scale, axis or zero point: error ~1) without
        # flaking on an unlucky draw.
        # int8 static QDQ (per-channel int8 weights, per-tensor uint8 activations): median
        # 0.016, worst 0.038.
        Case("quantize-int8", "quantize", "int8", tolerance=relative_error_at_most(0.08)),
        # int8 dynamic (activation ranges from each batch): worst 0.026.
        Case("quantize-int8-dynamic", "quantize", "int8-dynamic",
             tolerance=relative_error_at_most(0.05)),
        # int4 weight-only, blocks of 32: a 4-bit weight is off by ~10% of its block's spread,
        # and up to six layers compound it: worst 0.34.
        Case("quantize-int4", "quantize", "int4", tolerance=relative_error_at_most(0.45)),
        Case("prune", "prune", "0.3", tolerance=fewer_parameters),
        # min_params=0: the drawn weights (at most 32x32) are all below the default floor of 1024.
        Case("lowrank", "lowrank", None, {"min_params": 0}, tolerance=fewer_parameters),
        # The drawn chains are 2-D ([batch, width]), where quantize gives a MatMul + bias Add
        # an output QDQ (ONNX Runtime would make a float Gemm of it); without it every such
        # layer is a lowering site, as in a transformer's 3-D MatMuls.
        # uint8 weights (u8s8_overflow = all): ONNX Runtime's u8 x u8 kernel adds exactly on
        # every CPU, where its u8 x s8 one saturates the pairs that overflow 16 bits on x86
        # CPUs without VNNI (docs/quantize.md), which the unoptimized QDQ input adds exactly.
        Case("lower-after-int8", "lower", None, tolerance=same_as_its_input,
             before=(("quantize", "int8", {"output_qdq": "none", "u8s8_overflow": "all"}),)),
        Case("distill-after-prune", "distill", None, tolerance=distill_no_worse,
             again=distill_settles, before=(("prune", "0.3"),)),
    ]
    promises = {"cleanup": nothing_more, "quantize": refuses_quantized, "lowrank": nothing_more,
                "prune": prunes_what_is_left, "lower": nothing_more}
    return [case if case.again else Case(**{**vars(case),
                                            "again": promises[case.pass_name](case)})
            for case in cases]


CASES = _cases()


def run_case(case: Case, spec: ChainSpec) -> Run:
    teacher = spec.build()
    calib = calibration.random_data(teacher, CALIBRATION_BATCHES, seed=1, batch=BATCH)
    evaluation = calibration.random_data(teacher, EVALUATION_BATCHES, seed=2, batch=BATCH)
    ctx = Context(calibration=calib, teacher=teacher)
    model = teacher
    for name, short, *overrides in case.before:
        config = PASSES[name].config_type.from_short(short)
        config = dataclasses.replace(config, **overrides[0]) if overrides else config
        model, _ = PASSES[name].run(model, config, ctx)
    student_input = model
    original = serialized(student_input)
    result, record = PASSES[case.pass_name].run(student_input, case.config(), ctx)
    assert serialized(student_input) == original, "the pass mutated its input model"
    return Run(teacher, result, record, ctx, calib, evaluation, {"input": student_input})


def check_case(case: Case, spec: ChainSpec) -> None:
    run = run_case(case, spec)
    check_valid(run.model)
    if not run.record.modified:
        assert run.model is run.extra["input"], "modified False but a new model came back"
    teacher_outputs = outputs(run.teacher, run.evaluation)
    student_outputs = outputs(run.model, run.evaluation)
    check_signature(teacher_outputs, student_outputs)
    if case.tolerance is not None:
        case.tolerance(run, teacher_outputs, student_outputs)
    if case.again is not None:
        case.again(run)


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@CI
@given(spec=chains())
def test_random_graphs_round_trip_every_pass(case: Case, spec: ChainSpec):
    check_case(case, spec)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ONNXCOMP_HYPOTHESIS_LONG"),
                    reason="long run: set ONNXCOMP_HYPOTHESIS_LONG=1")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@LONG
@given(spec=chains())
def test_random_graphs_round_trip_every_pass_long(case: Case, spec: ChainSpec):
    check_case(case, spec)


def test_the_cases_cover_every_pass_that_runs_without_torch():
    # fuse needs onnxruntime.transformers (which imports torch): tested in its own file.
    covered = {case.pass_name for case in CASES}
    assert covered == set(PASSES) - {"fuse"}
