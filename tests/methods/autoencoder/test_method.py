"""The paper's AE method: budget, norms, grouping, determinism, options, row weights."""

from __future__ import annotations

import pytest
import torch

from aecompress.calibration import TargetStatistics
from aecompress.errors import AecompressError
from aecompress.methods import FitContext, make_method
from aecompress.methods.autoencoder import (
    PAPER_PRESET,
    Autoencoder,
    AutoencoderOptions,
    DataAwareOptions,
    solve_latent_width,
    stored_cost,
)
from aecompress.methods.autoencoder.trainer import OutputMetric, starting_bases
from aecompress.methods.base import row_weights
from aecompress.methods.linalg import top_right_singular_vectors, whitening
from aecompress.modules import DecodedEmbedding, DecodedLinear, DecoderSpec, decode_rows
from tests.methods.helpers import fit as fit_method
from tests.methods.helpers import spec_of

QUICK = {"epochs": 2, "batch_size": 64, "decoder": [2, 4]}  # the embeddings' default


def matrices(count: int, rows: int = 40, cols: int = 24, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, cols, generator=generator) * 0.1 for _ in range(count)]


def fit(options: dict, mats: list[torch.Tensor], ratio: float = 3.0, seed: int = 0, **ctx):
    method, stored, budget = fit_method(
        "ae", mats, ratio=ratio, options={**QUICK, **options}, seed=seed, **ctx
    )
    assert isinstance(method, Autoencoder)
    return method, stored, budget


def svd_basis(rows: torch.Tensor, x: int) -> torch.Tensor:
    return top_right_singular_vectors(rows, x).float()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"decoder": [], "encoder": []},
        {"norm": False},
        {"decoder": [3, 5], "sizes": "relative"},
        {"decoder": [16, 32], "sizes": "absolute"},
        {"skip": True},
    ],
)
@pytest.mark.parametrize(
    ("rows", "cols", "ratio"), [(30522, 384, 10), (768, 768, 3), (40, 24, 2), (5000, 64, 25)]
)
def test_latent_width_fits_the_budget_and_is_tight(options, rows, cols, ratio):
    opts = AutoencoderOptions(**options).for_kind("embedding")
    budget = rows * cols / ratio
    if stored_cost(opts, rows, cols, 1) > budget:
        with pytest.raises(AecompressError, match="ratio is too large"):
            solve_latent_width(opts, rows, cols, budget, "g")
        return
    x = solve_latent_width(opts, rows, cols, budget, "g")
    assert stored_cost(opts, rows, cols, x) <= budget
    assert x == cols or stored_cost(opts, rows, cols, x + 1) > budget


def test_stored_numbers_match_the_accounting_and_the_budget():
    mats = matrices(3)
    _, stored, budget = fit({}, mats)
    x = stored.width
    numel = sum(t.numel() for t in stored.tensors().values())
    assert numel == stored_cost(AutoencoderOptions(decoder=[2, 4]), 120, 24, x) <= budget
    assert stored.info["decoder"] == [x, 2 * x, 4 * x, 24]
    assert stored.info["encoder"] == [24, 8 * x, 4 * x, x]


def test_a_linear_decoder_stores_one_matrix_and_no_bias():
    mats = matrices(3)
    method, stored, budget = fit({"decoder": [], "epochs": 1}, mats)
    x = stored.width
    assert set(stored.shared) == {"w0"} and stored.shared["w0"].shape == (24, x)
    numel = sum(t.numel() for t in stored.tensors().values())
    assert numel == 3 * 40 * x + x * 24 == stored_cost(AutoencoderOptions(decoder=[]), 120, 24, x)
    assert 32 * numel <= budget < 32 * (numel + 120 + 24)  # one more width would not fit
    decoder = dict(stored.shared, b0=torch.zeros(24))  # an artifact written with a bias
    codes = stored.members[0]["codes"]
    torch.testing.assert_close(
        decode_rows(codes, decoder, DecoderSpec(), None), method.reconstruct(stored, 0)
    )


