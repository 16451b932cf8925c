"""Every registered method through the engine on a tiny Llama: its declared cost, a tight
width, the artifact round trip; and refusals."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import aecompress
from aecompress.calibration import CalibrationConfig, collect_statistics
from aecompress.errors import AecompressError
from aecompress.methods import METHODS
from aecompress.models import LoadedModel
from aecompress.pipeline.plan import group_spec, plan_groups
from aecompress.recipe import Recipe
from aecompress.targets import head_dim, resolve_targets
from tests.methods.helpers import tiny_llama

CALIBRATION = {"samples": 4, "seq_len": 32, "batch_size": 4}
METHOD_NAMES = sorted(METHODS)  # every registered method: a new one is tested here as is
# Methods that fit only a kind of target of their own (whole structures): their targets.
OWN_TARGETS = {"ffn-neurons": "ffn", "attn-dims": "attn"}


def quick(name: str) -> dict[str, Any]:
    """Options that shorten training, for the methods that train (from their options)."""
    fields = METHODS[name].Options.model_fields
    return {"epochs": 2} if "epochs" in fields else {"steps": 5} if "steps" in fields else {}


def compress(tiny: LoadedModel, method: str, targets: str, ratio: float, **fields: Any):
    return aecompress.compress(
        tiny,
        method=method,
        options=quick(method),
        ratio=ratio,
        targets=targets,
        calibration=CALIBRATION,
        progress=False,
        **fields,
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("ratio", [1.25, 1.6])
def test_every_method_stores_what_its_width_costs_and_the_width_is_tight(
    tokenizer, method: str, ratio: float
):
    """Per group: stored bits == the declared cost of the width <= budget, and every
    larger width costs more than the budget. A grouping a method cannot fit is refused at
    planning, before any calibration."""
    for grouping in ("none", "layers"):
        tiny = LoadedModel(tiny_llama(), tokenizer, "tiny-llama", "AutoModelForCausalLM")
        try:
            cm = compress(tiny, method, OWN_TARGETS.get(method, "q,up,down"), ratio, group=grouping)
        except AecompressError as error:
            assert grouping == "layers" and "--group" in str(error), error
            continue
        for fitted in cm.groups:
            spec = group_spec(cm.model, fitted.group, head_dim(cm.model), "bfloat16")  # causal LM
            # the original shape (a pruned MLP's matrices are smaller now)
            spec = replace(spec, rows=fitted.shape[0], cols=fitted.shape[1])
            budget = spec.dense_bits / ratio
            width = fitted.stored.width
            assert fitted.stored_bits == fitted.method.cost(width, spec) <= budget
            assert all(
                fitted.method.cost(w, spec) > budget for w in fitted.method.larger(width, spec)
            ), (grouping, fitted.group.name, width)
            assert fitted.ratio >= ratio


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_round_trips_through_the_artifact(
    tiny: LoadedModel, method: str, tmp_path: Path
):
    targets = OWN_TARGETS.get(method, "embed,q,o,gate")
    try:
        plan_groups(tiny.model, Recipe(method=method, ratio=1.6, targets=targets))
    except AecompressError as error:  # a method may refuse embeddings, before any work
        assert "embedding" in str(error)
        targets = "q,o,gate"
    cm = compress(tiny, method, targets, 1.6)
    ids = torch.randint(0, 30522, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = cm.model(input_ids=ids).logits
    cm.save_pretrained(str(tmp_path / "artifact"))
    loaded = aecompress.load_compressed(tmp_path / "artifact")
    for again, fitted in zip(loaded.groups, cm.groups, strict=True):
        assert again.stored.width == fitted.stored.width
        assert again.stored.layout == fitted.stored.layout
        assert again.method.options == fitted.method.options
    with torch.inference_mode():
        after = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


QUANTIZABLE = sorted(name for name, cls in METHODS.items() if cls.quantizable)


@pytest.mark.parametrize("method", QUANTIZABLE)
def test_every_quantizable_method_stores_codes_as_its_width_costs_and_round_trips(
    tokenizer, method: str, tmp_path: Path
):
    """With a quantization stage (asymmetric, groups of 16, so a rank or kept count
    that 16 does not divide leaves a shorter last group): stored bits == the declared
    cost <= budget, the width is tight, the stage is recorded, and the artifact loads
    back to the same logits."""
    stage, ratio = "int3:g16:asym", 2.0
    for grouping in ("none", "layers"):
        tiny = LoadedModel(tiny_llama(), tokenizer, "tiny-llama", "AutoModelForCausalLM")
        try:
            cm = compress(tiny, method, "q,up,down", ratio, group=grouping, quantize=stage)
        except AecompressError as error:
            assert grouping == "layers" and "--group" in str(error), error
            continue
        for fitted in cm.groups:
            recorded = fitted.stored.layout.quantize
            assert recorded is not None and str(recorded.stage) == "int3:g16:gptq:asym"
            spec = group_spec(
                cm.model, fitted.group, head_dim(cm.model), "bfloat16", recorded.stage
            )
            width, budget = fitted.stored.width, spec.dense_bits / ratio
            assert fitted.stored_bits == fitted.method.cost(width, spec) <= budget
            assert all(
                fitted.method.cost(w, spec) > budget for w in fitted.method.larger(width, spec)
            ), (grouping, fitted.group.name, width)
            codes = [t for k, t in fitted.stored.tensors().items() if k.endswith(".codes")]
            assert codes and all(t.dtype == torch.int32 for t in codes)
        ids = torch.randint(0, 30522, (2, 10), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            before = cm.model(input_ids=ids).logits
        cm.save_pretrained(str(tmp_path / grouping))
        loaded = aecompress.load_compressed(tmp_path / grouping)
        for again, fitted in zip(loaded.groups, cm.groups, strict=True):
            assert again.stored.layout == fitted.stored.layout
        with torch.inference_mode():
            after = loaded.model(input_ids=ids).logits
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_a_method_that_cannot_quantize_is_refused_before_any_work(tiny: LoadedModel):
    recipe = Recipe(method="kronecker", ratio=4, targets="q", quantize="int4:g16")
    with pytest.raises(
        AecompressError,
        match=r"kronecker cannot quantize .*methods that can: ae, ae-data, .*sparsegpt",
    ):
        plan_groups(tiny.model, recipe)


@pytest.mark.parametrize("method", ["svdllm", "asvd"])
def test_activation_aware_embeddings_serve_the_tied_head(tiny: LoadedModel, method: str):
    cm = compress(tiny, method, "embed", 4.0)
    assert cm.tied_output == "lm_head"
    head, embed = cm.model.get_output_embeddings(), cm.model.get_input_embeddings()
    torch.testing.assert_close(head.weight, embed.weight)
    assert cm.groups[0].stored.width == math.floor(30522 * 32 / 4 / (30522 + 32))


def test_nan_weights_are_refused(tiny: LoadedModel):
    with torch.no_grad():
        tiny.model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(AecompressError, match=r"layers\.1\.self_attn\.k_proj.*NaN"):
        compress(tiny, "svdllm", "k", 2.0)


def test_calibration_statistics_repeat_with_the_same_seed(tiny: LoadedModel):
    targets = resolve_targets(tiny.model, ["embed", "k", "down"])
    needed = {"xtx", "abs_mean", "counts", "fisher"}

    def collect(seed: int, needed: set[str]) -> dict:
        config = CalibrationConfig(**CALIBRATION, seed=seed)
        return collect_statistics(
            tiny.model, tiny.tokenizer, targets, needed, config, progress=False
        )

    first, again, other = collect(0, needed), collect(0, needed), collect(1, {"xtx"})
    for name, entry in first.items():
        for field in ("xtx", "abs_mean", "counts", "fisher"):
            value = getattr(entry, field)
            if value is not None:
                assert torch.equal(value, getattr(again[name], field)), (name, field)
    down = "model.layers.0.mlp.down_proj"
    assert not torch.equal(first[down].xtx, other[down].xtx)


def test_a_fresh_model_gives_the_same_compression(tokenizer):
    """Same model, recipe and seed: identical stored tensors (statistics from the cache)."""
    results = []
    for _ in range(2):
        loaded = LoadedModel(tiny_llama(), tokenizer, "tiny-llama", "AutoModelForCausalLM")
        cm = compress(loaded, "svdllm", "k,up", 2.0)
        results.append(cm.groups[0].stored.tensors())
    for key, tensor in results[0].items():
        assert torch.equal(tensor, results[1][key])
