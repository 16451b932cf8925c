import pytest

from aecompress.errors import AecompressError
from aecompress.recipe import Recipe, parse_yaml


@pytest.mark.parametrize(
    "text,value",
    [("2:4", "2:4"), ("[1, 1:30]", [1, "1:30"]), ("3", 3), ("-2", -2), ("1.5", 1.5)],
)
def test_yaml_has_no_base_60_numbers(text, value):
    assert parse_yaml(text, "x") == value  # an N:M pattern stays a string


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"method": "svdd"}, "unknown method 'svdd'"),
        ({"options": {"rnk": 3}}, "rnk: Extra inputs are not permitted"),
        ({"targets": ["kk"]}, "unknown target family 'kk'"),
        ({"targets": ["re:("]}, "bad target regex"),
        ({"method": "k=svd;=prune", "targets": []}, "recipe: '=prune' is not FAMILIES=METHOD"),
        ({"quantize": "int9"}, "quantize.bits: Input should be less than or equal to 8"),
        ({"quantize": "fp4"}, "'fp4' is not a quantization like int4:g64"),
        ({"quantize": {"bits": 4, "grup": 64}}, "grup: Extra inputs are not permitted"),
    ],
)
def test_methods_options_and_targets_are_checked_with_the_recipe(fields, message):
    with pytest.raises(AecompressError, match=message):
        Recipe.parse({"ratio": 2, "targets": ["k"], **fields})


def test_a_quantization_stage_is_text_or_a_mapping_and_rules_inherit_it():
    recipe = Recipe.parse(
        {
            "ratio": 4,
            "quantize": "int3:row:rtn:asym",
            "method": [
                {"targets": ["k"], "method": "svd"},
                {"targets": ["down"], "method": "prune", "quantize": {"bits": 4, "group": 32}},
            ],
        }
    )
    own, given = (rule.quantize for rule in recipe.rules())
    assert (own.bits, own.group, own.method, own.symmetric) == (3, None, "rtn", False)
    assert (given.bits, given.group, given.method, given.symmetric) == (4, 32, "gptq", True)
    assert str(own) == "int3:row:rtn:asym" and str(given) == "int4:g32:gptq"
    assert Recipe.parse({"ratio": 2, "targets": ["k"]}).rules()[0].quantize is None