def test_ratio_too_large_is_a_clear_error():
    with pytest.raises(AecompressError, match="ratio is too large"):
        fit({}, matrices(1, rows=4, cols=4), ratio=50)


def test_a_decoder_larger_than_the_budget_says_so_and_what_fits():
    mats = matrices(1, rows=64, cols=64)  # a layer's default: 16 hidden units and a skip path
    message = r"its decoder \[1, 16, 64\] stores 37888 of them \(skip path included\)"
    with pytest.raises(AecompressError, match=message + r".*decoder=\[\].*--group layers"):
        fit_method("ae", mats, ratio=10, options={"epochs": 1})
    _, stored, _ = fit_method("ae", mats, ratio=10, options={"epochs": 1, "decoder": []})
    assert stored.width == 3  # 128 numbers a rank within 409.6
    with pytest.raises(AecompressError, match="even width 1 stores 4096 bits") as linear:
        fit_method("ae", mats, ratio=40, options={"epochs": 1, "decoder": []})
    assert "decoder" not in str(linear.value)  # a low-rank factorisation: no fixed part


def test_norm_enforcement_gives_exact_row_norms():
    mats = matrices(2)
    method, stored, _ = fit({"norm": True}, mats)
    for index, matrix in enumerate(mats):
        rebuilt = method.reconstruct(stored, index)
        torch.testing.assert_close(rebuilt.norm(dim=1), matrix.norm(dim=1), rtol=1e-5, atol=1e-7)
        assert torch.equal(stored.members[index]["norms"], matrix.norm(dim=1))
    _, plain, _ = fit({"norm": False}, mats)
    assert all("norms" not in member for member in plain.members)


def test_grouped_codes_split_back_to_their_layers():
    generator = torch.Generator().manual_seed(3)
    basis = torch.randn(6, 16, generator=generator)  # low-rank members: rows share a basis
    mats = [torch.randn(30, 6, generator=generator) @ basis for _ in range(3)]
    # a linear auto-decoder from the SVD at a mild ratio reproduces every member
    method, stored, _ = fit({"decoder": [], "epochs": 1, "lr": 1e-4}, mats, ratio=1.3)
    assert [m["codes"].shape for m in stored.members] == [(30, stored.width)] * 3
    for index, matrix in enumerate(mats):
        rebuilt = method.reconstruct(stored, index)
        own = (rebuilt - matrix).norm() / matrix.norm()
        other = (rebuilt - mats[(index + 1) % 3]).norm() / matrix.norm()
        assert own < 0.01 and other > 0.5


@pytest.mark.parametrize("trainer", ["autoencoder", "autodecoder"])
def test_training_is_deterministic_per_seed(trainer):
    mats = matrices(2)
    options = {"trainer": trainer, "init": "random"}
    _, first, _ = fit(options, mats, seed=5)
    _, again, _ = fit(options, mats, seed=5)
    _, other, _ = fit(options, mats, seed=6)
    for key, tensor in first.tensors().items():
        assert torch.equal(tensor, again.tensors()[key]), key
    assert not torch.equal(first.members[0]["codes"], other.members[0]["codes"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decoder": [2, -4]}, "decoder"),
        ({"encoder": [0]}, "encoder"),
        ({"epochs": 0}, "epochs"),
        ({"activation": "swish"}, "activation"),
        ({"batch_size": -1}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"sizes": "absolute", "decoder": [2.5]}, "whole"),
        ({"trainer": "autoencoder", "init": "svd"}, "linear autoencoder"),
        ({"epoch": 3}, "epoch"),
        ({"preset": "slow"}, "preset"),
        ({"loss": {"cosine": 1}}, "loss"),
    ],
)
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(AecompressError, match=message):
        make_method("ae", options)


def test_paper_preset_fills_what_is_not_given():
    paper = make_method("ae", {"preset": "paper"}).options
    assert isinstance(paper, AutoencoderOptions)
    for key, value in PAPER_PRESET.items():
        assert getattr(paper, key) == value
    assert paper.activation == "leaky_relu" and paper.negative_slope == 0.01
    assert paper.output == "tanh" and paper.norm
    assert paper.loss.cosine_weight == 0.9091 and paper.loss.rmse_weight == 0.0909
    override = make_method("ae", {"preset": "paper", "epochs": 3}).options
    assert isinstance(override, AutoencoderOptions)
    assert override.epochs == 3 and override.batch_size == 16


