"""The search space: dimensions present or absent by what each pass's plan can do; TOML
narrowing and extension; the recipe a trial's parameters make."""

from __future__ import annotations

import builders
import lowrank_graphs
import numpy as np
import pytest

from onnxcomp.errors import UserError
from onnxcomp.search import space as space_mod
from onnxcomp.search.space import Space


def names(space: Space) -> set[str]:
    return {d.name for d in space.dimensions}


def test_mlp_dimensions_follow_the_plans():
    space = space_mod.derive(builders.mlp(), calibration=True, torch_available=False)
    dims = names(space)
    assert {"quantize.mode", "quantize.calibration", "prune.use", "prune.ratio",
            "distill.use"} <= dims
    # 8x16 and 16x4 weights are below lowrank's min_params: nothing to factor
    assert not any(d.startswith("lowrank.") for d in dims)
    assert not any(d.startswith("fuse.") for d in dims)
    assert any("lowrank left out" in note for note in space.notes)
    assert "int8" in space.get("quantize.mode").choices
    assert space.get("quantize.keep_float_by").choices == ("harm", "latency")
    assert space.get("quantize.range_search").choices == (False, True)
    dynamic = space.sample(Fixed({"quantize.mode": "int8-dynamic"}))
    assert "quantize.keep_float_by" not in dynamic  # sampled for static int8 only
    assert "quantize.range_search" not in dynamic


def test_without_calibration_data_no_static_int8_nor_distill():
    space = space_mod.derive(builders.mlp(), calibration=False, torch_available=False)
    assert "int8" not in space.get("quantize.mode").choices
    assert "quantize.calibration" not in names(space)
    assert "distill.use" not in names(space)
    assert "quantize.min_cosine" not in names(space)
    assert "quantize.keep_float_by" not in names(space)  # static int8 only
    assert "quantize.range_search" not in names(space)


def test_low_rank_weights_give_lowrank_and_constraint_cosines():
    model = lowrank_graphs.matmul_model(lowrank_graphs.low_rank(np.random.default_rng(0),
                                                                96, 96, 8))
    space = space_mod.derive(model, calibration=True, constraint_cosines=(0.995,),
                             torch_available=False)
    assert "lowrank.energy" in names(space)
    assert 0.995 in space.get("quantize.min_cosine").choices


class Fixed:
    """A stand-in for an Optuna trial that answers from a dict."""

    def __init__(self, values):
        self.values = values

    def suggest_categorical(self, name, choices):
        return self.values.get(name, choices[0])

    def suggest_float(self, name, low, high, step=None):
        return self.values.get(name, low)

    def suggest_int(self, name, low, high, step=1):
        return self.values.get(name, low)


def test_sampling_is_conditional_and_recipe_ordered():
    space = space_mod.derive(builders.mlp(), calibration=True, torch_available=False)
    params = space.sample(Fixed({"quantize.mode": "int8-dynamic", "prune.use": True,
                                 "prune.ratio": 0.25, "distill.use": True}))
    assert "quantize.calibration" not in params  # int8 static only
    assert params["prune.ratio"] == 0.25
    recipe = space.recipe(params)
    assert [name for name, _ in recipe] == ["prune", "distill", "quantize"]
    assert dict(recipe)["quantize"]["mode"] == "int8-dynamic"
    off = space.sample(Fixed({"quantize.mode": "none", "prune.use": False}))
    assert "prune.ratio" not in off and space.recipe(off) == []


def test_toml_narrows_extends_and_pins():
    space = space_mod.derive(builders.mlp(), calibration=True, torch_available=False)
    space = space_mod.apply_overrides(space, {
        "dimensions": {"quantize.mode": {"choices": ["int8", "none"]},
                       "prune.ratio": {"low": 0.1, "high": 0.2, "step": 0.05},
                       "quantize.per_channel": {"choices": [True, False]},
                       "distill.use": {"fixed": False}},
        "fixed": {"quantize.output_qdq": "all"}})
    assert space.get("quantize.mode").choices == ("int8", "none")
    assert (space.get("prune.ratio").low, space.get("prune.ratio").high) == (0.1, 0.2)
    assert space.get("quantize.per_channel").choices == (True, False)
    assert "distill.use" not in names(space) and space.fixed["distill.use"] is False
    recipe = dict(space.recipe(space.sample(Fixed({"quantize.mode": "int8"}))))
    assert recipe["quantize"]["output_qdq"] == "all" and "distill" not in recipe


