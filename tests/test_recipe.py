import pytest

from aecompress.errors import AecompressError
from aecompress.recipe import MAX_YAML_BYTES, Recipe, parse_yaml, read_yaml


@pytest.mark.parametrize(
    "text,value",
    [("2:4", "2:4"), ("[1, 1:30]", [1, "1:30"]), ("3", 3), ("-2", -2), ("1.5", 1.5)],
)
def test_yaml_has_no_base_60_numbers(text, value):
    assert parse_yaml(text, "x") == value  # an N:M pattern stays a string


def _alias_bomb(levels: int) -> str:
    """Each anchor is a list of ten aliases of the one before: 10**levels values expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines)


@pytest.mark.parametrize(
    "text,message",
    [
        ("[" * 5000 + "]" * 5000, "nested deeper than 50 levels"),
        ("".join(f"{' ' * i}k:\n" for i in range(200)), "nested deeper than 50 levels"),
        (_alias_bomb(9), "values once aliases are expanded"),
        (
            "a: &a [[[[[[[[[[1]]]]]]]]]]\n"
            + "".join(
                f"b{i}: &b{i} [[[[[[[[[[*{'a' if i == 0 else f'b{i - 1}'}]]]]]]]]]]\n"
                for i in range(5)
            ),
            "nested deeper than 50 levels once aliases are expanded",
        ),
        ("a: &a [1, *a]", "an alias refers to a node that contains it"),
        ("[" + "1, " * 20_000 + "]", "more than 10000 values"),
        ("x" * (MAX_YAML_BYTES + 1), "larger than 256 KiB"),
    ],
)
def test_yaml_is_bounded_and_quotes_nothing(text, message):
    with pytest.raises(AecompressError, match=message) as raised:
        parse_yaml(text, "x")
    assert len(str(raised.value)) < 200  # no expanded value in the message


def test_yaml_aliases_within_bounds_are_read():
    text = "d: &d {x: 1}\nb: *d\nc: {<<: *d, y: 2}\n" + _alias_bomb(3)
    data = parse_yaml(text, "x")
    assert data["c"] == {"x": 1, "y": 2} and len(data["a2"][0]) == 10


def test_a_large_yaml_file_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("ratios: [" + "1, " * 12_000_000 + "]")  # 36 MB
    with pytest.raises(AecompressError, match=r"r\.yaml is larger than 256 KiB"):
        read_yaml(path, "recipe")


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


@pytest.mark.parametrize(
    ("fields", "steps"),
    [
        ({"method": "attn-dims", "targets": ["attn"]}, 40),
        ({"method": "ffn=ffn-neurons;attn=attn-dims"}, 40),
        ({"method": "ffn-neurons", "targets": ["ffn"]}, 0),
        ({"method": "attn-dims", "targets": ["attn"], "refine": 0}, 0),
        ({"method": "attn-dims", "targets": ["attn"], "pipeline": "independent"}, 0),
    ],
)
def test_a_recipe_without_refine_takes_its_methods_own_steps(fields, steps):
    assert Recipe.parse({"ratio": 1.25, **fields}).refine.steps == steps


@pytest.mark.parametrize(
    ("fields", "size"),
    [
        ({"method": "ffn-neurons", "targets": ["ffn"]}, (128, 512)),
        ({"method": "ffn=ffn-neurons;attn=attn-dims"}, (128, 512)),
        ({"method": "ffn-neurons", "targets": ["ffn"], "calibration": {"seed": 3}}, (128, 512)),
        ({"method": "ffn-neurons", "targets": ["ffn"], "calibration": {"samples": 32}}, (32, 256)),
        ({"method": "attn-dims", "targets": ["attn"]}, (64, 256)),
    ],
)
def test_a_recipe_without_a_calibration_size_takes_its_methods_own(fields, size):
    calibration = Recipe.parse({"ratio": 1.25, **fields}).calibration
    assert (calibration.samples, calibration.seq_len) == size


def test_a_new_method_beside_a_recipe_takes_its_own_calibration_unless_the_recipe_gave_one():
    default = Recipe.parse({"ratio": 1.25, "method": "ffn-neurons", "targets": ["ffn"]})
    assert default.calibration_is_methods_own()
    other = default.override({"method": "svdllm", "targets": ["up"]})[0]
    assert (other.calibration.samples, other.calibration.seq_len) == (64, 256)
    assert not other.calibration_is_methods_own()
    again = Recipe.parse(default.model_dump(mode="json"))  # as an artifact records it
    assert (again.calibration.samples, again.calibration.seq_len) == (128, 512)
    given = default.override({"calibration": {"seq_len": 128}})[0]
    assert (given.calibration.samples, given.calibration.seq_len) == (64, 128)


def test_a_new_method_beside_a_recipe_takes_its_own_refinement_unless_the_recipe_gave_one():
    change = {"method": "ffn-neurons", "targets": ["ffn"]}
    default = Recipe.parse({"ratio": 1.25, "method": "attn-dims", "targets": ["attn"]})
    assert default.override(change)[0].refine.steps == 0
    given = Recipe.parse({"ratio": 1.25, "method": "attn-dims", "targets": ["attn"], "refine": 40})
    assert given.override(change)[0].refine.steps == 40
    assert given.override({"refine": 5})[0].refine.steps == 5


def test_slicegpt_targets_every_linear_layer_of_the_blocks_and_fits_no_groups():
    recipe = Recipe.parse({"method": "slicegpt", "ratio": 1.25})
    assert recipe.slices_stream and recipe.rules() == []
    assert recipe.targets == ["q", "k", "v", "o", "up", "gate", "down"]
    assert recipe.refine.steps == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"targets": ["up", "gate", "down"]}, "give those targets .or none., not up, gate, down"),
        ({"quantize": "int4:g64"}, "takes no quantize"),
        ({"refine": 10, "allocate": "sensitivity"}, "takes no refine, allocate"),
        ({"options": {"select": "leverage"}, "group": "layers"}, "takes no options, group"),
        ({"stream": True}, "takes no stream"),
    ],
)
def test_slicegpt_refuses_the_matrix_methods_settings(fields, message):
    with pytest.raises(AecompressError, match=message):
        Recipe.parse({"method": "slicegpt", "ratio": 1.25, **fields})
