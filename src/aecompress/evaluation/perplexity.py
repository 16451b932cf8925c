"""Token-level causal-LM perplexity on WikiText-2 raw (GPTQ convention)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from aecompress.data import wikitext2_text
from aecompress.errors import AecompressError
from aecompress.evaluation.common import Forward, model_logits
from aecompress.memory import available_memory
from aecompress.models import check_positions, is_causal_lm, model_device, tokenize_whole
from aecompress.progress import progress_bar


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    split: str
    seq_len: int
    windows: int
    tokens: int  # predicted tokens the mean runs over: windows * (seq_len - 1)


def require_causal_lm(model: PreTrainedModel) -> None:
    if not is_causal_lm(model):
        raise AecompressError(
            f"{type(model).__name__} has no causal LM head: perplexity needs a causal LM"
        )


def batch_bytes(config: PretrainedConfig, batch: int, seq_len: int) -> int:
    """Rough peak memory (fp32) of a forward pass over [batch, seq_len] tokens: the logits
    three times (logits, their flattened copy, the log-softmax) and one layer's attention
    scores twice (scores, probabilities)."""
    vocab = getattr(config, "vocab_size", 0) or 0
    heads = getattr(config, "num_attention_heads", 1) or 1
    return 4 * batch * seq_len * (3 * vocab + 2 * heads * seq_len)


def check_memory(model: PreTrainedModel, batch: int, seq_len: int) -> None:
    """Refuse a perplexity batch whose estimated memory exceeds what is available."""
    need, free = batch_bytes(model.config, batch, seq_len), available_memory()
    if need > free:
        raise AecompressError(
            f"a batch of {batch} x {seq_len} tokens needs about {need / 2**30:.1f} GiB, more "
            f"than the {free / 2**30:.1f} GiB available: lower seq_len or batch_size"
        )


def window_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, windows: int | None
) -> torch.Tensor:
    """Non-overlapping windows [count, seq_len] of the tokenised text (the tail is dropped)."""
    ids = torch.tensor(tokenize_whole(tokenizer, text)["input_ids"], dtype=torch.long)
    count = ids.numel() // seq_len
    if windows is not None:
        count = min(count, windows)
    if count < 1:
        raise AecompressError(f"text has fewer than seq_len={seq_len} tokens")
    return ids[: count * seq_len].view(count, seq_len)


@torch.inference_mode()
def windows_perplexity(
    model: PreTrainedModel,
    ids: torch.Tensor,
    batch_size: int = 4,
    *,
    desc: str = "perplexity",
    progress: bool = False,
    forward: Forward | None = None,
) -> float:
    """exp(mean NLL) over every predicted token of the windows `ids` [count, seq_len]; the
    logits come from `forward` (default: the model in memory, batch by batch)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    batches = [{"input_ids": batch.to(device)} for batch in ids.split(batch_size)]
    logits_of = forward or model_logits(model)
    total_nll = 0.0
    try:
        for batch, logits in progress_bar(
            zip(batches, logits_of(batches), strict=True),
            desc=desc,
            enabled=progress,
            total=len(batches),
        ):
            targets = batch["input_ids"][:, 1:]
            shifted = logits[:, :-1].float()
            nll = F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), reduction="sum")
            total_nll += nll.item()
    finally:
        model.train(was_training)
    return math.exp(total_nll / ids[:, 1:].numel())


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "test",
    seq_len: int = 512,
    windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
    forward: Forward | None = None,
) -> PerplexityResult:
    """exp(mean NLL) over every predicted token of `windows` non-overlapping windows (the
    logits from `forward`, default the model in memory)."""
    require_causal_lm(model)
    if seq_len < 2:
        raise AecompressError("seq_len must be at least 2")
    check_positions(model, seq_len)
    check_memory(model, min(batch_size, windows or batch_size), seq_len)
    ids = window_ids(tokenizer, wikitext2_text(split), seq_len, windows)
    value = windows_perplexity(
        model, ids, batch_size, desc=f"perplexity ({split})", progress=progress, forward=forward
    )
    return PerplexityResult(value, split, seq_len, ids.shape[0], ids[:, 1:].numel())
