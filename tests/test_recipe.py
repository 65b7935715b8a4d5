from __future__ import annotations

import pytest

from onnxcomp.errors import OnnxcompError
from onnxcomp.passes import cleanup
from onnxcomp.recipe import apply_overrides, coerce, parse_recipe


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


@pytest.mark.parametrize("text, message", [
    ('[[pass]]\nname = "cleanup"\nfold_constant = false\n', "unknown option"),
    ("[[pass]\n", "invalid TOML"),
    ('[[pass]]\nname = "cleanup"\nfold_size_limit = -1\n', "fold_size_limit"),
    ('pass = "cleanup"\n', "array of tables"),
    ('[[pass]]\nname = ["cleanup"]\n', "needs a name"),
    ('[[pass]]\nname = "quantize"\nblock_size = 32.0\n', "expected an integer"),
    ('[[pass]]\nname = "cleanup"\nfold_constants = "maybe"\n', "true or false"),
    ("x = 1\n", "unknown top-level"),
    ("a = " + "[" * 2000 + "]" * 2000 + "\n", "invalid TOML|unknown top-level"),
])
def test_bad_toml_recipes(tmp_path, text, message):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(OnnxcompError, match=message):
        parse_recipe(path)


def test_binary_and_missing_recipe_files(tmp_path):
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(OnnxcompError, match="not UTF-8|invalid TOML"):
        parse_recipe(binary)
    with pytest.raises(OnnxcompError, match="does not exist"):
        parse_recipe(tmp_path / "missing.toml")


def test_overrides_set_config_fields_with_types():
    (step,) = apply_overrides(parse_recipe("cleanup"), ["cleanup.fold_size_limit=1024",
                                                        "cleanup.fold_constants=false"])
    assert step.config.fold_size_limit == 1024 and step.config.fold_constants is False
    for bad, message in (("cleanup.nope=1", "unknown option"),
                         ("prune.ratio=0.1", "no 'prune' step"),
                         ("cleanup=1", "PASS.FIELD"),
                         ("cleanup.fold_size_limit=-5", "fold_size_limit"),
                         ("cleanup.fold_size_limit=1.5", "expected an integer")):
        with pytest.raises(OnnxcompError, match=message):
            apply_overrides(parse_recipe("cleanup"), [bad])


def test_coerce_turns_text_into_the_declared_type():
    assert coerce(tuple[str, ...], "a,b", "x") == ("a", "b")
    assert coerce(tuple[str, ...], ["a"], "x") == ("a",)
    assert coerce(int | None, "none", "x") is None
    assert coerce(float, 3, "x") == 3.0
    assert coerce(bool, "true", "x") is True
    for annotation, value in ((int, True), (int, 2.0), (float, "nan"), (float, "inf"),
                              (str, ["a"]), (bool, 3)):
        with pytest.raises(OnnxcompError):
            coerce(annotation, value, "x")


def test_the_same_list_field_splits_the_same_way_in_every_pass():
    for name in ("quantize", "lowrank"):
        (step,) = apply_overrides(parse_recipe(name + ":" + ("int4" if name == "quantize" else "0.9")),
                                  [f"{name}.exclude=a,b"])
        assert tuple(step.config.exclude) == ("a", "b"), name


@pytest.mark.parametrize("name", ["cleanup", "quantize", "prune", "lowrank", "distill", "fuse"])
def test_help_pass_is_a_well_formed_table(name):
    import re

    from onnxcomp.recipe import describe_pass

    rows = [line for line in describe_pass(name).splitlines() if line.startswith("|")]
    cells = {len(re.findall(r"(?<!\\)\|", row)) for row in rows}
    assert len(rows) > 2 and cells == {5}, name  # 4 columns: 5 unescaped bars on every row


def test_toml_target_key(tmp_path):
    from onnxcomp.recipe import recipe_target

    recipe = tmp_path / "r.toml"
    recipe.write_text('target = "OpenVINO"\n[[pass]]\nname = "quantize"\nmode = "int8"\n')
    assert [s.name for s in parse_recipe(recipe)] == ["quantize"]
    assert recipe_target(recipe) == "openvino"
    assert recipe_target(recipe, "ort-cpu") == "ort-cpu"  # the flag wins
    assert recipe_target("quantize:int8") is None
    recipe.write_text('target = "gpu"\n[[pass]]\nname = "quantize"\n')
    for call in (lambda: parse_recipe(recipe), lambda: recipe_target(recipe)):
        with pytest.raises(OnnxcompError, match="unknown target 'gpu'; known: ort-cpu") as err:
            call()
        assert "\n" not in str(err.value)
