"""Swapping modules: a fitted group's runtime modules take the places of its targets.

The one place where modules of a model are replaced (like peft's _create_and_replace):
for each member of a group, the method builds the module that serves it (factorised,
decoded once, or rebuilt from the stored tensors on every call while training), and it
is set at the target's path; a fused target (GPT-2's c_attn) is split into parts first.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from aecompress.methods import Method, Stored
from aecompress.modules import FusedLinear, dense_embedding, dense_linear, plain_linear
from aecompress.targets import STRUCTURED_PARTS, Group, Target, dense_weight, structured_path

# How members are served: the method's runtime module, decoded once into a dense weight,
# rebuilt from the stored tensors on every call (differentiable: refinement trains them),
# the runtime module built on the first call (a model being compressed or saved), or
# lazy: a Linear whose runtime module would be its decoded matrix rebuilt on every call
# instead, so only the stored form stays in memory (a model too large to hold decoded).
Serving = Literal["runtime", "decoded", "trainable", "deferred", "lazy"]


class Deferred(nn.Module):
    """Serves a member through the method's runtime module, built on the first call: until
    then only the stored tensors are held, so a model being compressed and saved never
    holds a decoded copy of a matrix beside its stored form (sparse and AE methods serve
    decoded weights). Its state is the target's bias alone, under the runtime module's name;
    the built module is not registered (moving the model drops it, to be built again)."""

    def __init__(self, build: Callable[[], nn.Module], bias: torch.Tensor | None) -> None:
        super().__init__()
        self._build = build
        self.bias = bias
        self._served: list[nn.Module] = []

    def built(self) -> nn.Module:
        if not self._served:
            with torch.no_grad():
                self._served.append(self._build())
        return self._served[0]

    def forward(self, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.built()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        """Attributes of the runtime module (its weight, factors, ...), building it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self.built(), name)

    def _apply(self, fn: Callable[..., torch.Tensor], recurse: bool = True) -> Deferred:
        self._served.clear()
        return super()._apply(fn, recurse)


class RebuiltLinear(nn.Module):
    """y = x W^T + bias, W = method.reconstruct(stored, index) on every call (training)."""

    def __init__(self, method: Method, stored: Stored, index: int, bias: torch.Tensor | None):
        super().__init__()
        self.method, self.stored, self.index, self.bias = method, stored, index, bias
        self.params = nn.ParameterList(_parameters(stored, index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.method.reconstruct(self.stored, self.index)
        return F.linear(x, weight.to(x.dtype), self.bias)


class RebuiltEmbedding(nn.Module):
    """Lookup in method.reconstruct(stored, index), rebuilt on every call (training)."""

    def __init__(self, method: Method, stored: Stored, index: int, padding_idx: int | None):
        super().__init__()
        self.method, self.stored, self.index, self.padding_idx = method, stored, index, padding_idx
        self.params = nn.ParameterList(_parameters(stored, index))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.method.reconstruct(self.stored, self.index), self.padding_idx)


def _parameters(stored: Stored, index: int) -> list[nn.Parameter]:
    tensors = [*stored.shared.values(), *stored.members[index].values()]
    return [t for t in tensors if isinstance(t, nn.Parameter)]


def bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, nn.Parameter) else None


def serving_module(
    method: Method,
    stored: Stored,
    index: int,
    original: nn.Module,
    *,
    kind: str,
    serving: Serving,
) -> nn.Module:
    """The module serving member `index` in place of `original`."""
    if serving == "deferred":  # holds what it needs of `original`, not the module itself
        if kind == "embedding":
            padding_idx = getattr(original, "padding_idx", None)
            return Deferred(partial(method.embedding, stored, index, padding_idx), None)
        bias = bias_of(original)
        return Deferred(partial(method.linear, stored, index, bias, prefill=True), bias)
    if kind == "embedding":  # lazy: held as at run time (one matrix, the outputs' dtype)
        padding_idx = getattr(original, "padding_idx", None)
        if serving == "trainable":
            return RebuiltEmbedding(method, stored, index, padding_idx)
        if serving == "decoded":
            with torch.no_grad():
                return dense_embedding(method.reconstruct(stored, index), padding_idx)
        return method.embedding(stored, index, padding_idx)
    bias = bias_of(original)
    if serving == "trainable" or (serving == "lazy" and method.decodes_at_load):
        return RebuiltLinear(method, stored, index, bias)
    if serving == "decoded":
        with torch.no_grad():
            return dense_linear(method.reconstruct(stored, index), bias)
    return method.linear(stored, index, bias)


def place(model: nn.Module, target: Target, build: Callable[[nn.Module], nn.Module]) -> None:
    """Replace the target's module by `build(original)` (a fused target: only its part)."""
    if target.part is None:
        model.set_submodule(target.path, build(model.get_submodule(target.path)))
        return
    fused = model.get_submodule(target.path)
    if not isinstance(fused, FusedLinear):
        weight = dense_weight(fused, target.kind)
        fused = FusedLinear.split(weight, bias_of(fused), target.part[1])
        model.set_submodule(target.path, fused)
    index = target.part[0]
    fused.parts[index] = build(fused.parts[index])


def restore(model: nn.Module, target: Target) -> None:
    """Undo `place` for a decoded target: its path holds a module of the base model's own
    class and layout again (a fused module made whole, a Conv1D transposed back)."""
    if target.kind in STRUCTURED_PARTS:  # its block already has the base's own matrices
        return
    module = model.get_submodule(target.path)
    if isinstance(module, FusedLinear):
        weight, bias = module.merged()
    elif isinstance(module, nn.Linear):
        weight, bias = module.weight, module.bias
    else:  # an embedding: decoded into an nn.Embedding already
        return
    with torch.no_grad():
        model.set_submodule(target.path, plain_linear(weight, bias, target.kind))


def inject(
    model: PreTrainedModel | nn.Module,
    group: Group,
    method: Method,
    stored: Stored,
    tied_output: str | None = None,
    serving: Serving = "runtime",
    only: Collection[int] | None = None,
) -> None:
    """Put the group's serving modules in place of its targets (and of a tied output head,
    which then shares the embedding's stored tensors); `only`: the members of these
    indices alone (a model filled a block at a time)."""
    for index, target in enumerate(group.members):
        if only is not None and index not in only:
            continue
        if target.kind in STRUCTURED_PARTS:  # the whole block, whatever the serving: smaller
            path = structured_path(target)
            model.set_submodule(path, method.structured(stored, index, model.get_submodule(path)))
            continue
        kind = "embedding" if target.kind == "embedding" else "linear"
        place(model, target, partial(_build, method, stored, index, kind, serving))
        if kind == "embedding" and tied_output is not None:
            head = Target(tied_output, target.family, None, "linear")
            place(model, head, partial(_build, method, stored, index, "linear", serving))
            if serving != "decoded":  # modules without a weight parameter to tie
                model.tie_weights = _served_tie  # type: ignore[method-assign]


def _served_tie(*args: object, **kwargs: object) -> None:
    """tie_weights of a model whose tied head is served from the embedding's stored tensors:
    nothing left to tie (transformers' own would fail on the factorised modules; HFLM and
    other tools call it)."""


def _build(
    method: Method, stored: Stored, index: int, kind: str, serving: Serving, original: nn.Module
) -> nn.Module:
    return serving_module(method, stored, index, original, kind=kind, serving=serving)
