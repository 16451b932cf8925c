"""ffn-neurons: whole MLP neurons removed, down refitted, served as a smaller MLP."""

from __future__ import annotations

import pytest
import torch

import aecompress
from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.methods import FitContext, GroupSpec, make_method
from aecompress.methods.pruning import words
from aecompress.methods.structured import split_ffn
from tests.methods.helpers import compress_structured, tiny_llama

INTERMEDIATE, HIDDEN = 24, 8


def ffn_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An ffn member [up; gate; down^T] and intermediate activations X with correlated,
    unequally scaled neurons (float64)."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(3 * INTERMEDIATE, HIDDEN, generator=generator)
    mixing = torch.randn(INTERMEDIATE, INTERMEDIATE, generator=generator, dtype=torch.float64)
    scales = torch.linspace(0.2, 3.0, INTERMEDIATE, dtype=torch.float64)
    x = torch.randn(300, INTERMEDIATE, generator=generator, dtype=torch.float64) @ mixing
    return matrix, x * scales


def fit_ffn(matrix: torch.Tensor, x: torch.Tensor, width: int, **options: object):
    method = make_method("ffn-neurons", dict(options))
    spec = GroupSpec("ffn.0", "ffn", "ffn", 1, *matrix.shape)
    statistics = [TargetStatistics(x.shape[0], x.T @ x, x.abs().mean(0), None, None, None)]
    context = FitContext(spec, float("inf"), 0, statistics, progress=False)
    return method, spec, method.fit([matrix], width, context)


def block_error(matrix: torch.Tensor, x: torch.Tensor, down: torch.Tensor, kept) -> float:
    """||X down^T - X_S down'^T||: the MLP's output error given its activations."""
    _, _, dense_down = split_ffn(matrix)
    error = x @ dense_down.double().T - x[:, kept] @ down.double().T
    return torch.linalg.matrix_norm(error).item()


@pytest.mark.parametrize("select", ["leverage", "activation"])
def test_refitting_down_lowers_the_output_error(select):
    matrix, x = ffn_problem()
    errors = {}
    for refit in (True, False):
        _, _, stored = fit_ffn(matrix, x, 12, select=select, refit=refit)
        member = stored.members[0]
        mask = stored.layout.intermediate
        kept = torch.nonzero(aecompress.methods.pruning.unpack_bits(member["kept"], mask)).flatten()
        errors[refit] = block_error(matrix, x, member["down"], kept)
    assert errors[True] < 0.9 * errors[False]


def test_an_ffn_member_reads_its_intermediate_activations():
    # its X^T X is [intermediate, intermediate] (down's inputs), not [hidden, hidden]
    spec = GroupSpec("ffn.0", "ffn", "ffn", 1, 3 * INTERMEDIATE, HIDDEN)
    assert spec.input_width == INTERMEDIATE
    assert GroupSpec("up", "up", "linear", 1, INTERMEDIATE, HIDDEN).input_width == HIDDEN


def test_stored_are_the_kept_rows_and_their_bitmap():
    matrix, x = ffn_problem()
    method, spec, stored = fit_ffn(matrix, x, 10)
    member = stored.members[0]
    up, gate, _ = split_ffn(matrix)
    rebuilt = method.reconstruct(stored, 0)
    kept = rebuilt[:INTERMEDIATE].abs().sum(dim=1) > 0
    assert int(kept.sum()) == 10
    torch.testing.assert_close(member["up"], up[kept])
    torch.testing.assert_close(member["gate"], gate[kept])
    assert (rebuilt[:, :][~kept.repeat(3)] == 0).all()
    numbers = 3 * 10 * HIDDEN
    assert method.cost(10, spec) == 32 * numbers + 32 * words(INTERMEDIATE)
    assert sum(t.numel() for t in member.values()) == numbers + words(INTERMEDIATE)


def test_the_refit_is_the_ridge_least_squares_optimum():
    matrix, x = ffn_problem()
    _, _, stored = fit_ffn(matrix, x, 12, damp=0.01)
    member = stored.members[0]
    mask = aecompress.methods.pruning.unpack_bits(member["kept"], INTERMEDIATE)
    xs, (_, _, down) = x[:, mask], split_ffn(matrix)
    gram = xs.T @ xs
    ridge = 0.01 * gram.diagonal().mean()
    residual = xs @ member["down"].double().T - x @ down.double().T
    gradient = residual.T @ xs + ridge * member["down"].double()
    assert gradient.abs().max() < 1e-3 * ridge * member["down"].abs().max()


def test_other_targets_are_refused():
    method = make_method("ffn-neurons")
    with pytest.raises(AecompressError, match="--targets ffn"):
        method.check(GroupSpec("down", "down", "linear", 1, 8, 24))


def compress_ffn(tokenizer, ratio: float = 1.5, **fields: object):
    return compress_structured(tokenizer, "ffn-neurons", "ffn", ratio, **fields)


def test_a_compressed_mlp_is_a_smaller_mlp_at_the_tightest_width(tokenizer):
    cm = compress_ffn(tokenizer)
    config = cm.model.config
    layers, rows = config.num_hidden_layers, 3 * config.intermediate_size
    assert len(cm.groups) == layers
    for fitted in cm.groups:
        width = fitted.stored.width
        spec = GroupSpec(fitted.group.name, "ffn", "ffn", 1, rows, config.hidden_size)
        cost = fitted.method.cost
        assert fitted.stored_bits == cost(width, spec) <= spec.dense_bits / 1.5
        assert cost(width + 1, spec) > spec.dense_bits / 1.5  # tight
        mlp = cm.model.model.layers[fitted.group.members[0].layer].mlp
        assert type(mlp).__name__ == "LlamaMLP"
        assert mlp.up_proj.weight.shape == (width, config.hidden_size)
        assert mlp.down_proj.weight.shape == (config.hidden_size, width)


def test_the_smaller_mlp_computes_the_decoded_one(tokenizer):
    cm = compress_ffn(tokenizer)
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        smaller = cm.model(input_ids=ids).logits
        decoded = cm.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(smaller, decoded, rtol=1e-4, atol=1e-5)


def test_round_trip(tokenizer, tmp_path):
    cm = compress_ffn(tokenizer)
    cm.save_pretrained(tmp_path / "art")
    loaded = aecompress.load(tmp_path / "art")
    ids = torch.randint(0, 90, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, cm.model(input_ids=ids).logits)


def test_ffn_and_its_matrices_cannot_both_be_targets(tokenizer):
    with pytest.raises(AecompressError, match="up_proj is a target of both"):
        aecompress.compress(
            tiny_llama(),
            tokenizer=tokenizer,
            method="ffn=ffn-neurons;up=svd",
            ratio=1.5,
            progress=False,
        )


@pytest.mark.parametrize("kind", ["ffn", "attn"])
def test_a_method_that_keeps_matrices_is_refused_for_structured_targets_when_planned(
    tokenizer, kind
):
    with pytest.raises(AecompressError, match=rf"svd does not .*--targets {kind} takes .*-"):
        aecompress.compress(
            tiny_llama(),
            tokenizer=tokenizer,
            method="svd",
            ratio=2,
            targets=[kind],
            progress=False,
        )
