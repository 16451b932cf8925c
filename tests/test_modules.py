"""QuantizedLinear: every way it multiplies computes x W^T + bias of the dequantized W."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch import nn

from aecompress import modules
from aecompress.errors import AecompressError
from aecompress.methods.quantize import Quantized, QuantScheme, dequantize, pack, rtn
from aecompress.modules import QuantizedLinear

# bf16 keeps 8 significant bits: the kernels round the input, the output and (int4) the
# zero terms by a relative 2^-9 each, so ||y - ref|| / ||ref|| is a few 1e-3 (2.3e-3 to
# 2.5e-3 measured). The dequantizing path computes the reference's float32 weight
# exactly; only the matmul's order of summation may differ.
KERNEL_TOLERANCE, FLOAT32_TOLERANCE = 1e-2, 1e-5


class Case(NamedTuple):
    out: int
    cols: int
    bits: int
    group: int | None
    symmetric: bool
    kernel: str

    def __str__(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"{self.kernel}-{self.out}x{self.cols}-{self.bits}b-g{self.group}-{kind}"


CASES = [
    Case(64, 256, 4, 64, False, "int4"),
    Case(64, 256, 4, 64, True, "int4"),
    Case(64, 256, 4, None, False, "int4"),  # a row of 256 is one kernel group
    Case(32, 192, 4, 96, False, "int4"),  # kernel groups of 32, three to a group
    Case(48, 128, 8, None, True, "int8"),
    Case(48, 128, 8, None, False, "int8"),
    Case(40, 96, 3, 32, False, "dequantize"),
    Case(64, 96, 4, 48, False, "dequantize"),  # a group the int4 kernel cannot take
    Case(40, 128, 4, 64, True, "dequantize"),  # rows not a multiple of 16
    Case(48, 100, 8, None, True, "dequantize"),  # columns not a multiple of 16
    Case(24, 40, 7, 8, False, "dequantize"),
]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(
    case: Case, device: str = "cpu", kernels: bool = True
) -> tuple[Quantized, QuantizedLinear]:
    """RTN codes of a random weight (bf16 scales, as an artifact stores them) served packed."""
    weight = torch.randn(case.out, case.cols, generator=generator())
    scheme = QuantScheme(case.bits, case.group, case.symmetric)
    quantized = rtn(weight, scheme, scale_dtype=torch.bfloat16)
    zeros = None if case.symmetric else pack(quantized.zeros.T, case.bits).T.to(device)
    bias = nn.Parameter(torch.randn(case.out, generator=generator(1)).to(device))
    packed, scales = pack(quantized.codes, case.bits).to(device), quantized.scales.to(device)
    module = QuantizedLinear(packed, scales, zeros, case.bits, case.cols, bias, kernels=kernels)
    return quantized, module


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    y, reference = y.detach().float(), reference.detach()
    return float((y - reference).norm() / reference.norm())


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["2d", "3d"])
def test_each_kernel_computes_x_w_t_plus_bias(case: Case, lead: tuple[int, ...], monkeypatch):
    monkeypatch.setattr(modules, "DEQUANTIZED_WEIGHTS", 2000)  # a few blocks of rows
    quantized, module = build(case)
    assert module.kernel == case.kernel
    x = torch.randn(*lead, case.cols, generator=generator(2))
    y = module(x)
    assert y.shape == (*lead, case.out) and y.dtype == x.dtype
    reference = x @ dequantize(quantized).T + module.bias
    tolerance = FLOAT32_TOLERANCE if case.kernel == "dequantize" else KERNEL_TOLERANCE
    assert relative_error(y, reference) < tolerance


@pytest.mark.parametrize("case", CASES, ids=str)
def test_weight_is_the_dequantized_weight(case: Case):
    """Exact but for float32 rounding, except the int4 kernel's bf16 zero terms (8 - zero)
    * scale: off by at most 8 * scale * 2^-9 (0 when symmetric: zero 8)."""
    quantized, module = build(case)
    expected = dequantize(quantized)
    slack = torch.full_like(expected, 1e-6 * float(expected.abs().max()))
    if case.kernel == "int4" and not case.symmetric:
        group = expected.shape[1] // quantized.scales.shape[1]
        slack += quantized.scales.repeat_interleave(group, dim=1) * 2**-6
    assert module.weight.dtype == torch.float32
    assert ((module.weight - expected).abs() <= slack).all()


def test_a_4_bit_matrix_holds_under_0_3_of_its_bf16_bytes():
    """1536 x 576, groups of 64, asymmetric: codes 442 KB, bf16 scales and zero terms 55 KB."""
    _, module = build(Case(1536, 576, 4, 64, False, "int4"))
    resident = sum(t.numel() * t.element_size() for t in module.buffers())
    assert module.kernel == "int4" and resident <= 0.3 * 1536 * 576 * 2
    assert [name for name, _ in module.named_parameters()] == ["bias"]
    assert list(module.state_dict()) == ["bias"]


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=str)
def test_kernels_take_awkward_inputs(case: Case):
    """A bf16 view starting mid-line (the int8 kernel's aligned loads would crash on it),
    no rows at all, and a model moved to float16 (the kernels' bf16 numbers stay)."""
    quantized, module = build(case)
    weight = dequantize(quantized)
    x = torch.randn(3 * case.cols + 1, generator=generator(2)).to(torch.bfloat16)
    view = x[1:].view(3, case.cols)
    reference = view.float() @ weight.T + module.bias
    assert relative_error(module(view), reference) < KERNEL_TOLERANCE
    assert module(view[:0]).shape == (0, case.out)
    module.half()
    half = module(view.half())
    assert half.dtype == torch.float16
    assert relative_error(half, reference) < KERNEL_TOLERANCE


def test_kernels_can_be_declined_for_float32_exactly():
    quantized, module = build(CASES[0], kernels=False)
    x = torch.randn(5, CASES[0].cols, generator=generator(2))
    reference = x @ dequantize(quantized).T + module.bias
    assert module.kernel == "dequantize"
    assert relative_error(module(x), reference) < FLOAT32_TOLERANCE


def test_built_on_another_device_it_dequantizes():
    """Tensors on the meta device (no data): the dequantizing path, shapes only."""
    _, module = build(Case(64, 256, 4, 64, False, "dequantize"), device="meta")
    assert module.kernel == "dequantize"
    assert module(torch.empty(2, 3, 256, device="meta")).shape == (2, 3, 64)
    assert module.weight.shape == (64, 256)


def test_a_kernel_module_stays_on_the_cpu():
    _, module = build(CASES[0])
    with pytest.raises(AecompressError, match="cannot leave the CPU"):
        module.to("meta")
    _, dequantizing = build(CASES[6])
    assert dequantizing.to("meta").packed.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_on_cuda_it_dequantizes():
    case = CASES[0]
    quantized, module = build(case, device="cuda")
    x = torch.randn(5, case.cols, generator=generator(2))
    reference = x @ dequantize(quantized).T + module.bias.cpu()
    assert module.kernel == "dequantize"
    assert relative_error(module(x.cuda()).cpu(), reference) < FLOAT32_TOLERANCE


def test_mismatched_stored_tensors_are_refused():
    quantized, _ = build(CASES[0])
    packed, scales = pack(quantized.codes, 4), quantized.scales
    with pytest.raises(AecompressError, match="no 4-bit weight of 200 columns"):
        QuantizedLinear(packed, scales, None, 4, 200)
    with pytest.raises(AecompressError, match="zeros"):
        QuantizedLinear(packed, scales, pack(quantized.zeros, 4), 4, 256)


def test_unpack_reads_words_whose_last_stride_is_not_one():
    """A column of one word each (zero points of few rows, read back transposed) counts as
    contiguous in torch with a last stride of 2: unpack still reads it."""
    codes = torch.tensor([[1, 7, 3], [0, 5, 6]], dtype=torch.uint8)
    words = pack(codes, 3)  # [2, 1]
    strided = words.T.contiguous().as_strided((2, 1), (1, 2))
    assert strided.is_contiguous() and strided.stride(-1) == 2
    assert torch.equal(modules.unpack(strided, 3, 3), codes)
