"""The one entry point: resolve targets, fit a method per group, swap modules in place."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.budget import check_ratio, stored_numel
from aecompress.calibration import TargetStatistics, cached_statistics
from aecompress.data import wikitext2_text
from aecompress.errors import AecompressError
from aecompress.evaluation.kinds import require
from aecompress.evaluation.perplexity import window_ids
from aecompress.evaluation.sts import stsb
from aecompress.methods import FitContext, Method, Stored, make_method
from aecompress.models import LoadedModel, auto_class_for, load_model
from aecompress.modules import FusedLinear, dense_embedding, dense_linear
from aecompress.recipe import Recipe
from aecompress.targets import (
    Group,
    Target,
    dense_weight,
    group_targets,
    resolve_targets,
    weight_matrix,
)


@dataclass
class CompressedGroup:
    """One fitted group: its matrices, what the method stored, and its true ratio."""

    group: Group
    stored: Stored
    shape: tuple[int, int]  # of each member, [out, in]

    @property
    def original_numel(self) -> int:
        return len(self.group.members) * self.shape[0] * self.shape[1]

    @property
    def stored_numel(self) -> int:
        return stored_numel(self.stored.tensors().values())

    @property
    def ratio(self) -> float:
        return self.original_numel / self.stored_numel


@dataclass
class CompressedModel:
    """A transformers model whose targets were replaced, and everything needed to save it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    recipe: Recipe
    groups: list[CompressedGroup]
    base_model: str
    auto_class: str
    base_sha256: str
    tied_output: str | None = None  # path of an output head that shares the embedding's factors
    decoded: bool = False  # True when loaded with every matrix decoded to a dense weight
    aliases: dict[str, str] = field(default_factory=dict)  # tied untouched keys -> kept key

    def save_pretrained(self, path: str) -> None:
        """Write the artifact folder (see aecompress.artifact)."""
        from aecompress.artifact import save_artifact

        save_artifact(self, path)

    def replaced_paths(self) -> list[str]:
        """Module paths whose weights now come from a group's stored tensors."""
        paths = [member_path(t) for g in self.groups for t in g.group.members]
        return paths + ([self.tied_output] if self.tied_output else [])

    def totals(self) -> dict[str, Any]:
        original = sum(g.original_numel for g in self.groups)
        stored = sum(g.stored_numel for g in self.groups)
        return {"target_params": original, "stored_params": stored, "ratio": original / stored}


def member_path(target: Target) -> str:
    """Path of the module that serves a target (a fused target's part lives inside)."""
    return target.path if target.part is None else f"{target.path}.parts.{target.part[0]}"


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's named parameters and buffers (shared tensors once)."""
    digest, seen = hashlib.sha256(), set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def output_head_path(model: PreTrainedModel) -> str | None:
    """Path of the output embedding when it shares its weight with the input embedding."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or getattr(head, "weight", None) is not embed.weight:
        return None
    return next(path for path, module in model.named_modules() if module is head)


def untie_embeddings(model: PreTrainedModel) -> None:
    """Give the output head its own copy of the embedding so only the input is compressed."""
    head = model.get_output_embeddings()
    if head is not None:
        head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, nn.Parameter) else None


def runtime_module(
    method: Method, stored: Stored, index: int, original: nn.Module, *, kind: str, decode: bool
) -> nn.Module:
    """The module serving member `index` in place of `original` (decoded dense if asked)."""
    if kind == "embedding":
        padding_idx = getattr(original, "padding_idx", None)
        if decode:
            return dense_embedding(method.reconstruct(stored, index), padding_idx)
        return method.embedding(stored, index, padding_idx)
    if decode:
        return dense_linear(method.reconstruct(stored, index), _bias_of(original))
    return method.linear(stored, index, _bias_of(original))


def place(model: nn.Module, target: Target, build: Callable[[nn.Module], nn.Module]) -> None:
    """Replace the target's module by `build(original)` (a fused target: only its part)."""
    if target.part is None:
        model.set_submodule(target.path, build(model.get_submodule(target.path)))
        return
    fused = model.get_submodule(target.path)
    if not isinstance(fused, FusedLinear):
        weight = dense_weight(fused, target.kind)
        fused = FusedLinear.split(weight, _bias_of(fused), target.part[1])
        model.set_submodule(target.path, fused)
    index = target.part[0]
    fused.parts[index] = build(fused.parts[index])


def inject(
    model: PreTrainedModel,
    fitted: CompressedGroup,
    method: Method,
    tied_output: str | None,
    decode: bool = False,
) -> None:
    """Put the group's runtime modules in place of its targets (and of a tied output head)."""
    for index, target in enumerate(fitted.group.members):
        kind = "embedding" if target.kind == "embedding" else "linear"
        build = partial(runtime_module, method, fitted.stored, index, kind=kind, decode=decode)
        place(model, target, build)
        if kind == "embedding" and tied_output is not None:
            head = Target(tied_output, target.family, None, "linear")
            place(model, head, partial(build, kind="linear"))


# The validation signal a method may select with (context.validate): few, short windows.
VALIDATION_WINDOWS = 8
VALIDATION_SEQ_LEN = 256


