"""Hidden-state streams through transformer blocks: what the first block receives for the
calibration windows, running blocks on it, and capturing the inputs of modules inside.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from aecompress.models import model_device


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs it needs are captured."""


@dataclass
class BlockInputs:
    """The positional (after the hidden states) and keyword inputs of a block for one batch
    (masks, position embeddings): the same in both streams."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Streams:
    """Hidden states entering the current block, per batch, in both streams (the dense one
    None when nothing reads it: no refinement, no dense fitting target)."""

    compressed: list[torch.Tensor]
    dense: list[torch.Tensor] | None
    inputs: list[BlockInputs]

    def dense_states(self) -> list[torch.Tensor]:
        if self.dense is None:
            raise RuntimeError("the dense stream was not kept")
        return self.dense


def capture_block_inputs(
    model: PreTrainedModel, first_block: nn.Module, windows: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[BlockInputs]]:
    """What the first block receives for each batch of windows (the model stops there)."""
    device = model_device(model)
    batches = ({"input_ids": batch.to(device)} for batch in windows.split(batch_size))
    return capture_inputs(model, first_block, batches)


def capture_inputs(
    model: PreTrainedModel, first_block: nn.Module, batches: Iterable[dict[str, Any]]
) -> tuple[list[torch.Tensor], list[BlockInputs]]:
    """What the first block receives for each batch of the model's keyword inputs (the
    model stops there)."""
    hidden: list[torch.Tensor] = []
    inputs: list[BlockInputs] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rest = dict(kwargs)
        state = args[0] if args else rest.pop("hidden_states")
        hidden.append(state.detach())
        inputs.append(BlockInputs(tuple(args[1:]), rest))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(**batch, use_cache=False)
                except _Stop:
                    continue
    finally:
        handle.remove()
    return hidden, inputs


def run_blocks(
    blocks: Sequence[nn.Module], hidden: torch.Tensor, inputs: BlockInputs
) -> torch.Tensor:
    """The hidden states after `blocks`, in order."""
    for block in blocks:
        out = block(hidden, *inputs.args, **inputs.kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


@contextmanager
def capturing(
    modules: dict[str, nn.Module], stop_when_complete: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Record each module's input (by key) during the next forward pass (run it without
    gradients); with `stop_when_complete` the pass ends (_Stop) once every module has seen
    its input. Modules that read one input tensor get the same object."""
    seen: dict[str, torch.Tensor] = {}

    def hook(key: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(key, args[0])  # the object itself: shared inputs stay one
            if stop_when_complete and len(seen) == len(modules):
                raise _Stop

        return record

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def run_until_stop(blocks: Sequence[nn.Module], hidden: torch.Tensor, inputs: BlockInputs) -> None:
    try:
        run_blocks(blocks, hidden, inputs)
    except _Stop:
        return
    raise RuntimeError("the forward pass never reached the modules it was to capture")


def advance(live: Sequence[nn.Module], dense: Sequence[nn.Module], streams: Streams) -> None:
    """Move both streams (or the compressed one alone) past the stage."""
    with torch.no_grad():
        for index, inputs in enumerate(streams.inputs):
            streams.compressed[index] = run_blocks(live, streams.compressed[index], inputs)
            if streams.dense is not None:
                streams.dense[index] = run_blocks(dense, streams.dense[index], inputs)
