"""The one entry point: a recipe applied to a model, returned as a CompressedModel."""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.artifact import round_to_storage
from aecompress.budget import check_ratio
from aecompress.compressed import CompressedGroup, CompressedModel
from aecompress.errors import AecompressError
from aecompress.evaluation.validation import validation_metric
from aecompress.models import (
    LoadedModel,
    auto_class_for,
    base_folder,
    load_model,
    load_tokenizer,
    resolve_device,
    weights_sha256,
)
from aecompress.pipeline.allocate import allocate
from aecompress.pipeline.independent import run_independent
from aecompress.pipeline.plan import PlannedGroup, plan_groups, storage_dtype
from aecompress.pipeline.sequential import compensates, run_sequential
from aecompress.pipeline.slicing import slice_model
from aecompress.recipe import Recipe
from aecompress.targets import output_head_path, transformer_blocks, untie_embeddings


def choose_pipeline(recipe: Recipe, planned: list[PlannedGroup], model: PreTrainedModel) -> str:
    """The recipe's pipeline; `auto` is sequential (on a model with transformer blocks) when
    refinement is asked for or a method measures output error and prefers it
    (`Method.sequential_by_default`: svdllm, sparsegpt, wanda, ae-data, ..., gptq at 2 bits
    only): on SmolLM2's MLPs that lowered WikiText-2 validation perplexity for svdllm and
    sparsegpt (benchmarks/results/compensation/report.md)."""
    if recipe.pipeline != "auto":
        if recipe.pipeline == "independent" and recipe.refine.steps:
            raise AecompressError("block refinement (refine) needs the sequential pipeline")
        return recipe.pipeline
    if transformer_blocks(model) is None:
        return "independent"
    wanted = recipe.refine.steps or any(
        compensates(plan) and plan.method.sequential_by_default(plan.spec, plan.budget)
        for plan in planned
    )
    return "sequential" if wanted else "independent"


def compress(
    model: PreTrainedModel | LoadedModel | str,
    recipe: Recipe | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    build_modules: bool = True,
    **fields: Any,
) -> CompressedModel:
    """Compress `model` (a model, a loaded model or a name) in place as `recipe` says.

    Recipe fields may also be given as keywords: compress(m, method="svd", ratio=2,
    targets=["k"], calibration={"samples": 128, "seq_len": 512, "data": "mine.jsonl"}).
    A model object loaded from a folder (its config's name_or_path) gets that folder
    recorded as its base, and its tokenizer when `tokenizer` is not given. Returns the
    CompressedModel, ready to evaluate, train or save. With
    `build_modules=False` each compressed module is built on its first call instead (until
    then the model holds no decoded copy beside the stored tensors, nor the modules'
    parameters): the least memory for a model that is only saved, as `aecompress compress`.
    """
    recipe = recipe or Recipe.parse(fields)
    if recipe.stream is True:
        raise AecompressError(
            "stream: true writes the artifact as it goes: use aecompress.compress_to_folder "
            "(or `aecompress compress --stream`)"
        )
    check_ratio(recipe.ratio)
    recipe.calibration.check()
    source, auto_class = recipe.model or "", None
    if isinstance(model, str):
        model = load_model(model)
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        source, auto_class = model.source, model.auto_class
        model = model.model
    elif not source and (folder := base_folder(model)):
        source = folder  # a model object loaded from a folder: its base, and tokenizer
        tokenizer = tokenizer or load_tokenizer(folder)
    device = resolve_device(recipe.device)
    torch.manual_seed(recipe.seed)
    base_sha256 = weights_sha256(model)
    cast(nn.Module, model).to(device)
    groups: list[CompressedGroup] = []
    tied, sliced = None, None
    if recipe.slices_stream:
        sliced = slice_model(model, tokenizer, recipe.ratio, recipe.calibration, progress)
    else:
        groups, tied = _fitted_groups(model, tokenizer, recipe, base_sha256, progress)
    compressed = CompressedModel(
        model,
        tokenizer,
        recipe.model_dump(mode="json"),
        groups,
        base_model=source,
        auto_class=auto_class or auto_class_for(model),
        base_sha256=base_sha256,
        tied_output=tied,
        sliced=sliced,
    )
    round_to_storage(
        compressed, storage_dtype(recipe, model), "runtime" if build_modules else "deferred"
    )
    return compressed


def _fitted_groups(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    recipe: Recipe,
    base_sha256: str,
    progress: bool,
) -> tuple[list[CompressedGroup], str | None]:
    """Plan the recipe's groups and fit them on the pipeline it chooses; returns them and
    the output head that shares a compressed embedding, if any."""
    if recipe.untie_embeddings:
        untie_embeddings(model)
    planned = plan_groups(model, recipe)
    tied = output_head_path(model) if any(p.group.family == "embed" for p in planned) else None
    common: dict[str, Any] = {
        "calibration": recipe.calibration,
        "base_sha256": base_sha256,
        "tied_output": tied,
        "seed": recipe.seed,
        "validation": partial(validation_metric, model, tokenizer),
        "progress": progress,
    }
    pipeline = choose_pipeline(recipe, planned, model)
    if recipe.allocate == "sensitivity":
        planned = allocate(
            model,
            tokenizer,
            planned,
            calibration=recipe.calibration,
            base_sha256=base_sha256,
            seed=recipe.seed,
            progress=progress,
        )
    if pipeline == "sequential":
        groups = run_sequential(
            model, tokenizer, planned, config=recipe.sequential, refine=recipe.refine, **common
        )
    else:
        groups = run_independent(model, tokenizer, planned, **common)
    return groups, tied
