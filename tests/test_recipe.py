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
    ],
)
def test_methods_options_and_targets_are_checked_with_the_recipe(fields, message):
    with pytest.raises(AecompressError, match=message):
        Recipe.parse({"ratio": 2, "targets": ["k"], **fields})