def validation_metric(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
) -> Callable[[], float]:
    """The model's validation metric as it stands, lower is better; never a reported split.

    Causal LMs: WikiText-2 *validation* perplexity over the first VALIDATION_WINDOWS
    windows of VALIDATION_SEQ_LEN tokens. Other models (sentence encoders): minus the STS-B
    *dev* Spearman (a model that can run neither gets the STS task's one-line error).
    """
    if tokenizer is None:
        raise AecompressError("selection by the validation metric needs the model's tokenizer")
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        ids = window_ids(
            tokenizer, wikitext2_text("validation"), VALIDATION_SEQ_LEN, VALIDATION_WINDOWS
        )

        @torch.inference_mode()
        def validation_perplexity() -> float:
            nll = 0.0
            for batch in ids.split(4):
                logits = model(input_ids=batch).logits[:, :-1].float()
                nll += F.cross_entropy(
                    logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
                ).item()
            return math.exp(nll / ids[:, 1:].numel())

        return validation_perplexity
    require("stsb", model)

    def sts_dev() -> float:
        return -float(stsb(model, tokenizer, split="dev", progress=False)["spearman"])

    return sts_dev


@contextmanager
def swapped_weights(
    model: nn.Module, targets: Sequence[Target], matrices: Sequence[torch.Tensor]
) -> Iterator[None]:
    """Temporarily put dense `matrices` ([out, in]) in place of the targets' weights."""
    live = [weight_matrix(model, t) for t in targets]
    for target, weight, matrix in zip(targets, live, matrices, strict=True):
        if weight.shape != matrix.shape:
            raise ValueError(f"{target.name}: got {tuple(matrix.shape)}, is {tuple(weight.shape)}")
    saved = [w.clone() for w in live]
    try:
        with torch.no_grad():
            for weight, matrix in zip(live, matrices, strict=True):
                weight.copy_(matrix)
        yield
    finally:
        with torch.no_grad():
            for weight, original in zip(live, saved, strict=True):
                weight.copy_(original)


def make_validate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, group: Group
) -> Callable[[list[torch.Tensor]], float]:
    """context.validate for a group: the validation metric with the group's matrices
    replaced by the given dense ones (prepared on first use, so unused it costs nothing)."""
    metric: Callable[[], float] | None = None

    def validate(matrices: list[torch.Tensor]) -> float:
        nonlocal metric
        if metric is None:
            metric = validation_metric(model, tokenizer)
        was_training = model.training
        model.eval()
        try:
            with swapped_weights(model, group.members, matrices):
                return metric()
        finally:
            model.train(was_training)

    return validate


def fit_group(
    method: Method,
    model: PreTrainedModel,
    group: Group,
    recipe: Recipe,
    statistics: dict[str, TargetStatistics] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> CompressedGroup:
    """Fit `method` on the group's matrices within the recipe's budget."""
    matrices = [weight_matrix(model, t).float().clone() for t in group.members]
    for target, matrix in zip(group.members, matrices, strict=True):
        if not torch.isfinite(matrix).all():
            raise AecompressError(
                f"{target.name} has NaN or infinite weights: refusing to compress"
            )
    shape = (matrices[0].shape[0], matrices[0].shape[1])
    budget = len(matrices) * shape[0] * shape[1] / recipe.ratio
    context = FitContext(
        group=group.name,
        seed=recipe.seed,
        progress=progress,
        validate=make_validate(model, tokenizer, group),
    )
    if statistics is not None:
        context.statistics = [statistics[t.name] for t in group.members]
    stored = method.fit(matrices, budget, context).as_parameters()
    fitted = CompressedGroup(group, stored, shape)
    if fitted.stored_numel > budget:
        raise RuntimeError(
            f"method {method.name} stored {fitted.stored_numel} numbers for {group.name}, "
            f"over its budget of {budget:.0f}"
        )
    return fitted


def compress(
    model: PreTrainedModel | LoadedModel | str,
    recipe: Recipe | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
    **fields: Any,
) -> CompressedModel:
    """Compress `model` (a model, a loaded model or a name) in place as `recipe` says.

    Recipe fields may also be given as keywords: compress(m, method="svd", ratio=2,
    targets=["k"]). Returns the CompressedModel, ready to evaluate or save.
    """
    recipe = recipe or Recipe.parse(fields)
    check_ratio(recipe.ratio)
    source, auto_class = recipe.model or "", None
    if isinstance(model, str):
        model = load_model(model)
    if isinstance(model, LoadedModel):
        tokenizer = tokenizer or model.tokenizer
        source, auto_class = model.source, model.auto_class
        model = model.model
    method = make_method(recipe.method, recipe.options)
    torch.manual_seed(recipe.seed)
    base_sha256 = weights_sha256(model)
    if recipe.untie_embeddings:
        untie_embeddings(model)
    targets = resolve_targets(model, recipe.targets)
    groups = group_targets(model, targets, recipe.group)
    tied = output_head_path(model) if any(g.family == "embed" for g in groups) else None
    statistics = None
    if needed := method.statistics_needed():
        statistics = cached_statistics(
            model, tokenizer, targets, needed, recipe.calibration, base_sha256, progress=progress
        )
    fitted_groups = []
    for group in tqdm(groups, desc=f"compress ({method.name})", disable=not progress):
        fitted = fit_group(method, model, group, recipe, statistics, tokenizer, progress)
        inject(model, fitted, method, tied if group.family == "embed" else None)
        fitted_groups.append(fitted)
    return CompressedModel(
        model,
        tokenizer,
        recipe,
        fitted_groups,
        base_model=source,
        auto_class=auto_class or auto_class_for(model),
        base_sha256=base_sha256,
        tied_output=tied,
    )
