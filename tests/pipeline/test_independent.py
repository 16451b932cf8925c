"""The independent pipeline: fitted groups wait, unbuilt, until the model runs."""

from __future__ import annotations

from aecompress.pipeline.independent import run_independent
from aecompress.pipeline.plan import plan_groups
from aecompress.recipe import Recipe
from aecompress.substitution import Deferred
from tests.conftest import tiny_model


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
