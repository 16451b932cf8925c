"""The AE as a learned codec: codes (and decoder) stored as integer codes within the
budget, straight-through rounding, quantization-aware training, GPTQ on the codes."""

from __future__ import annotations

import pytest
import torch

from aecompress.budget import stored_bits
from aecompress.calibration import TargetStatistics
from aecompress.methods import Method, Stored
from aecompress.methods.autoencoder.codec import Codec
from aecompress.methods.linalg import whitening
from aecompress.methods.quantize import dequantize, rtn
from aecompress.methods.stage import QuantStage
from tests.methods.helpers import correlated_inputs, fit, spec_of


def low_rank_plus_noise(rows: int = 96, cols: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, 8, generator=generator)
    right = torch.randn(8, cols, generator=generator)
    return left @ right / 8 + 0.05 * torch.randn(rows, cols, generator=generator)


def test_straight_through_rounding_is_rtn_forward_and_identity_backward():
    codec = Codec(QuantStage.model_validate("int3:g16"), torch.float32, decoder=True)
    matrix = torch.randn(8, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    rounded = codec.round(matrix)
    expected = dequantize(rtn(matrix.detach(), codec.stage.scheme))
    torch.testing.assert_close(rounded, expected)
    (rounded * torch.arange(32.0)).sum().backward()
    assert matrix.grad is not None
    torch.testing.assert_close(matrix.grad, torch.arange(32.0).expand(8, 32))


@pytest.mark.parametrize("quantize_decoder", [True, False])
def test_codes_and_decoder_stored_as_the_budget_counts_them(quantize_decoder: bool):
    weight = low_rank_plus_noise()
    options = {"epochs": 2, "qat_epochs": 2, "quantize_decoder": quantize_decoder}
    method, stored, budget = fit("ae", [weight], ratio=3, options=options, quantize="int4:g16")
    spec = spec_of([weight], quantize="int4:g16")
    assert stored_bits(stored.tensors().values(), 32) == method.cost(stored.width, spec) <= budget
    assert method.cost(stored.width + 1, spec) > budget
    assert stored.members[0]["codes.codes"].dtype == torch.int32
    # the default decoder of a layer's matrix: 16 hidden units beside a linear skip path
    matrices = {"w0", "w1", "skip"}
    recorded = stored.layout.quantize
    assert recorded is not None
    if quantize_decoder:
        assert {f"{name}.codes" for name in matrices} <= set(stored.shared)
        assert set(recorded.cols) == {"codes"} | matrices
    else:
        assert matrices <= set(stored.shared) and recorded.cols == {"codes": stored.width}
    assert all(stored.shared[bias].is_floating_point() for bias in ("b0", "b1"))
    _, floats, _ = fit("ae", [weight], ratio=3, options=options)
    assert stored.width > floats.width  # low-bit codes: a wider code in the same bits


def test_quantization_aware_training_lowers_the_error_of_the_stored_codes():
    """A non-linear decoder (the default of a layer's matrix): training through the
    rounding after the float fit leaves stored codes and decoder closer to the matrix."""
    weight = low_rank_plus_noise(256, 128, seed=1)

    def error(qat_epochs: int) -> float:
        options = {
            "epochs": 10,
            "batch_size": 64,
            "loss": {"cosine_weight": 0, "rmse_weight": 1},
            "qat_epochs": qat_epochs,
            "qat_lr": 3e-3,
        }
        method, stored, _ = fit("ae", [weight], ratio=6, options=options, quantize="int3:g16")
        return torch.linalg.matrix_norm(weight - method.reconstruct(stored, 0)).item()

    assert error(30) < 0.95 * error(0)


class OutputErrorProblem:
    """A random layer's weight [rows, 64] and the statistics of correlated inputs; the
    output error ||(W - W_hat) L||, L L^T their second moment."""

    def __init__(self, rows: int, seed: int) -> None:
        self.weight = torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed))
        inputs = correlated_inputs(64, seed=seed)
        xtx = (inputs.T @ inputs).double()
        self.statistics = [TargetStatistics(inputs.shape[0], xtx)]
        self.factor = whitening(xtx / inputs.shape[0], 1e-4).float()

    def output_error(self, estimate: torch.Tensor) -> float:
        return torch.linalg.matrix_norm((self.weight - estimate) @ self.factor).item()


