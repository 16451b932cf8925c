"""Token-level causal-LM perplexity on WikiText-2 raw (GPTQ convention)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.data import wikitext2_text
from aecompress.errors import AecompressError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    split: str
    seq_len: int
    windows: int
    tokens: int  # predicted tokens the mean runs over: windows * (seq_len - 1)


def require_causal_lm(model: PreTrainedModel) -> None:
    if model.get_output_embeddings() is None or not getattr(model, "can_generate", bool)():
        raise AecompressError(
            f"{type(model).__name__} has no causal LM head: perplexity needs a causal LM"
        )


def window_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, windows: int | None
) -> torch.Tensor:
    """Non-overlapping windows [count, seq_len] of the tokenised text (the tail is dropped)."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    count = ids.numel() // seq_len
    if windows is not None:
        count = min(count, windows)
    if count < 1:
        raise AecompressError(f"text has fewer than seq_len={seq_len} tokens")
    return ids[: count * seq_len].view(count, seq_len)


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "test",
    seq_len: int = 512,
    windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of `windows` non-overlapping windows."""
    require_causal_lm(model)
    if seq_len < 2:
        raise AecompressError("seq_len must be at least 2")
    batches = window_ids(tokenizer, wikitext2_text(split), seq_len, windows)
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(
        batches.split(batch_size), desc=f"perplexity ({split})", disable=not progress
    ):
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return PerplexityResult(
        math.exp(total_nll / total_tokens), split, seq_len, batches.shape[0], total_tokens
    )