def test_paper_preset_trains():
    method, stored, _ = fit({"preset": "paper", "epochs": 2}, matrices(1, rows=32, cols=12), 2)
    assert method.options.trainer == "autoencoder" and stored.info["epoch"] in (1, 2)
    assert method.reconstruct(stored, 0).shape == (32, 12)


def test_row_weights_from_statistics():
    counts = torch.tensor([0.0, 3.0, 8.0])
    fisher = torch.tensor([[1.0, 3.0], [0.0, 4.0], [2.0, 2.0]])
    grads = torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 0.0]])
    stats = [TargetStatistics(1, counts=counts, fisher=fisher, l1=grads.abs())] * 2
    mats = [torch.zeros(3, 2)] * 2
    table = FitContext(spec_of(mats, "embedding"), statistics=stats)
    linear = FitContext(spec_of(mats), statistics=stats)
    torch.testing.assert_close(row_weights("counts", table), (counts.double() + 1).sqrt().repeat(2))
    torch.testing.assert_close(
        row_weights("fisher", linear), torch.tensor([2.0, 2.0, 2.0]).double().repeat(2)
    )
    torch.testing.assert_close(
        row_weights("l1", linear), torch.tensor([3.0, 1.0, 3.0]).double().repeat(2)
    )
    with pytest.raises(AecompressError, match="embeddings only"):
        row_weights("counts", linear)
    with pytest.raises(AecompressError, match="'fisher' is missing"):
        row_weights("fisher", FitContext(spec_of(mats[:1]), statistics=[TargetStatistics(1)]))
    with pytest.raises(AecompressError, match="cover 3 rows"):
        row_weights(
            "counts", FitContext(spec_of([torch.zeros(4, 2)] * 2, "embedding"), statistics=stats)
        )


def test_row_weights_steer_the_fit():
    mats = matrices(1, rows=64, cols=16, seed=2)
    counts = torch.zeros(64)
    counts[:8] = 1e6  # eight very frequent rows
    stats = [TargetStatistics(1, counts=counts)]
    options = {"decoder": [], "epochs": 3, "row_weights": "counts", "row_weight_power": 2}
    method, weighted, _ = fit(options, mats, ratio=1.4, statistics=stats, kind="embedding")
    plain_options = {"decoder": [], "epochs": 3, "row_weights": "none"}
    plain_method, plain, _ = fit(plain_options, mats, ratio=1.4, kind="embedding")

    def error(m, s):
        return (m.reconstruct(s, 0)[:8] - mats[0][:8]).norm()

    assert weighted.width == 9  # 9 * (64 + 16) <= 64 * 16 / 1.4: a linear decoder has no bias
    assert error(method, weighted) < 0.2 * error(plain_method, plain)
    assert method.statistics_needed() == {"counts"}
    assert plain_method.statistics_needed() == set()


def test_auto_row_weights_are_counts_for_embeddings_only():
    mats = matrices(1)
    stats = [TargetStatistics(1, counts=torch.arange(40.0))]
    _, with_counts, _ = fit({}, mats, statistics=stats, kind="embedding")
    assert with_counts.info["row_weights"] == "counts"
    _, without, _ = fit({}, mats, statistics=stats)
    assert without.info["row_weights"] == "none"
    assert make_method("ae", {}).statistics_needed() == {"counts"}


def test_skip_decoder_starts_at_the_svd_and_counts_its_path():
    mats = matrices(2)
    options = {"skip": True, "epochs": 1, "lr": 1e-12, "schedule": "constant"}
    method, stored, budget = fit({**options, "norm": False}, mats)
    x = stored.width
    assert stored.shared["skip"].shape == (24, x) and stored.info["skip"]
    numel = sum(t.numel() for t in stored.tensors().values())
    assert (
        numel
        == stored_cost(AutoencoderOptions(decoder=[2, 4], skip=True, norm=False), 80, 24, x)
        <= budget
    )
    basis = svd_basis(torch.cat(mats), x)  # the MLP starts at zero: W V V^T
    torch.testing.assert_close(method.reconstruct(stored, 1), mats[1] @ basis @ basis.T)


