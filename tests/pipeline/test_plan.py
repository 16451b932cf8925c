"""Planning and fitting a group: methods checked early, the validation callback."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from aecompress.evaluation.validation import validation_metric
from aecompress.pipeline.plan import make_validate
from aecompress.targets import group_targets, resolve_targets, weight_matrix
from tests.conftest import make_tiny


def test_validate_swaps_the_matrices_in_and_restores_them(tokenizer):
    model = make_tiny("llama", vocab=tokenizer.vocab_size)
    group = group_targets(model, resolve_targets(model, ["k"]), "layers")[0]
    originals = [weight_matrix(model, t).clone() for t in group.members]
    validate = make_validate(model, group, partial(validation_metric, model, tokenizer))
    assert validate is not None
    dense = validate(originals)
    assert dense > 1
    assert validate([torch.zeros_like(m) for m in originals]) != dense
    for target, original in zip(group.members, originals, strict=True):
        assert torch.equal(weight_matrix(model, target), original)
    assert validate(originals) == pytest.approx(dense)
