"""What compression gives: each fitted group (CompressedGroup) and the model that holds them
(CompressedModel), the way peft's PeftModel holds its tuner layers.

These types sit below the pipeline, which builds them, and below the artifact package,
which saves and loads them; this module imports neither. CompressedModel.save_pretrained
keeps peft's API (the method lives with the model type) without importing a higher layer:
the artifact package registers its writer here when it is imported (`register_writer`),
and `import aecompress` always imports it. In peft the save helpers sit below the model
type; here loading builds these types, so persistence sits above them and plugs in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.budget import float_bits, stored_bits, stored_numel
from aecompress.methods import Method, Stored
from aecompress.substitution import inject, restore
from aecompress.targets import STRUCTURED_PARTS, Group, Target, structured_path


@dataclass
class CompressedGroup:
    """One fitted group: its targets, the method that fitted it, what it stored, and the
    width of a floating number in the artifact (its storage dtype's)."""

    group: Group
    method: Method
    stored: Stored
    shape: tuple[int, int]  # of each member, [out, in]
    float_bits: int = 32

    @property
    def original_numel(self) -> int:
        return len(self.group.members) * self.shape[0] * self.shape[1]

    @property
    def stored_numel(self) -> int:
        return stored_numel(self.stored.tensors().values())

    @property
    def original_bits(self) -> int:
        """Bits of the original matrices stored densely in the storage dtype."""
        return self.original_numel * self.float_bits

    @property
    def stored_bits(self) -> int:
        return stored_bits(self.stored.tensors().values(), self.float_bits)

    @property
    def ratio(self) -> float:
        """Dense bits over stored bits (what `--ratio` asks for)."""
        return self.original_bits / self.stored_bits

    @property
    def number_ratio(self) -> float:
        """The paper's ratio: original numbers over stored numbers."""
        return self.original_numel / self.stored_numel


@dataclass(frozen=True)
class SlicedStream:
    """A residual stream cut by slicegpt (pipeline/slicing.py) from `hidden_size` to
    `width` directions: the numbers of the blocks' linear layers (its targets) before and
    after, and of the whole base model. The sliced matrices are the model's own tensors."""

    hidden_size: int
    width: int
    target_params: int
    stored_params: int
    model_params_dense: int


@dataclass
class CompressedModel:
    """A transformers model whose targets were replaced, and everything needed to save it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    recipe: dict[str, Any]  # as given (a Recipe dumped to JSON)
    groups: list[CompressedGroup]
    base_model: str
    auto_class: str
    base_sha256: str
    tied_output: str | None = None  # path of an output head that shares the embedding's factors
    decoded: bool = False  # True when loaded with every matrix decoded to a dense weight
    aliases: dict[str, str] = field(default_factory=dict)  # tied untouched keys -> kept key
    storage_dtype: str = "float32"  # of the floating tensors in the file (integers stay)
    sliced: SlicedStream | None = None  # the residual stream slicegpt cut (no groups then)

    def save_pretrained(self, path: str | Path) -> None:
        """Write the artifact folder (atomically)."""
        assert _writer is not None, "aecompress.artifact registers the writer on import"
        _writer(self, path)

    def merge_and_unload(self) -> PreTrainedModel:
        """The plain transformers model (as peft's merge_and_unload): every group decoded
        into a module of the base model's own class, a tied head sharing the decoded
        embedding. This CompressedModel is then decoded and cannot be saved as an artifact."""
        for fitted in self.groups:
            if not self.decoded:
                tied = self.tied_output if fitted.group.family == "embed" else None
                inject(self.model, fitted.group, fitted.method, fitted.stored, tied, "decoded")
            for target in fitted.group.members:
                restore(self.model, target)
        if self.tied_output:
            head = self.model.get_submodule(self.tied_output)
            head.weight = self.model.get_input_embeddings().weight
            self.model.__dict__.pop("tie_weights", None)  # transformers' own again
        self.decoded = True
        return self.model

    def replaced_paths(self) -> list[str]:
        """Module paths whose weights now come from a group's stored tensors."""
        paths = [member_path(t) for g in self.groups for t in g.group.members]
        return paths + ([self.tied_output] if self.tied_output else [])

    def totals(self) -> dict[str, Any]:
        """Numbers and bits of the compressed matrices (the groups' and the sliced
        stream's), dense and stored, and both ratios."""
        original = sum(g.original_numel for g in self.groups)
        stored = sum(g.stored_numel for g in self.groups)
        original_bits = sum(g.original_bits for g in self.groups)
        bits = sum(g.stored_bits for g in self.groups)
        if self.sliced is not None:
            original += self.sliced.target_params
            stored += self.sliced.stored_params
            original_bits += self.sliced.target_params * float_bits(self.storage_dtype)
            bits += self.sliced.stored_params * float_bits(self.storage_dtype)
        return {
            "target_params": original,
            "stored_params": stored,
            "target_bits": original_bits,
            "stored_bits": bits,
            "ratio": original_bits / bits,
            "number_ratio": original / stored,
        }


def member_path(target: Target) -> str:
    """Path of the module that serves a target (a fused target's part lives inside; an
    structured target is served by its whole block: MLP or attention)."""
    if target.kind in STRUCTURED_PARTS:
        return structured_path(target)
    return target.path if target.part is None else f"{target.path}.parts.{target.part[0]}"


# Writes a CompressedModel's artifact folder and returns its path.
Writer = Callable[[CompressedModel, str | Path], Path]
_writer: Writer | None = None


def register_writer(writer: Writer) -> Writer:
    """Make `writer` the one CompressedModel.save_pretrained calls (the artifact package's
    save_artifact registers itself)."""
    global _writer
    _writer = writer
    return writer