def test_missing_statistics_are_a_clear_error():
    with pytest.raises(AecompressError, match="needs calibration statistics"):
        fit({"row_weights": "counts"}, matrices(1), kind="embedding")


def test_validation_selection_uses_the_callback_and_never_needs_it_otherwise():
    mats = matrices(2)
    calls: list[list[torch.Tensor]] = []

    def validate(decoded: list[torch.Tensor]) -> float:
        calls.append(decoded)
        return [4.0, 3.0, 1.0, 2.0][len(calls) - 1]  # the start, then epochs 1..3

    options = {"epochs": 3, "selection": "validation", "select_from": 0}
    _, stored, _ = fit(options, mats, validate=validate)
    assert len(calls) == 4 and [d.shape for d in calls[0]] == [(40, 24), (40, 24)]
    assert stored.info["epoch"] == 2 and stored.info["selection_value"] == 1.0
    with pytest.raises(AecompressError, match="validation metric"):
        fit({"selection": "validation"}, mats)


def test_training_keeps_its_start_when_no_epoch_beats_it():
    mats = matrices(2)
    scores = iter([1.0, 3.0, 2.0])
    options = {"epochs": 2, "selection": "validation", "select_from": 0, "norm": False}
    method, stored, _ = fit(options, mats, validate=lambda decoded: next(scores))
    assert stored.info["epoch"] == 0
    basis = svd_basis(torch.cat(mats), stored.width)  # the start: W V V^T
    torch.testing.assert_close(method.reconstruct(stored, 0), mats[0] @ basis @ basis.T)


def test_selection_skips_early_epochs_and_keeps_the_best():
    calls: list[int] = []

    def validate(decoded: list[torch.Tensor]) -> float:
        calls.append(1)
        return [9.0, 4.0, 3.0, 9.0][len(calls) - 1]

    options = {"epochs": 6, "selection": "validation", "select_from": 0.5}
    _, stored, _ = fit(options, matrices(1), validate=validate)
    assert len(calls) == 4 and stored.info["epoch"] == 5  # the start, epochs 4, 5, 6 scored
    _, last, _ = fit({"epochs": 3, "selection": "last"}, matrices(1))
    assert last.info["epoch"] == 3 and last.info["selection_value"] == 0.0


def test_runtime_modules_decode_like_reconstruct():
    mats = matrices(2)
    method, stored, _ = fit({"runtime": "decoder"}, mats)
    stored = stored.as_parameters()
    normed, normed_stored, _ = fit({"norm": True, "runtime": "decoder"}, mats)
    normed_stored = normed_stored.as_parameters()
    assert "norms" in normed.linear(normed_stored, 0, None).stored_names
    first = method.linear(stored, 0, None)
    second = method.linear(stored, 1, None)
    assert isinstance(first, DecodedLinear) and isinstance(second, DecodedLinear)
    assert first.w0 is second.w0 and first.codes is not second.codes  # one shared decoder
    names = {"codes", "w0", "b0", "w1", "b1", "w2", "b2", "skip"}
    assert set(first.stored_names) == names
    inputs = torch.randn(5, 24)
    torch.testing.assert_close(first(inputs), inputs @ method.reconstruct(stored, 0).T)
    table = method.embedding(stored, 1, None)
    assert isinstance(table, DecodedEmbedding)
    ids = torch.tensor([[0, 5, 39], [7, 7, 1]])
    torch.testing.assert_close(table(ids), method.reconstruct(stored, 1)[ids])
    dense = make_method("ae", {}).linear(stored, 0, None)
    assert isinstance(dense, torch.nn.Linear)


