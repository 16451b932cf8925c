import math

import pytest
import torch
import torch.nn.functional as F

from aecompress.errors import AecompressError
from aecompress.evaluation.mlm import IGNORE, masked_lm_perplexity, masked_sequences, wikitext2_rows

ROWS = [
    " The unaffable Valkyria Chronicles III is a tactical role @-@ playing video game . \n",
    " = Robert Boulter = \n",
]


def _word_masks(tokenizer, row, sequence):
    """Whether each word (as the fast tokenizer groups sub-tokens) is masked, per sub-token."""
    encoded = tokenizer(row, add_special_tokens=False)
    masked = [label != IGNORE for label in sequence.labels[1:-1]]  # drop [CLS], [SEP]
    words: dict[int, set[bool]] = {}
    for word, is_masked in zip(encoded.word_ids(), masked, strict=True):
        words.setdefault(word, set()).add(is_masked)
    return words


def test_masking_is_whole_word_and_deterministic(tokenizer) -> None:
    first = masked_sequences(tokenizer, ROWS, seq_len=512, mask_prob=0.15, seed=0)
    again = masked_sequences(tokenizer, ROWS, seq_len=512, mask_prob=0.15, seed=0)
    other = masked_sequences(tokenizer, ROWS * 5, seq_len=512, mask_prob=0.15, seed=1)
    assert first == again
    assert [s.labels for s in first] != [s.labels for s in other[:2]]
    words = _word_masks(tokenizer, ROWS[0], first[0])
    assert all(len(flags) == 1 for flags in words.values())  # all sub-tokens or none
    assert sum(flags == {True} for flags in words.values()) == round(0.15 * len(words))
    sequence = first[0]
    assert sequence.input_ids[0] == tokenizer.cls_token_id
    assert sequence.input_ids[-1] == tokenizer.sep_token_id
    for token, label in zip(sequence.input_ids, sequence.labels, strict=True):
        assert (token == tokenizer.mask_token_id) == (label != IGNORE)


def test_long_rows_are_cut_at_word_boundaries(tokenizer) -> None:
    sequences = masked_sequences(tokenizer, ROWS[:1], seq_len=8, mask_prob=0.15, seed=0)
    assert len(sequences) > 1
    assert all(len(s.input_ids) <= 8 for s in sequences)
    restored = [
        y if y != IGNORE else t
        for s in sequences
        for t, y in zip(s.input_ids[1:-1], s.labels[1:-1], strict=True)
    ]
    assert restored == tokenizer(ROWS[0], add_special_tokens=False)["input_ids"]


def test_perplexity_matches_a_manual_unbatched_computation(tokenizer, tiny_bert_mlm) -> None:
    rows = wikitext2_rows("test")[:5]
    nll, count = 0.0, 0
    for sequence in masked_sequences(tokenizer, rows, seq_len=512, mask_prob=0.15, seed=3):
        with torch.no_grad():
            logits = tiny_bert_mlm(input_ids=torch.tensor([sequence.input_ids])).logits[0]
        labels = torch.tensor(sequence.labels)
        nll += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
        count += int((labels != IGNORE).sum())
    result = masked_lm_perplexity(
        tiny_bert_mlm, tokenizer, limit=5, seed=3, batch_size=2, progress=False
    )
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_model_without_mlm_head_names_what_it_is(tokenizer, tiny_bert) -> None:
    with pytest.raises(AecompressError, match=r"needs a masked-LM head; .* is a bidirectional"):
        masked_lm_perplexity(tiny_bert, tokenizer, limit=1)


def test_windows_longer_than_the_model_positions_are_refused(tokenizer, tiny_bert_mlm) -> None:
    with pytest.raises(AecompressError, match="seq_len=600 is longer than the 512 positions"):
        masked_lm_perplexity(tiny_bert_mlm, tokenizer, seq_len=600, limit=1, progress=False)