@pytest.mark.parametrize("document, message", [
    ({"dimension": {}}, "unknown table"),
    ({"dimensions": {"quantize.nope": {"choices": [1]}}}, "no field 'nope'"),
    ({"dimensions": {"nopass.ratio": {"choices": [1]}}}, "unknown pass"),
    ({"dimensions": {"prune.ratio": {"low": 0.3, "high": 0.1}}}, "low must be below high"),
    ({"dimensions": {"prune.ratio": {"low": 0.1, "high": 1.5}}}, "prune.ratio"),
    ({"dimensions": {"quantize.mode": {"choices": ["int3"]}}}, "quantize.mode"),
    ({"dimensions": {"quantize.mode": {"choices": []}}}, "non-empty"),
    ({"dimensions": {"prune.ratio": {"lo": 0.1}}}, "unknown key"),
    ({"fixed": {"prune.ratio": "a lot"}}, "prune.ratio"),
])
def test_bad_overrides_are_user_errors(document, message):
    space = space_mod.derive(builders.mlp(), calibration=True, torch_available=False)
    with pytest.raises(UserError, match=message):
        space_mod.apply_overrides(space, document)


def test_derive_leaves_the_model_alone():
    model = builders.mlp()
    before = model.proto.SerializeToString()
    space_mod.derive(model, calibration=True, torch_available=False)
    assert model.proto.SerializeToString() == before


def test_a_fixed_recipe_is_a_point_of_the_space():
    space = space_mod.derive(builders.mlp(), calibration=True, torch_available=False)
    params = space.params_for("quantize:int8")
    assert params["quantize.mode"] == "int8" and params["prune.use"] is False
    assert params["quantize.calibration"] == "mse"  # the pass's default: the recipe as is
    assert space.recipe(params) == [("quantize", {"mode": "int8", "calibration": "mse",
                                                  **({"output_qdq": "conv"}
                                                     if "quantize.output_qdq" in params
                                                     else {}),
                                                  **({"exclude": []} if "quantize.exclude"
                                                     in params else {}),
                                                  **({"min_cosine": None}
                                                     if "quantize.min_cosine" in params
                                                     else {}),
                                                  **({"keep_float_by": "harm"}
                                                     if "quantize.keep_float_by" in params
                                                     else {}),
                                                  **({"range_search": False}
                                                     if "quantize.range_search" in params
                                                     else {})})]
    pruned = space.params_for("prune:0.3,distill")
    assert pruned["quantize.mode"] == "none"
    assert space.recipe(pruned) == [("prune", {"ratio": 0.3, "ranking": "local"}),
                                    ("distill", {})]
    with pytest.raises(UserError, match="not in the search space"):
        space.params_for("lowrank:0.9")
    narrowed = space_mod.apply_overrides(
        space, {"dimensions": {"prune.ratio": {"low": 0.05, "high": 0.2}}})
    with pytest.raises(UserError, match="outside the search space"):
        narrowed.params_for("prune:0.3")


def test_output_qdq_is_drawn_where_its_values_make_different_models():
    mlp = space_mod.derive(builders.mlp(), calibration=True, torch_available=False)
    assert mlp.get("quantize.output_qdq").choices == ("conv", "none")  # MatMuls only
    assert space_mod.output_qdq_choices({"Conv", "MatMul"}) == ("conv", "conv-only")
    assert space_mod.output_qdq_choices({"Conv"}) == ("conv",)  # conv-only is conv there
    convs = space_mod.derive(builders.conv_net(), calibration=True, torch_available=False)
    assert convs.get("quantize.output_qdq") is None
    # drawn only with int8: the README's quantize:int8 is the default, conv
    assert mlp.params_for("quantize:int8")["quantize.output_qdq"] == "conv"
    assert "quantize.output_qdq" not in mlp.params_for("quantize:int8-dynamic")