def test_data_aware_ae_starts_at_svdllm_and_lowers_the_output_error():
    """ae-data minimises ||(W - W_hat) L||: its default linear decoder is SVD-LLM's optimum
    at its width; a non-linear decoder trained from there is better at the same width."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 16, generator=generator)
    inputs = torch.randn(400, 16, generator=generator) * torch.linspace(0.1, 3, 16)
    xtx = (inputs.T @ inputs).double()
    stats = [TargetStatistics(tokens=400, xtx=xtx)]
    factor = whitening(xtx / 400, 1e-4)
    u, s, vh = torch.linalg.svd(weight.double() @ factor.double())

    def output_error(estimate: torch.Tensor) -> float:
        return torch.linalg.matrix_norm((weight - estimate) @ factor.float()).item()

    def svdllm(width: int) -> torch.Tensor:
        return ((u[:, :width] * s[:width]) @ vh[:width]).float() @ torch.linalg.inv(factor.float())

    for options, closer in (({}, 1.0), ({"decoder": [16], "sizes": "absolute"}, 0.99)):
        method, stored, _ = fit_method(
            "ae-data",
            [weight],
            ratio=1.5,
            options={"epochs": 30, "threads": 1, **options},
            statistics=stats,
        )
        error, optimum = (
            output_error(method.reconstruct(stored, 0)),
            output_error(svdllm(stored.width)),
        )
        assert error <= closer * optimum * (1 + 1e-5)
    assert stored.info["epoch"] > 0  # the non-linear decoder trained past its start


def test_data_aware_ae_measures_each_layer_of_a_stack_in_its_own_inputs():
    """A stack shares the decoder, but layer i's codes minimise ||(W_i - W_hat_i) X_i^T||."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(48, 16, generator=generator) for _ in range(2)]
    scales = [torch.linspace(0.1, 3, 16), torch.linspace(3, 0.1, 16)]  # opposite channels
    moments = [
        (x.T @ x).double() for x in (torch.randn(400, 16, generator=generator) * s for s in scales)
    ]
    stats = [TargetStatistics(tokens=400, xtx=m) for m in moments]
    frozen = {"epochs": 1, "lr": 1e-12, "schedule": "constant", "decoder": [], "encoder": []}
    method, stored, _ = fit_method("ae-data", weights, ratio=2, options=frozen, statistics=stats)
    factors = [whitening(m / 400, 1e-4).float() for m in moments]
    pooled = whitening((moments[0] + moments[1]) / 800, 1e-4)
    basis, decode = starting_bases(
        torch.cat(weights), stored.width, OutputMetric(factors, pooled), None
    )
    for index, (weight, factor) in enumerate(zip(weights, factors, strict=True)):
        estimate = method.reconstruct(stored, index)
        residual = (weight - estimate) @ factor @ factor.T @ decode  # normal equations
        assert residual.abs().max() < 1e-3 * weight.abs().max()
        projected = weight @ basis @ decode.T  # codes from the pooled projection
        error = torch.linalg.matrix_norm((weight - estimate) @ factor)
        assert error < torch.linalg.matrix_norm((weight - projected) @ factor)


def test_the_default_decoder_depends_on_the_kind_of_matrix():
    """Embeddings: hidden sizes 2x, 4x (the paper's); layers: 16 hidden units, or for
    ae-data a linear decoder."""
    table, layer = (
        AutoencoderOptions().for_kind("embedding"),
        AutoencoderOptions().for_kind("linear"),
    )
    assert (table.decoder, table.sizes) == ([2.0, 4.0], "relative")
    assert (layer.decoder, layer.sizes) == ([16.0], "absolute")
    given = AutoencoderOptions(decoder=[3]).for_kind("linear")
    assert (given.decoder, given.sizes) == ([3.0], "relative")
    _, stored, _ = fit_method("ae", matrices(1, rows=64, cols=32), ratio=2, options={"epochs": 1})
    assert stored.info["decoder"] == [stored.width, 16, 32]
    assert DataAwareOptions().for_kind("linear").decoder == []
    assert DataAwareOptions().for_kind("embedding").decoder == [2.0, 4.0]
