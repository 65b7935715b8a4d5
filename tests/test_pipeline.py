from __future__ import annotations

import pytest

from onnxcomp.errors import OnnxcompError, PassFailed, UserError
from onnxcomp.passes import PASSES, cleanup
from onnxcomp.pipeline import Context, Pipeline, Step, config_help
from onnxcomp.recipe import parse_recipe, with_cleanup


def test_pipeline_runs_cleanup_around_steps_and_names_a_failing_pass(mlp):
    model, records = Pipeline(with_cleanup(parse_recipe("cleanup"))).run(mlp, Context())
    assert [r.name for r in records] == ["cleanup", "cleanup", "cleanup"]

    def explode(model, plan, ctx):
        raise RuntimeError("boom")

    broken = Step(cleanup.PASS.__class__(**{**cleanup.PASS.__dict__, "apply": explode}),
                  cleanup.Config())
    with pytest.raises(PassFailed, match="'cleanup' failed .*boom"):
        Pipeline([Step(cleanup.PASS, cleanup.Config()), broken]).run(mlp, Context())


def test_pipeline_fills_the_record_sizes_and_time(mlp):
    _, (record,) = Pipeline([Step(cleanup.PASS, cleanup.Config())]).run(mlp, Context())
    assert record.params_before == mlp.parameter_count() == record.params_after
    assert record.bytes_before == mlp.weight_bytes() and record.seconds > 0


def test_a_user_error_inside_a_pass_stays_a_user_error(mlp):
    def refuse(model, config, ctx):
        raise UserError("you asked for something impossible")

    spec = cleanup.PASS.__class__(**{**cleanup.PASS.__dict__, "plan": refuse})
    with pytest.raises(UserError, match="impossible"):
        Pipeline([Step(spec, cleanup.Config())]).run(mlp, Context())


def test_missing_calibration_is_refused_before_any_work(mlp):
    (step,) = parse_recipe("quantize:int8")
    with pytest.raises(UserError, match="needs calibration data"):
        Pipeline([step]).run(mlp, Context())


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_config_field_is_described(name):
    rows = config_help(PASSES[name].config_type)
    assert rows, name
    missing = [row.name for row in rows if not row.help]
    assert not missing, f"{name}: fields without a description: {missing}"


def test_error_types_map_to_exit_codes():
    from onnxcomp.errors import InvalidOutput, TargetMissed

    assert UserError("x").exit_code == 2 and OnnxcompError("x").exit_code == 2
    assert TargetMissed("x").exit_code == 1
    assert PassFailed("x").exit_code == 3 and InvalidOutput("x").exit_code == 3


def test_a_steps_plan_and_result_are_let_go_before_the_next_step(mlp):
    """What one step planned (a payload may hold a prepared copy of the model) is not kept
    alive through the next step."""
    import weakref

    from onnxcomp.pipeline import Applied, Plan

    class Payload:  # stands for a prepared copy of a large model
        pass

    refs: list[weakref.ref] = []
    alive_at_next_plan: list[bool] = []

    def plan(model, config, ctx):
        alive_at_next_plan.append(any(ref() is not None for ref in refs))
        payload = Payload()
        refs.append(weakref.ref(payload))
        return Plan("hold", config, payload=payload)

    def apply(model, plan_, ctx):
        return Applied(model.copy(), modified=True)

    spec = cleanup.PASS.__class__(**{**cleanup.PASS.__dict__, "plan": plan, "apply": apply})
    Pipeline([Step(spec, cleanup.Config())] * 3).run(mlp, Context())
    assert alive_at_next_plan == [False, False, False]
