"""Masked-LM perplexity with whole-word masking on WikiText-2 raw (the paper's zero-shot metric).

Each non-empty row of the split's raw file is tokenised without special tokens, cut at word
boundaries into chunks that fit `seq_len` with the special tokens, and in every chunk
max(1, round(mask_prob * words)) whole words are drawn without replacement by one
`random.Random(seed)` walking the rows in file order (so a `limit` keeps a prefix of the
same masks). Every sub-token of a drawn word is replaced by the mask token (no 80/10/10
random/keep replacement). Perplexity is exp of the mean cross-entropy over masked tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.data import WIKITEXT2_FILES, data_file
from aecompress.errors import AecompressError
from aecompress.evaluation.common import length_batches, pad, pad_batch, pad_token_id
from aecompress.evaluation.kinds import require
from aecompress.models import check_positions, model_device, tokenize_whole
from aecompress.progress import progress_bar

IGNORE = -100  # label of positions that are not predicted


@dataclass(frozen=True)
class MaskedSequence:
    input_ids: list[int]
    labels: list[int]  # the original token where masked, else IGNORE


def wikitext2_rows(split: str) -> list[str]:
    """The non-empty rows of a WikiText-2 raw split, in file order."""
    if split not in WIKITEXT2_FILES:
        raise AecompressError(f"unknown WikiText-2 split '{split}': {', '.join(WIKITEXT2_FILES)}")
    text = data_file(WIKITEXT2_FILES[split]).read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line.strip()]


def _words(ids: list[int], word_ids: list[int | None]) -> list[list[int]]:
    words: list[list[int]] = []
    previous: int | None = None
    for token, word in zip(ids, word_ids, strict=True):
        if not words or word is None or word != previous:
            words.append([])
        words[-1].append(token)
        previous = word
    return words


def _chunks(words: list[list[int]], capacity: int) -> Iterator[list[list[int]]]:
    """Greedy chunks of whole words holding at most `capacity` tokens."""
    chunk: list[list[int]] = []
    size = 0
    for word in words:
        word = word[:capacity]
        if chunk and size + len(word) > capacity:
            yield chunk
            chunk, size = [], 0
        chunk.append(word)
        size += len(word)
    if chunk:
        yield chunk


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text ([CLS], [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    return full[:start], full[start + len(plain) :]


def _mask(
    words: list[list[int]],
    affixes: tuple[list[int], list[int]],
    mask_id: int,
    rng: random.Random,
    prob: float,
) -> MaskedSequence:
    chosen = set(rng.sample(range(len(words)), max(1, round(prob * len(words)))))
    prefix, suffix = affixes
    ids, labels = list(prefix), [IGNORE] * len(prefix)
    for w, word in enumerate(words):
        ids += [mask_id] * len(word) if w in chosen else word
        labels += word if w in chosen else [IGNORE] * len(word)
    return MaskedSequence(ids + suffix, labels + [IGNORE] * len(suffix))


def masked_sequences(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[str],
    *,
    seq_len: int,
    mask_prob: float,
    seed: int,
) -> list[MaskedSequence]:
    """Whole-word-masked sequences of the rows, deterministic for a given seed."""
    mask_id = tokenizer.mask_token_id
    if not isinstance(mask_id, int) or not tokenizer.is_fast:
        raise AecompressError("mlm needs a fast tokenizer with a mask token")
    affixes = special_affixes(tokenizer)
    capacity = seq_len - len(affixes[0]) - len(affixes[1])
    if capacity < 1:
        raise AecompressError(f"seq_len={seq_len} leaves no room for text")
    encoded = tokenize_whole(tokenizer, rows, add_special_tokens=False)
    rng = random.Random(seed)
    return [
        _mask(chunk, affixes, mask_id, rng, mask_prob)
        for index, ids in enumerate(encoded["input_ids"])
        for chunk in _chunks(_words(ids, encoded.word_ids(index)), capacity)
    ]


@torch.inference_mode()
def masked_lm_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "test",
    seq_len: int = 512,
    mask_prob: float = 0.15,
    seed: int = 0,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, float]:
    """Masked-LM perplexity over the first `limit` (default all) non-empty rows of a split."""
    require("masked-lm", model, "mlm")
    check_positions(model, seq_len)  # not silently shortened: settings say what ran
    rows = wikitext2_rows(split)[:limit]
    sequences = masked_sequences(tokenizer, rows, seq_len=seq_len, mask_prob=mask_prob, seed=seed)
    model.eval()
    total_nll, total_tokens = 0.0, 0
    device = model_device(model)
    batches = length_batches([len(s.input_ids) for s in sequences], batch_size)
    for batch in progress_bar(batches, desc=f"mlm ({split})", enabled=progress):
        ids, mask = pad_batch(
            [sequences[i].input_ids for i in batch], pad_token_id(tokenizer), device
        )
        labels = pad([sequences[i].labels for i in batch], IGNORE).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        total_nll += F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        total_tokens += int((labels != IGNORE).sum())
    return {"perplexity": math.exp(total_nll / total_tokens)}
