"""Every method through the engine on a tiny Llama: budget, artifact round trip, refusals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import aecompress
from aecompress.calibration import CalibrationConfig, collect_statistics
from aecompress.errors import AecompressError
from aecompress.methods.kronecker import factor_shapes
from aecompress.methods.tucker import tucker_cost
from aecompress.models import LoadedModel
from aecompress.targets import resolve_targets
from tests.methods.helpers import tiny_llama

CALIBRATION = {"samples": 4, "seq_len": 32, "batch_size": 4}
QUICK = {"steps": 5}  # refinement steps of kronecker / tucker

# method -> (options, grouping); the tiny Llama's heads are 8 wide.
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "svd": ({}, "none"),
    "fwsvd": ({}, "layers"),
    "asvd": ({}, "none"),
    "svdllm": ({}, "none"),
    "shared-basis": ({}, "layers"),
    "prune": ({}, "layers"),
    "kronecker": (QUICK, "layers"),
    "tucker": ({**QUICK, "head_dim": 8}, "layers"),
    "ae": ({"epochs": 2}, "layers"),
    "ae-data": ({"epochs": 2}, "layers"),
}


def compress(tiny: LoadedModel, method: str, targets: str, ratio: float, **fields: Any):
    options, group = CASES[method]
    return aecompress.compress(
        tiny,
        method=method,
        options=options,
        ratio=ratio,
        targets=targets,
        group=fields.pop("group", group),
        calibration=CALIBRATION,
        progress=False,
        **fields,
    )


def is_tight(method: str, fitted, budget: float) -> bool:
    """Whether one more unit of the method's width (rank, kept weight, term, Tucker rank of
    any mode) would exceed the budget, or is impossible."""
    count, (rows, cols) = len(fitted.group.members), fitted.shape
    meta = fitted.stored.meta
    if method in ("svd", "fwsvd", "asvd", "svdllm", "shared-basis"):
        maxed = meta["rank"] == min(count * rows, cols)
        return maxed or fitted.stored_numel + count * rows + cols > budget
    if method == "prune":
        return fitted.stored_numel + (1 if meta["index"] == "bitmap" else 2) > budget
    if method == "kronecker":
        n1, m1 = factor_shapes(rows, cols, count)
        return fitted.stored_numel + count * n1 * m1 + (rows // n1) * (cols // m1) > budget
    if method in ("ae", "ae-data"):
        return "x" in meta  # the AE's own tests check its width is tight
    dims, ranks = meta["dims"], meta["ranks"]
    for mode in range(len(dims)):
        grown = [r + (j == mode) for j, r in enumerate(ranks)]
        possible = grown[mode] <= dims[mode] and grown[mode] ** 2 <= math.prod(grown)
        if possible and tucker_cost(dims, grown) <= budget:
            return False
    return True


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("ratio", [1.25, 3.0])
def test_every_method_meets_the_budget_exactly(tiny: LoadedModel, method: str, ratio: float):
    cm = compress(tiny, method, "k,up,down", ratio)
    for fitted in cm.groups:
        budget = fitted.original_numel / ratio
        assert fitted.stored_numel <= budget
        assert is_tight(method, fitted, budget)
        assert fitted.ratio >= ratio


@pytest.mark.parametrize("method", sorted(CASES))
def test_every_method_round_trips_through_the_artifact(
    tiny: LoadedModel, method: str, tmp_path: Path
):
    targets = "k,o,gate" if method in ("shared-basis", "tucker") else "embed,k,o,gate"
    cm = compress(tiny, method, targets, 2.0)
    ids = torch.randint(0, 30522, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = cm.model(input_ids=ids).logits
    cm.save_pretrained(str(tmp_path / "artifact"))
    loaded = aecompress.load_compressed(tmp_path / "artifact")
    assert [g.stored.meta for g in loaded.groups] == [g.stored.meta for g in cm.groups]
    with torch.inference_mode():
        after = loaded.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["svdllm", "asvd"])
def test_activation_aware_embeddings_serve_the_tied_head(tiny: LoadedModel, method: str):
    cm = compress(tiny, method, "embed", 4.0)
    assert cm.tied_output == "lm_head"
    head, embed = cm.model.get_output_embeddings(), cm.model.get_input_embeddings()
    torch.testing.assert_close(head.weight, embed.weight)
    assert cm.groups[0].stored.meta["rank"] == math.floor(30522 * 32 / 4 / (30522 + 32))


def test_nan_weights_are_refused(tiny: LoadedModel):
    with torch.no_grad():
        tiny.model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(AecompressError, match=r"layers\.1\.self_attn\.k_proj.*NaN"):
        compress(tiny, "svdllm", "k", 2.0)


def test_calibration_statistics_repeat_with_the_same_seed(tiny: LoadedModel):
    targets = resolve_targets(tiny.model, ["embed", "k", "down"])
    needed = {"xtx", "abs_mean", "counts", "fisher"}

    def collect(seed: int, needed: set[str]) -> dict:
        config = CalibrationConfig(**CALIBRATION, seed=seed)
        return collect_statistics(
            tiny.model, tiny.tokenizer, targets, needed, config, progress=False
        )

    first, again, other = collect(0, needed), collect(0, needed), collect(1, {"xtx"})
    for name, entry in first.items():
        for field in ("xtx", "abs_mean", "counts", "fisher"):
            value = getattr(entry, field)
            if value is not None:
                assert torch.equal(value, getattr(again[name], field)), (name, field)
    down = "model.layers.0.mlp.down_proj"
    assert not torch.equal(first[down].xtx, other[down].xtx)


def test_a_fresh_model_gives_the_same_compression(tokenizer):
    """Same model, recipe and seed: identical stored tensors (statistics from the cache)."""
    results = []
    for _ in range(2):
        loaded = LoadedModel(tiny_llama(), tokenizer, "tiny-llama", "AutoModelForCausalLM")
        cm = compress(loaded, "svdllm", "k,up", 2.0)
        results.append(cm.groups[0].stored.tensors())
    for key, tensor in results[0].items():
        assert torch.equal(tensor, results[1][key])
