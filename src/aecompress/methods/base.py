"""The one interface every compression method implements, and the method registry.

A method fits one group of same-shape matrices ([out, in] layout, stacked row-wise when
the group spans layers) under a budget of stored numbers, and returns what it stores.
It can rebuild each matrix densely, and may serve it with a cheaper factorised module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.modules import dense_embedding, dense_linear
from aecompress.recipe import describe


class MethodOptions(BaseModel):
    """Options of a method; unknown keys are an error (a typo in a recipe fails loudly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Stored:
    """What a method stores for one group: tensors shared by all members, per-member tensors,
    and JSON metadata (rank, latent width, ...). Tensors become nn.Parameters once fitted so
    that runtime modules share them and fine-tuning updates what is saved."""

    shared: dict[str, torch.Tensor]
    members: list[dict[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat view: shared tensors as 'shared.NAME', member i's as 'i.NAME'."""
        flat = {f"shared.{name}": t for name, t in self.shared.items()}
        for index, member in enumerate(self.members):
            flat.update({f"{index}.{name}": t for name, t in member.items()})
        return flat

    @classmethod
    def from_tensors(
        cls, flat: dict[str, torch.Tensor], count: int, meta: dict[str, Any]
    ) -> Stored:
        shared = {k.removeprefix("shared."): t for k, t in flat.items() if k.startswith("shared.")}
        members: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
        for key, tensor in flat.items():
            head, _, name = key.partition(".")
            if head != "shared":
                members[int(head)][name] = tensor
        return cls(shared, members, meta)

    def as_parameters(self, trainable: bool = True) -> Stored:
        """The same tensors wrapped as nn.Parameters (float tensors only: indices stay)."""

        def wrap(t: torch.Tensor) -> torch.Tensor:
            if isinstance(t, nn.Parameter) or not t.is_floating_point():
                return t
            fresh = t.detach().clone(memory_format=torch.contiguous_format)
            return nn.Parameter(fresh, requires_grad=trainable)

        return Stored(
            {k: wrap(t) for k, t in self.shared.items()},
            [{k: wrap(t) for k, t in m.items()} for m in self.members],
            self.meta,
        )


@dataclass
class FitContext:
    """What a method may use beyond the weights: a name for messages, the seed, per-member
    calibration statistics (when the method asked for some), and progress reporting."""

    group: str
    seed: int = 0
    statistics: Sequence[TargetStatistics] | None = None
    progress: bool = True
    validate: Callable[[list[torch.Tensor]], float] | None = None


class Method(ABC):
    """A compression method: options + fit + rebuild (+ optional factorised modules)."""

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions

    def __init__(self, options: MethodOptions) -> None:
        self.options = options

    def statistics_needed(self) -> set[str]:
        """Calibration statistics `fit` reads from context.statistics (see calibration.py)."""
        return set()

    @abstractmethod
    def fit(self, matrices: Sequence[torch.Tensor], budget: float, context: FitContext) -> Stored:
        """Compress `matrices` (same shape, [out, in]) into at most `budget` stored numbers."""

    @abstractmethod
    def reconstruct(self, stored: Stored, index: int) -> torch.Tensor:
        """Member `index` rebuilt as a dense [out, in] matrix."""

    def linear(self, stored: Stored, index: int, bias: torch.Tensor | None) -> nn.Module:
        """The runtime module serving member `index` as a Linear (default: decoded once)."""
        return dense_linear(self.reconstruct(stored, index), bias)

    def embedding(self, stored: Stored, index: int, padding_idx: int | None) -> nn.Module:
        """The runtime module serving member `index` as an Embedding (default: decoded once)."""
        return dense_embedding(self.reconstruct(stored, index), padding_idx)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, options: dict[str, Any] | None = None) -> Method:
    """Instantiate a registered method with validated options."""
    if name not in METHODS:
        raise AecompressError(f"unknown method '{name}': use {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    try:
        return cls(cls.Options(**(options or {})))
    except ValidationError as error:
        raise AecompressError(describe(error, f"method '{name}' options")) from error
