"""Sentence-embedding tasks for encoders: STS-B Spearman, and fidelity to a dense model.

Sentence embeddings pool the encoder's last hidden states the way the model's
sentence-transformers configuration says (`modules.json` -> Pooling `config.json`, and
`sentence_bert_config.json` for the maximum length) when its folder has one, else mean
pooling. Normalisation modules are skipped: both metrics are cosines, which ignore scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aecompress.data import STSB_FILES, data_file
from aecompress.errors import AecompressError
from aecompress.evaluation.common import length_batches, pad_batch, pad_token_id, pool
from aecompress.evaluation.kinds import require
from aecompress.evaluation.metrics import pearson, spearman
from aecompress.models import model_device
from aecompress.progress import progress_bar

# sentence-transformers pooling flags -> our modes; mean/sqrt(len) has the cosines of mean.
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean",
}


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"
    max_length: int = 512


@dataclass(frozen=True)
class StsPairs:
    first: list[str]
    second: list[str]
    scores: np.ndarray  # gold similarity in [0, 5]


def read_stsb(split: str) -> StsPairs:
    """STS-B pairs of a split (tab-separated: score, sentence 1, sentence 2 in fields 5-7)."""
    if split not in STSB_FILES:
        raise AecompressError(f"unknown STS-B split '{split}': {', '.join(STSB_FILES)}")
    rows = [
        line.split("\t")
        for line in data_file(STSB_FILES[split]).read_text(encoding="utf-8").splitlines()
    ]
    return StsPairs(
        [row[5] for row in rows], [row[6] for row in rows], np.array([float(r[4]) for r in rows])
    )


def _pooling_mode(folder: Path) -> str | None:
    modules = json.loads((folder / "modules.json").read_text())
    for module in modules:
        if module["type"].endswith("Pooling"):
            config = json.loads((folder / module["path"] / "config.json").read_text())
            modes = {mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)}
            if len(modes) != 1:
                raise AecompressError(f"unsupported sentence-transformers pooling in {folder}")
            return modes.pop()
    return None


def sentence_pooling(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, mode: str | None = None
) -> Pooling:
    """The model's pooling (from its sentence-transformers files), `mode` overriding it."""
    folder = Path(str(model.name_or_path))
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    if (folder / "sentence_bert_config.json").is_file():
        config = json.loads((folder / "sentence_bert_config.json").read_text())
        max_length = min(max_length, config.get("max_seq_length") or max_length)
    if mode is None and (folder / "modules.json").is_file():
        mode = _pooling_mode(folder)
    return Pooling(mode or "mean", max_length)


@torch.inference_mode()
def embed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: list[str],
    pooling: Pooling,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled sentence embeddings [len(sentences), hidden] from the model's encoder, on the
    CPU."""
    encoder = model.base_model
    encoder.eval()
    ids = tokenizer(sentences, truncation=True, max_length=pooling.max_length)["input_ids"]
    out: torch.Tensor | None = None
    device = model_device(encoder)
    for batch in progress_bar(
        length_batches([len(i) for i in ids], batch_size), desc="embed", enabled=progress
    ):
        input_ids, mask = pad_batch([ids[i] for i in batch], pad_token_id(tokenizer), device)
        hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden.float(), mask, pooling.mode).cpu()
        if out is None:
            out = pooled.new_empty(len(sentences), pooled.shape[-1])
        out[batch] = pooled
    if out is None:
        raise AecompressError("no sentences to embed")
    return out


def stsb(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    split: str = "test",
    pooling: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """Spearman and Pearson (x100) of the cosine of the two sentences' embeddings vs gold."""
    require("encoder", model, "stsb")
    pairs = read_stsb(split)
    unique = sorted(set(pairs.first) | set(pairs.second))
    vectors = embed(
        model,
        tokenizer,
        unique,
        sentence_pooling(model, tokenizer, pooling),
        batch_size=batch_size,
        progress=progress,
    )
    row = {sentence: i for i, sentence in enumerate(unique)}
    cosines = F.cosine_similarity(
        vectors[[row[s] for s in pairs.first]], vectors[[row[s] for s in pairs.second]]
    ).numpy()
    return {
        "spearman": spearman(cosines, pairs.scores),
        "pearson": pearson(cosines, pairs.scores),
    }


def fidelity_sentences(count: int) -> list[str]:
    """The first `count` distinct sentences of STS-B dev, in file order."""
    pairs = read_stsb("dev")
    ordered = [s for pair in zip(pairs.first, pairs.second, strict=True) for s in pair]
    return list(dict.fromkeys(ordered))[:count]


def fidelity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    reference: PreTrainedModel,
    sentences: int = 1000,
    pooling: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """Mean cosine between the model's and the reference's embeddings of STS-B dev sentences.

    Both use the reference's pooling; the two models must share the tokenizer.
    """
    require("encoder", model, "fidelity")
    require("encoder", reference, "fidelity")
    texts = fidelity_sentences(sentences)
    how = sentence_pooling(reference, tokenizer, pooling)
    ours, theirs = (
        embed(m, tokenizer, texts, how, batch_size=batch_size, progress=progress)
        for m in (model, reference)
    )
    return {"cosine": float(F.cosine_similarity(ours, theirs).mean())}
