"""Streamed evaluation: a causal LM's logits computed one transformer block at a time.

The hidden states of every batch stay in memory (in chunks that fit it), the weights of one
block at a time: the model runs each batch up to its first block (embeddings, masks,
position embeddings), then each block is loaded from its BlockSource onto the device,
runs every batch, and is released; last, the model's own forward runs each batch again
with its blocks replaying the final hidden states, so the final norm and the head make
the logits exactly as in memory. The tasks score those logits with their in-memory code
(a `Forward`, evaluation/common.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aecompress.evaluation.common import Batch
from aecompress.evaluation.perplexity import available_memory
from aecompress.pipeline.streams import BlockInputs, capture_inputs
from aecompress.progress import progress_bar

if TYPE_CHECKING:
    from aecompress.streaming import BlockSource

MEMORY_SHARE = 0.5  # of the available memory, for the hidden states of one chunk of batches


@dataclass
class StreamedForward:
    """The logits of batches, computed block by block from `source` (its model's modules
    outside the blocks already on `device`, the blocks loaded one at a time).

    `budget`: bytes the hidden states of one chunk of batches may take (default: a share
    of the memory available when it starts); each chunk passes through every block.
    """

    source: BlockSource
    device: torch.device
    budget: int | None = None
    progress: bool = False

    @torch.inference_mode()
    def __call__(self, batches: Sequence[Batch]) -> Iterator[torch.Tensor]:
        model = self.source.model
        budget = self.budget or int(MEMORY_SHARE * available_memory())
        for chunk in chunks(batches, budget, model.config.hidden_size):
            finals, returns_tuple = self._through_blocks(chunk)
            for batch, final in zip(chunk, finals, strict=True):
                with replaying(self.source.blocks, final, returns_tuple):
                    logits = model(**batch).logits
                yield logits

    def _through_blocks(self, chunk: Sequence[Batch]) -> tuple[list[torch.Tensor], bool]:
        """The hidden states after the last block of each batch, and whether the blocks
        return a tuple (their output's form, for the replay)."""
        blocks = self.source.blocks
        hidden, inputs = capture_inputs(self.source.model, blocks[0], chunk)
        returns_tuple = False
        for index in progress_bar(range(len(blocks)), desc="blocks", enabled=self.progress):
            self.source.load(index, self.device)
            try:
                for number, given in enumerate(inputs):
                    hidden[number], returns_tuple = run_block(blocks[index], hidden[number], given)
            finally:
                self.source.release(index)
        return hidden, returns_tuple


def run_block(block: nn.Module, hidden: torch.Tensor, inputs: BlockInputs) -> tuple[Any, bool]:
    """The block's output hidden states, and whether it returned them in a tuple."""
    out = block(hidden, *inputs.args, **inputs.kwargs)
    return (out[0], True) if isinstance(out, tuple) else (out, False)


def held_bytes(batch: Batch, hidden_size: int) -> int:
    """Memory a batch holds between blocks: its float32 hidden states, and a float32
    attention mask of [length, length] per sequence when it has one (position embeddings
    and the like are small beside these)."""
    batch_size, length = batch["input_ids"].shape
    mask = length if "attention_mask" in batch else 0
    return 4 * batch_size * length * (hidden_size + mask)


def chunks(batches: Sequence[Batch], budget: int, hidden_size: int) -> Iterator[list[Batch]]:
    """Consecutive batches whose held memory stays within `budget` (at least one each)."""
    chunk: list[Batch] = []
    held = 0
    for batch in batches:
        size = held_bytes(batch, hidden_size)
        if chunk and held + size > budget:
            yield chunk
            chunk, held = [], 0
        chunk.append(batch)
        held += size
    if chunk:
        yield chunk


@contextmanager
def replaying(blocks: nn.ModuleList, final: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """While inside, the blocks compute nothing: the first returns `final` (the hidden
    states after the last block), the others pass their input on, in the blocks' form."""

    def passing(state: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
        def forward(hidden: torch.Tensor, *_args: Any, **_kwargs: Any) -> Any:
            return (state(hidden),) if as_tuple else state(hidden)

        return forward

    for index, block in enumerate(blocks):  # an instance attribute hides the method
        block.forward = passing(lambda _: final) if index == 0 else passing(lambda h: h)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward
