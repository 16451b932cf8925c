"""Compressing a model into an artifact folder, streamed from disk when it is larger than
memory.

Streamed, the model is a skeleton without weights (streaming.py) and the sequential
pipeline fills each stage's blocks from the safetensors checkpoint, fits them, moves the
calibration streams past them, then writes the stage's stored tensors and untouched
parameters to a shard of the artifact and frees them: the peak is one stage's weights,
its statistics and the hidden states, not the model. The tensors outside the blocks that
nothing compresses are copied from the checkpoint a tensor at a time at the end, the
manifest last, and the folder appears atomically, as an in-memory save does. The stored
tensors are the in-memory path's to the bit: the same fits in float32, rounded to the
storage dtype only when written, as round_to_storage rounds them.

Whatever needs the whole model at once does not stream: gradient statistics (Fisher /
L1), budget allocation by sensitivity, selection on the validation metric, the
independent pipeline, targets outside the blocks that need activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.artifact.folder import atomic_folder
from aecompress.artifact.save import (
    check_artifact_path,
    check_group_names,
    finish_artifact,
    stored_state,
    untouched_state,
)
from aecompress.artifact.weights import ShardWriter
from aecompress.budget import check_ratio
from aecompress.calibration import GRADIENT_STATISTICS
from aecompress.compressed import CompressedGroup, CompressedModel, member_path
from aecompress.engine import choose_pipeline, compress
from aecompress.errors import AecompressError
from aecompress.estimate import estimate_memory
from aecompress.memory import available_memory
from aecompress.methods import Stored
from aecompress.models import (
    EMBEDDED,
    auto_class_for,
    check_vocabulary,
    load_config,
    load_model,
    load_tokenizer,
    model_skeleton,
    resolve_device,
)
from aecompress.pipeline.plan import PlannedGroup, plan_groups, storage_dtype
from aecompress.pipeline.sequential import BlockStream, Stage, run_sequential
from aecompress.recipe import Recipe
from aecompress.streaming import (
    CheckpointBlocks,
    checkpoint_sha256,
    skeleton_from_checkpoint,
    streamable_folder,
    why_not_streamable,
)
from aecompress.targets import output_head_path, transformer_blocks, untie_embeddings

logger = logging.getLogger(__name__)


def compress_to_folder(
    model: str,
    output: str | Path,
    recipe: Recipe | None = None,
    *,
    progress: bool = True,
    **fields: Any,
) -> Path:
    """Compress the model `model` names (an embedded alias, a folder, a .gguf file or a
    hub id) as `recipe` (or the recipe `fields`) says and write its artifact to the
    folder `output`; returns the folder. `recipe.stream`: True streams the model from its
    safetensors checkpoint a block at a time, False loads it whole, `auto` streams when
    loaded whole it would not fit in the available memory (and the recipe streams)."""
    recipe = recipe or Recipe.parse({"model": model, **fields})
    check_ratio(recipe.ratio)
    recipe.calibration.check()
    folder, reason = _folder_to_stream(model, recipe)
    if folder is not None:
        streamed = Streamed.prepare(model, folder, recipe)
        blockers = streamed.blockers()
        if not blockers:
            if reason:
                logger.warning("streaming %s from disk a block at a time: %s", model, reason)
            return streamed.run(output, progress)
        if recipe.stream is True:
            raise AecompressError(f"cannot stream {model}: {blockers[0]}")
        logger.warning("not streaming %s (%s): %s; loading it whole", model, reason, blockers[0])
    cm = compress(load_model(model), recipe, progress=progress, build_modules=False)
    cm.save_pretrained(output)
    return Path(output)


def _folder_to_stream(model: str, recipe: Recipe) -> tuple[Path | None, str]:
    """The checkpoint folder to stream `model` from (None: load it whole), and why when
    `stream: auto` chose it."""
    if recipe.stream is False:
        return None, ""
    folder = streamable_folder(model)
    if folder is None:
        if recipe.stream is True:
            raise AecompressError(f"cannot stream {model}: {why_not_streamable(model)}")
        return None, ""
    if recipe.stream is True:
        return folder, ""
    needed = estimate_memory(model_skeleton(model), recipe, streamed=False).total
    available = available_memory()
    if available is None or needed <= available:
        return None, ""
    gib = 2**30
    return folder, f"loaded whole it needs {needed / gib:.1f} GiB, {available / gib:.1f} free"


def streaming_blockers(
    recipe: Recipe, planned: list[PlannedGroup], pipeline: str, model: PreTrainedModel
) -> list[str]:
    """Why compressing `model` as planned needs the whole model in memory, each naming
    the option; empty when it streams."""
    if recipe.slices_stream:
        return ["slicegpt rotates the whole model at once"]
    found = transformer_blocks(model)
    if found is None:
        return [f"{type(model).__name__} has no transformer blocks to stream"]
    blocks = f"{found[0]}."
    gradients = {
        p.method.name for p in planned if p.method.statistics_needed() & GRADIENT_STATISTICS
    }
    selecting = {p.method.name for p in planned if p.method.selects_on_validation()}
    outside = [
        p.group.name
        for p in planned
        if p.method.statistics_needed()
        and any(t.kind != "embedding" and not t.path.startswith(blocks) for t in p.group.members)
    ]
    blockers = []
    if gradients:
        names = ", ".join(sorted(gradients))
        blockers.append(f"{names}: Fisher / L1 statistics need gradients of the whole model")
    if selecting:
        blockers.append(
            f"{', '.join(sorted(selecting))} with selection: validation measures the whole model"
        )
    if outside:
        blockers.append(
            f"{outside[0]} lies outside the blocks and needs activations of the whole model"
        )
    if recipe.allocate == "sensitivity":
        blockers.append("allocate: sensitivity scores every group on the whole model")
    if pipeline != "sequential":
        chosen = "chosen by pipeline: auto" if recipe.pipeline == "auto" else "asked for"
        blockers.append(
            f"the independent pipeline ({chosen}) runs on the whole model; the sequential "
            "one streams (--pipeline sequential)"
        )
    return blockers


@dataclass
class Streamed:
    """A model to compress from its checkpoint folder: its skeleton (no weights), its
    tokenizer, and the plan the recipe makes of it."""

    name: str
    folder: Path
    recipe: Recipe
    model: PreTrainedModel
    auto_class: str
    tokenizer: PreTrainedTokenizerBase | None
    planned: list[PlannedGroup]

    @classmethod
    def prepare(cls, name: str, folder: Path, recipe: Recipe) -> Streamed:
        auto_class = auto_class_for(load_config(str(folder)))
        model = skeleton_from_checkpoint(folder, auto_class)
        tokenizer = load_tokenizer(str(folder))
        check_vocabulary(model, tokenizer, name)
        planned = plan_groups(model, recipe)
        return cls(name, folder, recipe, model, auto_class, tokenizer, planned)

    def blockers(self) -> list[str]:
        pipeline = choose_pipeline(self.recipe, self.planned, self.model)
        return streaming_blockers(self.recipe, self.planned, pipeline, self.model)

    def run(self, output: str | Path, progress: bool) -> Path:
        """Compress and write the artifact folder `output` as it goes (see the module
        docstring); the same steps, in the same order, as engine.compress."""
        recipe, model = self.recipe, self.model
        path = check_artifact_path(output, self.tokenizer)
        source = CheckpointBlocks(model, self.folder)
        base_sha256 = checkpoint_sha256(source)
        device = resolve_device(recipe.device)
        torch.manual_seed(recipe.seed)
        if recipe.untie_embeddings:  # the head then reads the embedding's tensor
            untie_embeddings(model)
            source = CheckpointBlocks(model, source.files)
        planned = plan_groups(model, recipe)
        check_group_names([plan.group.name for plan in planned])
        tied = output_head_path(model) if any(p.group.family == "embed" for p in planned) else None
        dtype = storage_dtype(recipe, model)
        with atomic_folder(path) as work:
            writer = ShardWriter(work, dtype)
            write = partial(_write_finished, writer, model, source.blocks_path)
            groups = run_sequential(
                model,
                self.tokenizer,
                planned,
                calibration=recipe.calibration,
                config=recipe.sequential,
                refine=recipe.refine,
                base_sha256=base_sha256,
                tied_output=tied,
                seed=recipe.seed,
                progress=progress,
                stream=BlockStream(source, device, write),
            )
            cm = CompressedModel(
                model,
                self.tokenizer,
                recipe.model_dump(mode="json"),
                groups,
                base_model=self.name if self.name in EMBEDDED else str(self.folder),
                auto_class=self.auto_class,
                base_sha256=base_sha256,
                tied_output=tied,
                storage_dtype=dtype,
            )
            untouched, cm.aliases = untouched_state(model, cm.replaced_paths())
            blocks = f"{source.blocks_path}."
            outside = {k: t for k, t in untouched.items() if not k.startswith(blocks)}
            if outside:  # read from the checkpoint a tensor at a time as they are written
                writer.write(outside, values=source.read)
            finish_artifact(work, cm, writer.finish(), sum(t.numel() for t in untouched.values()))
        return path


def _write_finished(
    writer: ShardWriter,
    model: nn.Module,
    blocks_path: str,
    groups: list[CompressedGroup],
    stage: Stage | None,
) -> None:
    """A shard of the groups' stored tensors and (for a stage) its blocks' untouched
    parameters; then the stored tensors are freed (put on the meta device)."""
    tensors = stored_state(groups)
    if stage is not None:
        replaced = [member_path(t) for fitted in groups for t in fitted.group.members]
        prefixes = tuple(f"{blocks_path}.{index}." for index in stage.indices)
        untouched, _ = untouched_state(model, replaced)
        tensors |= {k: t for k, t in untouched.items() if k.startswith(prefixes)}
    if tensors:
        writer.write(tensors)
    for fitted in groups:
        free_stored(fitted.stored)


def free_stored(stored: Stored) -> None:
    """Put stored tensors (written) on the meta device: their shapes and dtypes stay for
    the manifest's bookkeeping (sizes, bits, ratios)."""
    for tensors in [stored.shared, *stored.members]:
        for key, tensor in tensors.items():
            empty = torch.empty_like(tensor, device="meta")
            parameter = isinstance(tensor, nn.Parameter)
            tensors[key] = nn.Parameter(empty, requires_grad=False) if parameter else empty
