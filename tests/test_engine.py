"""Contract tests: every architecture, every family, through the one engine."""

import json

import pytest
import torch

import aecompress
from aecompress.errors import AecompressError
from aecompress.methods import FitContext, make_method
from aecompress.pipeline.plan import group_spec
from aecompress.substitution import Deferred, inject
from aecompress.targets import group_targets, output_head_path, resolve_targets, weight_matrix
from tests.conftest import FAMILIES, tiny_model


@pytest.mark.parametrize("grouping", ["none", "layers"])
def test_full_rank_svd_reproduces_outputs(arch, grouping, input_ids):
    """SVD at full rank through the real substitution path: outputs equal the original's."""
    model = tiny_model(arch)
    reference = model(input_ids=input_ids).logits
    method = make_method("svd")
    tied = output_head_path(model)
    groups = group_targets(model, resolve_targets(model, FAMILIES[arch]), grouping)
    for group in groups:
        matrices = [weight_matrix(model, t).float() for t in group.members]
        spec = group_spec(model, group, None, "float32")
        full = method.max_width(spec)
        stored = method.fit(matrices, full, FitContext(spec)).as_parameters()
        inject(model, group, method, stored, tied if group.family == "embed" else None)
    assert not any(
        isinstance(m, torch.nn.Linear) and m.weight.shape[0] == 30522 for m in model.modules()
    )
    torch.testing.assert_close(model(input_ids=input_ids).logits, reference, atol=2e-4, rtol=1e-4)


def test_compress_meets_the_budget_and_reports_ratio(arch):
    model = tiny_model(arch)
    cm = aecompress.compress(model, method="svd", ratio=3, targets=FAMILIES[arch], progress=False)
    for fitted in cm.groups:
        assert fitted.stored_numel <= fitted.original_numel / 3
        assert fitted.ratio >= 3
    totals = cm.totals()
    assert totals["ratio"] == totals["target_params"] / totals["stored_params"]


def test_tied_output_head_shares_the_embedding_factors(input_ids):
    model = tiny_model("llama")
    cm = aecompress.compress(model, method="svd", ratio=4, targets=["embed"], progress=False)
    assert cm.tied_output == "lm_head"
    assert model.lm_head.a is model.model.embed_tokens.a
    assert model.lm_head.b is model.model.embed_tokens.b


def test_decoded_weights_are_built_only_when_the_model_runs(tokenizer, input_ids, tmp_path):
    """With build_modules=False a compressed model holds the stored tensors alone until it
    runs (saving it makes no decoded copy); then each module serves what it would have."""
    model = tiny_model("llama")
    cm = aecompress.compress(
        model,
        method="prune",
        ratio=2,
        targets=["up", "down"],
        build_modules=False,
        tokenizer=tokenizer,
    )
    deferred = [m for m in cm.model.modules() if isinstance(m, Deferred)]
    cm.save_pretrained(tmp_path / "art")
    assert len(deferred) == 4 and not any(m._served for m in deferred)
    logits = cm.model(input_ids=input_ids).logits
    assert all(m._served for m in deferred)
    built = aecompress.compress(
        tiny_model("llama"), method="prune", ratio=2, targets=["up", "down"]
    )
    assert not any(isinstance(m, Deferred) for m in built.model.modules())
    torch.testing.assert_close(built.model(input_ids=input_ids).logits, logits)
    torch.testing.assert_close(
        aecompress.load(tmp_path / "art")(input_ids=input_ids).logits, logits
    )


def test_untie_keeps_the_output_head_dense():
    model = tiny_model("llama")
    head = model.lm_head.weight.detach().clone()
    cm = aecompress.compress(
        model,
        method="svd",
        ratio=4,
        targets=["embed"],
        untie_embeddings=True,
        storage_dtype="float32",
        progress=False,
    )
    assert cm.tied_output is None
    assert torch.equal(model.lm_head.weight, head)
    assert model.config.tie_word_embeddings is False


def test_nan_weights_are_refused():
    model = tiny_model("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.key.weight[0, 0] = float("nan")
    with pytest.raises(AecompressError, match="NaN"):
        aecompress.compress(model, method="svd", ratio=2, targets=["k"], progress=False)


def test_bad_recipe_values_are_clear():
    model = tiny_model("bert")
    with pytest.raises(AecompressError, match="ratio"):
        aecompress.compress(model, method="svd", ratio=0.5, targets=["k"])
    with pytest.raises(AecompressError, match="unknown method 'svdd'"):
        aecompress.compress(model, method="svdd", ratio=2, targets=["k"])
    with pytest.raises(AecompressError, match="ratio is too large"):
        aecompress.compress(model, method="svd", ratio=1000, targets=["k"], progress=False)
    with pytest.raises(AecompressError, match="recipe: colour"):
        aecompress.compress(model, method="svd", ratio=2, targets=["k"], colour="red")


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({"method": "svd"}, "independent"),
        ({"method": "svdllm"}, "sequential"),
        ({"method": "sparsegpt"}, "sequential"),
        ({"method": "svdllm", "targets": ["embed"]}, "independent"),  # embeddings: no X^T X
        ({"method": "svd", "refine": {"steps": 5}}, "sequential"),
        ({"method": "svdllm", "pipeline": "independent"}, "independent"),
        ({"method": "gptq"}, "independent"),  # 8 bits: measured better on the dense statistics
        ({"method": "gptq", "options": {"bits": 3}}, "independent"),
        ({"method": "gptq", "options": {"bits": 2}}, "sequential"),  # measured better there
        ({"method": "gptq", "pipeline": "sequential"}, "sequential"),
        ({"method": "gptq", "refine": {"steps": 5}}, "sequential"),
    ],
)
def test_auto_pipeline_is_sequential_for_methods_that_measure_output_error(fields, expected):
    from aecompress.engine import choose_pipeline
    from aecompress.pipeline.plan import plan_groups
    from aecompress.recipe import Recipe

    model = tiny_model("llama")
    recipe = Recipe.parse({"ratio": 2, "targets": ["down"], **fields})
    assert choose_pipeline(recipe, plan_groups(model, recipe), model) == expected


def test_a_model_object_records_its_folder_and_tokenizer(tmp_path, tokenizer):
    import transformers

    tiny_model("bert").save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = transformers.BertForMaskedLM.from_pretrained(tmp_path / "base")
    cm = aecompress.compress(model, method="svd", ratio=2, targets=["k"], progress=False)
    assert cm.base_model == str((tmp_path / "base").resolve()) and cm.tokenizer is not None
    cm.save_pretrained(tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "aecompress.json").read_text())
    assert manifest["base_model"] == cm.base_model
    assert (tmp_path / "art" / "tokenizer.json").is_file()


def test_an_artifact_that_could_not_be_evaluated_is_not_written(tmp_path):
    cm = aecompress.compress(tiny_model("bert"), method="svd", ratio=2, targets=["k"])
    assert cm.base_model == "" and cm.tokenizer is None
    with pytest.raises(AecompressError, match=r"pass tokenizer= to aecompress\.compress"):
        cm.save_pretrained(tmp_path / "art")
    assert not (tmp_path / "art").exists()
