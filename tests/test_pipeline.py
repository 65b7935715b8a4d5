from __future__ import annotations

import pytest

from onnxcomp.errors import OnnxcompError
from onnxcomp.pipeline import Context, Pipeline, PassFailed, Step, parse_recipe
from onnxcomp.passes import cleanup


def test_short_recipe_parses_into_steps():
    steps = parse_recipe("cleanup")
    assert [s.name for s in steps] == ["cleanup"]
    assert steps[0].config == cleanup.Config()


def test_toml_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "cleanup"\nfold_constants = false\n')
    (step,) = parse_recipe(recipe)
    assert step.config.fold_constants is False


@pytest.mark.parametrize("recipe, message", [
    ("nonsense:1", "unknown pass"),
    ("cleanup:3", "takes no argument"),
    ("cleanup,,cleanup", "empty step"),
])
def test_bad_short_recipes(recipe, message):
    with pytest.raises(OnnxcompError, match=message):
        parse_recipe(recipe)


def test_bad_toml_recipes(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text('[[pass]]\nname = "cleanup"\nfold_constant = false\n')
    with pytest.raises(OnnxcompError, match="unknown option"):
        parse_recipe(typo)
    broken = tmp_path / "broken.toml"
    broken.write_text("[[pass]\n")
    with pytest.raises(OnnxcompError, match="invalid TOML"):
        parse_recipe(broken)
    with pytest.raises(OnnxcompError, match="does not exist"):
        parse_recipe(tmp_path / "missing.toml")
    bad_value = tmp_path / "bad.toml"
    bad_value.write_text('[[pass]]\nname = "cleanup"\nfold_size_limit = -1\n')
    with pytest.raises(OnnxcompError, match="fold_size_limit"):
        parse_recipe(bad_value)


def test_pipeline_runs_cleanup_around_steps_and_names_a_failing_pass(mlp, monkeypatch):
    model, records = Pipeline(parse_recipe("cleanup")).run(mlp, Context())
    assert [r.name for r in records] == ["cleanup", "cleanup", "cleanup"]

    def explode(model, config, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(cleanup, "run", explode)
    with pytest.raises(PassFailed, match="'cleanup' failed .*boom"):
        Pipeline([Step("cleanup", cleanup.Config())], cleanup=False).run(mlp, Context())


def test_overrides_set_config_fields_with_types():
    from onnxcomp.pipeline import apply_overrides

    (step,) = apply_overrides(parse_recipe("cleanup"), ["cleanup.fold_size_limit=1024",
                                                        "cleanup.fold_constants=false"])
    assert step.config.fold_size_limit == 1024 and step.config.fold_constants is False
    for bad, message in (("cleanup.nope=1", "no option"), ("prune.ratio=0.1", "no 'prune' step"),
                         ("cleanup=1", "PASS.FIELD"), ("cleanup.fold_size_limit=-5",
                                                       "fold_size_limit")):
        with pytest.raises(OnnxcompError, match=message):
            apply_overrides(parse_recipe("cleanup"), [bad])