def test_a_linear_decoder_and_its_codes_rounded_in_turn_beat_svdllm_at_equal_bits():
    """ae-data on a layer (a linear decoder, stored as its basis w0^T): basis and codes
    rounded by GPTQ in turn, each refitted to the other in the output metric: a lower
    output error than svdllm with the same stage at the same ratio, and than rounding
    the float fit's codes and decoder to nearest."""
    problem = OutputErrorProblem(96, seed=2)
    weight, stats, output_error = problem.weight, problem.statistics, problem.output_error
    stage = "int3:g16"
    method, stored, _ = fit(
        "ae-data", [weight], ratio=4, options={"epochs": 5}, statistics=stats, quantize=stage
    )
    assert stored.info["codes_rounding"] == "alternated" and "w0t.codes" in stored.shared
    codec = output_error(method.reconstruct(stored, 0))
    svdllm, factors, _ = fit("svdllm", [weight], ratio=4, statistics=stats, quantize=stage)
    assert codec < 0.95 * output_error(svdllm.reconstruct(factors, 0))
    _, floats, _ = fit(
        "ae-data", [weight], width=stored.width, options={"epochs": 5}, statistics=stats
    )
    scheme = QuantStage.model_validate(stage).scheme
    codes, decoder = floats.members[0]["codes"], floats.shared["w0"]
    rounded = dequantize(rtn(codes, scheme)) @ dequantize(rtn(decoder, scheme)).T
    assert codec < 0.9 * output_error(rounded)


def test_a_quantized_linear_decoder_stores_a_narrower_code_when_that_loses_less():
    """A budget of full rank (64) at 3 bits: full-rank factors round worse than narrower
    ones, so the codec tries narrower widths and stores the one of lowest loss, in fewer
    bits than the budget; `narrow_codec: false` keeps the budget's width."""
    problem = OutputErrorProblem(64, seed=0)
    stats, stage = problem.statistics, "int3:g16"

    def fitted(narrow: bool) -> tuple[Method, Stored, float]:
        options = {"epochs": 2, "narrow_codec": narrow}
        return fit(
            "ae-data", [problem.weight], ratio=3, options=options, statistics=stats, quantize=stage
        )

    method, narrowed, budget = fitted(True)
    _, full, _ = fitted(False)
    assert full.width == 64 and narrowed.width < 64
    tried = dict(narrowed.info["codec_widths"])
    assert 64 in tried and tried[narrowed.width] == min(tried.values())
    spec = spec_of([problem.weight], quantize=stage)
    assert stored_bits(narrowed.tensors().values(), 32) == method.cost(narrowed.width, spec)
    assert method.cost(narrowed.width, spec) < method.cost(full.width, spec) <= budget
    narrowed_error = problem.output_error(method.reconstruct(narrowed, 0))
    assert narrowed_error < 0.9 * problem.output_error(method.reconstruct(full, 0))


def test_a_stack_with_a_linear_decoder_keeps_each_members_codes():
    """`ae` (the weights' own metric) on three stacked layers with one linear decoder:
    one basis, each layer its own codes, the bits its width costs, each layer rebuilt."""
    weights = [low_rank_plus_noise(seed=seed) for seed in range(3)]
    options = {"decoder": [], "epochs": 2}
    method, stored, budget = fit("ae", weights, ratio=4, options=options, quantize="int4:g16")
    spec = spec_of(weights, quantize="int4:g16")
    assert stored_bits(stored.tensors().values(), 32) == method.cost(stored.width, spec) <= budget
    assert len(stored.members) == 3 and set(stored.shared) == {"w0t.codes", "w0t.scales"}
    for index, weight in enumerate(weights):
        error = torch.linalg.matrix_norm(weight - method.reconstruct(stored, index))
        assert error < 0.5 * torch.linalg.matrix_norm(weight)
