"""The quantize Config: it checks itself, every field is described, recipe values reach it
through the shared coercion (lists split on commas, ``block_size = 32.0`` refused)."""

from __future__ import annotations

import dataclasses

import pytest

from onnxcomp.errors import UserError
from onnxcomp.passes import quantize
from onnxcomp.pipeline import config_help
from onnxcomp.recipe import apply_overrides, config_from_table, parse_recipe


def test_config_validates_itself():
    assert quantize.Config.from_short("int4").mode == "int4"
    assert quantize.Config.from_short(None).mode == "int8"
    assert quantize.Config(mode="int8-dynamic").ops == ("MatMul", "Gemm")
    assert quantize.Config(exclude=["a*", "Gemm"]).exclude == ("a*", "Gemm")  # a Python list
    for bad in ({"mode": "int3"}, {"calibration": "magic"}, {"block_size": 48},
                {"int4_format": "gguf"}, {"min_cosine": 2.0}, {"smoothquant_alpha": 1.5},
                {"percentile": 20.0}, {"activation_dtype": "int16"}, {"output_qdq": "some"},
                {"block_size": 32.0}, {"block_size": True}, {"per_channel": "yes"},
                {"op_types": ()}, {"exclude": None}):
        with pytest.raises(ValueError):
            quantize.Config(**bad)
    with pytest.raises(ValueError):
        quantize.Config.from_short("fp8")


def test_a_string_is_not_split_by_the_config_itself():
    # Comma splitting is recipe.coerce's, the same for every pass: a bare string given to the
    # dataclass is a mistake, not a list of one-letter patterns.
    with pytest.raises(ValueError, match="exclude must be a tuple"):
        quantize.Config(exclude="*.v, *.attn")


def test_exclude_given_as_one_comma_separated_string():
    (step,) = apply_overrides(parse_recipe("quantize:int4"), ["quantize.exclude=*.v, *.attn"])
    assert step.config.exclude == ("*.v", "*.attn")
    config = config_from_table("quantize", {"op_types": "MatMul,Conv", "exclude": ["a", "b"]})
    assert config.op_types == ("MatMul", "Conv") and config.exclude == ("a", "b")
    assert config_from_table("quantize", {"op_types": "none"}).op_types is None


def test_recipe_values_are_coerced_by_the_annotations():
    with pytest.raises(UserError, match="expected an integer"):
        config_from_table("quantize", {"block_size": 32.0})
    assert config_from_table("quantize", {"block_size": 64}).block_size == 64
    config = config_from_table("quantize", {"min_cosine": "0.99", "smoothquant_alpha": "none"})
    assert config.min_cosine == 0.99 and config.smoothquant_alpha is None
    with pytest.raises(UserError, match="block_size"):
        config_from_table("quantize", {"block_size": 48})  # the Config's own check, as a UserError


def test_every_field_is_described_and_typed():
    rows = config_help(quantize.Config)
    assert {row.name for row in rows} == {f.name for f in dataclasses.fields(quantize.Config)}
    assert all(row.help for row in rows)
    types = {row.name: row.type for row in rows}
    assert types["exclude"] == "tuple[str, ...]" and types["block_size"] == "int"


def test_pipeline_recipe_form():
    (step,) = parse_recipe("quantize:int8-dynamic")
    assert dataclasses.asdict(step.config)["mode"] == "int8-dynamic"
    assert step.spec is quantize.PASS
