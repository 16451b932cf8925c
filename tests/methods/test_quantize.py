"""Weight-only quantization maths: RTN, GPTQ, compressed-tensors packing and bit counts."""

from __future__ import annotations

import math

import pytest
import torch

from aecompress.errors import AecompressError
from aecompress.methods.quantize import (
    Grid,
    Quantized,
    QuantScheme,
    bits_per_weight,
    dequantize,
    gptq,
    pack,
    per_column,
    rtn,
    stored_bits,
)
from aecompress.modules import unpack

SCHEMES = [QuantScheme(b, g, s) for b in (2, 3, 4, 8) for g in (None, 16) for s in (True, False)]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits", [1, 9, 2.5, True])
def test_scheme_refuses_bits_outside_2_to_8(bits):
    with pytest.raises(AecompressError, match="bits"):
        QuantScheme(bits, None, True)


def test_scheme_counts_groups_and_names_a_group_that_divides():
    assert QuantScheme(4, None, True).groups(576) == 1
    assert QuantScheme(4, 64, True).groups(576) == 9
    assert QuantScheme(4, 64, True).groups(600) == 10  # the last group shorter
    with pytest.raises(
        AecompressError, match="group 128 does not divide the 576 columns: 96 or 144"
    ):
        QuantScheme(4, 128, True).check_divides(576)
    with pytest.raises(AecompressError, match="group"):
        QuantScheme(4, 0, True)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_rtn_is_within_half_a_step_of_every_weight(scheme: QuantScheme):
    weight = torch.randn(12, 64, generator=generator()) * 3 + 0.5
    quantized = rtn(weight, scheme)
    groups = scheme.groups(64)
    assert quantized.codes.dtype == quantized.zeros.dtype == torch.uint8
    assert quantized.scales.dtype == torch.float32
    assert quantized.scales.shape == quantized.zeros.shape == (12, groups)
    assert int(quantized.codes.max()) < 2**scheme.bits
    assert within(weight, quantized, 0.5)
    if scheme.symmetric:
        assert (quantized.zeros == 2 ** (scheme.bits - 1)).all()


def test_rtn_matches_compressed_tensors_conventions():
    # compressed-tensors 0.20.1 calculate_qparams + quantize on a 4-bit row [-1, 0, 0.5, 3]
    # (the module was also checked bit for bit against both on 168 random cases).
    row = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    symmetric = rtn(row, QuantScheme(4, None, True))  # scale = absmax / 7.5
    assert symmetric.scales.item() == pytest.approx(3 / 7.5)
    assert symmetric.codes.tolist() == [[6, 8, 9, 15]]  # -2.5 -> -2 (ties to even); 7.5 -> 7
    asymmetric = rtn(row, QuantScheme(4, None, False))  # scale = (hi - lo) / 15
    assert asymmetric.scales.item() == pytest.approx(4 / 15)
    assert asymmetric.zeros.tolist() == [[4]]  # round(-lo / scale) = round(3.75)
    assert asymmetric.codes.tolist() == [[0, 4, 6, 15]]


def test_rtn_range_holds_zero_and_all_zero_groups_read_zero():
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0], [2.0, 3.0, 4.0, 5.0]])
    quantized = rtn(weight, QuantScheme(3, None, False))
    assert quantized.scales[0].item() == torch.finfo(torch.float32).eps
    assert quantized.zeros[:, 0].tolist() == [4, 0, 0]
    assert dequantize(quantized)[:2, 3].tolist() == [0.0, 0.0]


def test_rtn_rounds_scales_to_their_stored_dtype_first():
    weight = torch.randn(8, 32, generator=generator())
    quantized = rtn(weight, QuantScheme(8, 16, False), scale_dtype=torch.bfloat16)
    assert torch.equal(quantized.scales.bfloat16().float(), quantized.scales)
    # a scale rounded down by up to 2^-9 (bfloat16) no longer spans the group: its
    # extremes clamp up to 255 * 2^-9 steps further
    assert within(weight, quantized, 0.5 + 255 * 2**-9)


