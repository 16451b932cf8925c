"""The independent pipeline: fitted groups wait, unbuilt, until the model runs; inside the
blocks, the numbers of the sequential pipeline over one dense stage."""

from __future__ import annotations

import pytest
import torch

from aecompress.calibration import calibration_windows
from aecompress.pipeline.independent import run_independent
from aecompress.pipeline.plan import plan_groups
from aecompress.pipeline.sequential import Stage, collect_moments, fit_position
from aecompress.pipeline.streams import Streams, capture_block_inputs
from aecompress.recipe import Recipe
from aecompress.substitution import Deferred
from aecompress.targets import transformer_blocks
from tests.conftest import make_tiny, tiny_model


def test_fitted_groups_hold_no_decoded_copy_until_the_model_runs(input_ids):
    """A sparse method serves decoded matrices; while the run goes on (and after it, until
    the model is called) each fitted group holds its stored tensors alone."""
    model = tiny_model("llama")
    recipe = Recipe.parse({"method": "prune", "ratio": 2, "targets": ["up", "down"]})
    run_independent(
        model,
        None,
        plan_groups(model, recipe),
        calibration=recipe.calibration,
        base_sha256="",
        tied_output=None,
        seed=0,
        progress=False,
    )
    deferred = [m for m in model.modules() if isinstance(m, Deferred)]
    assert len(deferred) == 4 and not any(m._served for m in deferred)
    model(input_ids=input_ids)
    assert all(m._served for m in deferred)


@pytest.mark.parametrize("method", ["svdllm", "asvd"])
def test_the_same_numbers_as_the_sequential_pipeline_over_one_dense_stage(tokenizer, method):
    """Inside the blocks the independent pipeline is the sequential one over a single stage
    of every block whose moments are all collected before any fit (both add inputs through
    calibration.InputAccumulator): the same stored tensors. The inputs reach the
    accumulator through two code paths (the whole model's forward, the blocks' forward on
    captured inputs), whose kernels may round differently on another CPU: the rebuilt
    matrices are compared within float32 rounding, which a missing or extra batch, or
    statistics of another input, exceed by orders of magnitude."""
    recipe = Recipe.parse(
        {
            "method": method,
            "ratio": 1.5,
            "targets": ["q", "k", "v", "o", "up", "gate", "down"],
            "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4},
        }
    )
    model = make_tiny("llama", vocab=tokenizer.vocab_size)
    independent = run_independent(
        model,
        tokenizer,
        plan_groups(model, recipe),
        calibration=recipe.calibration,
        base_sha256=method,
        tied_output=None,
        seed=0,
        progress=False,
    )
    model = make_tiny("llama", vocab=tokenizer.vocab_size)
    planned = plan_groups(model, recipe)
    path, blocks = transformer_blocks(model)
    windows = calibration_windows(tokenizer, recipe.calibration)
    hidden, inputs = capture_block_inputs(model, blocks[0], windows, 4)
    stage = Stage(0, len(blocks) - 1, planned)
    moments = collect_moments(blocks, None, stage, planned, path, Streams(hidden, None, inputs))
    staged = fit_position(
        model, planned, moments, None, recipe.sequential, seed=0, validation=None, progress=False
    )
    for one, other in zip(independent, staged, strict=True):
        assert one.stored.tensors().keys() == other.stored.tensors().keys()
        assert one.stored.width == other.stored.width
        for index in range(len(one.group.members)):
            with torch.no_grad():
                mine = one.method.reconstruct(one.stored, index)
                theirs = other.method.reconstruct(other.stored, index)
            scale = mine.abs().max().item()
            torch.testing.assert_close(
                theirs, mine, rtol=1e-4, atol=1e-5 * scale, msg=one.group.name
            )
