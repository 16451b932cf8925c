"""Block refinement: never worse on held-out windows, positions fixed, artifact intact."""

from __future__ import annotations

import pytest
import torch

import aecompress
from aecompress.models import LoadedModel
from tests.conftest import make_tiny

CALIBRATION = {"samples": 12, "seq_len": 32, "batch_size": 4}


@pytest.mark.parametrize("method", ["svd", "prune"])
def test_refinement_lowers_the_held_out_error_and_round_trips(tokenizer, method, tmp_path):
    """Data-free fits at a high ratio leave output error that training on it removes."""
    loaded = LoadedModel(
        make_tiny("llama", vocab=tokenizer.vocab_size), tokenizer, "tiny", "AutoModelForCausalLM"
    )
    cm = aecompress.compress(
        loaded,
        method=method,
        ratio=4,
        targets=["down"],
        refine={"steps": 60, "lr": 1e-3, "eval_every": 5},
        calibration=CALIBRATION,
        progress=False,
    )
    for group in cm.groups:
        refine = group.stored.info["refine"]
        assert refine["held_out_after"] < refine["held_out_before"]
    ids = torch.randint(
        0, tokenizer.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = cm.model(input_ids=ids).logits
    cm.save_pretrained(tmp_path / "art")
    with torch.no_grad():
        torch.testing.assert_close(
            aecompress.load(tmp_path / "art")(input_ids=ids).logits, expected
        )


def test_sparse_refinement_moves_values_but_not_positions(tokenizer):
    def compress(steps: int):
        loaded = LoadedModel(
            make_tiny("llama", vocab=tokenizer.vocab_size), tokenizer, "t", "AutoModelForCausalLM"
        )
        return aecompress.compress(
            loaded,
            method="prune",
            ratio=2,
            targets=["down"],
            pipeline="sequential",
            refine={"steps": steps, "lr": 1e-3, "eval_every": 5},
            calibration=CALIBRATION,
            progress=False,
        )

    plain, refined = compress(0), compress(30)
    for before, after in zip(plain.groups, refined.groups, strict=True):
        assert torch.equal(before.stored.members[0]["mask"], after.stored.members[0]["mask"])
        assert not torch.equal(
            before.stored.members[0]["values"], after.stored.members[0]["values"]
        )


def test_refinement_needs_the_sequential_pipeline(tokenizer):
    with pytest.raises(aecompress.AecompressError, match="sequential"):
        aecompress.compress(
            make_tiny("llama", vocab=tokenizer.vocab_size),
            method="svd",
            ratio=2,
            targets=["down"],
            pipeline="independent",
            refine=5,
            tokenizer=tokenizer,
            progress=False,
        )