def within(weight: torch.Tensor, quantized: Quantized, steps: float) -> bool:
    """Every weight within `steps` of its group's scale (float32 rounding aside) of its
    dequantized value."""
    scale = per_column(quantized.scales, quantized.scheme, weight.shape[1])
    error = (weight - dequantize(quantized)).abs()
    return bool((error <= steps * scale + 1e-6 * weight.abs()).all())


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 64 x 128 weight and correlated inputs X [2048, 128] (X^T X float64)."""
    weight = torch.randn(64, 128, generator=generator())
    mixing = torch.randn(128, 128, generator=generator(1)) / math.sqrt(128)
    inputs = torch.randn(2048, 128, generator=generator(2)) @ mixing
    return weight, inputs, inputs.T.double() @ inputs.double()


def output_error(weight: torch.Tensor, quantized: Quantized, inputs: torch.Tensor) -> float:
    return torch.linalg.matrix_norm((weight - dequantize(quantized)).double() @ inputs.T.double())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(b, g, s) for b in (3, 4) for g, s in ((None, True), (32, False))],
    ids=str,
)
def test_gptq_output_error_is_well_below_rtn(problem, scheme: QuantScheme, act_order: bool):
    weight, inputs, xtx = problem
    quantized = gptq(weight, xtx, scheme, act_order=act_order, block=48)
    assert quantized.scales.shape == (64, scheme.groups(128))
    ratio = output_error(weight, quantized, inputs) / output_error(
        weight, rtn(weight, scheme), inputs
    )
    assert ratio < 0.8  # measured 0.68 .. 0.74
    # (gptq was also checked against llm-compressor 0.14.0.1's quantize_weight: the same
    # dequantized weights on five schemes, act orders 'static' / 'weight' / none)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_under_the_identity_is_rtn(act_order: bool):
    # U is diagonal: a column's error changes no other column, and the static scales are
    # RTN's, so every column rounds exactly as RTN rounds it.
    weight = torch.randn(16, 64, generator=generator())
    scheme = QuantScheme(3, 16, False)
    quantized = gptq(weight, torch.eye(64, dtype=torch.float64), scheme, act_order=act_order)
    expected = rtn(weight, scheme)
    for name in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(quantized, name), getattr(expected, name))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_zeroes_inputs_never_seen(problem, symmetric: bool):
    weight, inputs, _ = problem
    dead = torch.tensor([0, 5, 77, 127])
    inputs = inputs.clone()
    inputs[:, dead] = 0
    xtx = inputs.T.double() @ inputs.double()
    scheme = QuantScheme(4, 32, symmetric)
    quantized = gptq(weight, xtx, scheme)
    rebuilt = dequantize(quantized)
    assert rebuilt.isfinite().all() and (rebuilt[:, dead] == 0).all()
    baseline = output_error(weight, rtn(weight, scheme), inputs)
    assert output_error(weight, quantized, inputs) < 0.8 * baseline


def test_gptq_refuses_a_gram_of_another_width():
    with pytest.raises(AecompressError, match="columns"):
        gptq(torch.randn(4, 8), torch.eye(6, dtype=torch.float64), QuantScheme(4, None, True))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("cols", [1, 7, 33, 100])
def test_pack_round_trip(bits: int, cols: int):
    codes = torch.randint(0, 2**bits, (5, cols), generator=generator(bits)).to(torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, math.ceil(cols * bits / 32))
    assert torch.equal(unpack(packed, bits, cols), codes)


def test_pack_words_are_those_of_compressed_tensors():
    # compressed-tensors 0.20.1 `pack_to_int32` (compressors/pack_quantized/helpers.py) on
    # the same codes as signed int8 (code - 2^(bits-1)): code j at bits 3j.., least
    # significant first, dense across words: code 10 (6 = 0b110) puts 0b10 in bits 30-31
    # of word 0 and 0b1 in bit 0 of word 1.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 6]], dtype=torch.uint8)
    expected = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    assert pack(codes, 3).tolist() == [[-1860216623, 1]]
    assert [expected % 2**32 - 2**32, expected >> 32] == [-1860216623, 1]
    # 5 bits, the zero points of an asymmetric scheme packed along the rows
    zeros = torch.tensor([[31, 16], [0, 16], [17, 16], [5, 16], [30, 16], [9, 16], [1, 16]])
    assert pack(zeros.T.to(torch.uint8), 5).T.tolist() == [[1407370271, 554189328], [0, 4]]


@pytest.mark.parametrize("symmetric", [True, False])
def test_stored_bits_are_those_of_the_packed_tensors(symmetric: bool):
    scheme = QuantScheme(3, 16, symmetric)
    quantized = rtn(torch.randn(10, 48, generator=generator()), scheme)
    words = pack(quantized.codes, 3).numel() + (
        0 if symmetric else pack(quantized.zeros.T, 3).numel()
    )
    assert quantized.stored_bits(16) == 32 * words + 16 * quantized.scales.numel()


def test_bits_per_weight():
    assert bits_per_weight(QuantScheme(4, 128, True), 64, 256, 16) == 4.125
    assert bits_per_weight(QuantScheme(4, 128, False), 64, 256, 16) == 4 + 1 / 8 + 1 / 32
    assert stored_bits(QuantScheme(3, None, True), 1, 11, 16) == 2 * 32 + 16


def test_a_shorter_last_group_has_its_own_scale_and_zero_costs_nothing_in_padding():
    weight = torch.randn(6, 40, generator=generator())
    weight[:, 32:] *= 10  # the last group (8 columns) holds the largest weights
    scheme = QuantScheme(4, 16, True)
    quantized = rtn(weight, scheme)
    assert quantized.scales.shape == (6, 3)
    expected = weight[:, 32:].abs().amax(1) / 7.5
    torch.testing.assert_close(quantized.scales[:, 2], expected)
    assert within(weight, quantized, 0.5)
    assert stored_bits(scheme, 6, 40, 16) == 6 * 32 * 5 + 6 * 3 * 16


def test_grid_snap_rounds_a_column_as_rtn_does():
    weight = torch.randn(8, 24, generator=generator())
    scheme = QuantScheme(3, 16, False)
    grid = Grid.of(weight, scheme)
    rounded = dequantize(rtn(weight, scheme))
    for column in (0, 15, 16, 23):
        torch.testing.assert_close(grid.snap(weight[:, column], column), rounded[:, column])
