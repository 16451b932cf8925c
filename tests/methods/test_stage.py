"""Quantization as a stage of a method: its text form, and storing / rebuilding matrices
and sparse entries from their codes."""

from __future__ import annotations

import pytest
import torch

from aecompress.methods.quantize import Grid, QuantScheme, dequantize, rtn
from aecompress.methods.stage import (
    QuantStage,
    parse_stage,
    quantize_matrix,
    rebuild_entries,
    rebuild_quantized,
    store_quantized,
)
from tests.methods.helpers import synthetic_statistics


@pytest.mark.parametrize(
    "text,fields",
    [
        ("int4", {"bits": 4}),
        ("int4:g64", {"bits": 4, "group": 64}),
        ("int3:row:rtn", {"bits": 3, "group": None, "method": "rtn"}),
        ("int2:g32:asym:gptq", {"bits": 2, "group": 32, "symmetric": False, "method": "gptq"}),
    ],
)
def test_a_stage_is_written_as_text(text: str, fields: dict):
    assert parse_stage(text) == fields
    stage = QuantStage.model_validate(text)
    assert QuantStage.model_validate(str(stage)) == stage


@pytest.mark.parametrize("text", ["4", "int", "intx:g64", "int4:g", "int4:fast"])
def test_bad_text_is_refused(text: str):
    with pytest.raises(ValueError, match=text.split(":")[-1]):
        parse_stage(text)


@pytest.mark.parametrize("scheme", [QuantScheme(3, 16, False), QuantScheme(4, None, True)])
def test_a_stored_matrix_is_rebuilt_differentiably_in_its_scales(scheme: QuantScheme):
    weight = torch.randn(10, 40, generator=torch.Generator().manual_seed(0))  # 40: a short group
    quantized = rtn(weight, scheme)
    tensors = store_quantized("a", quantized)
    assert {k for k, t in tensors.items() if not t.is_floating_point()} == {
        "a.codes",
        *(() if scheme.symmetric else ("a.zeros",)),
    }
    tensors["a.scales"] = tensors["a.scales"].clone().requires_grad_()
    rebuilt = rebuild_quantized(tensors, "a", scheme, 40)
    torch.testing.assert_close(rebuilt, dequantize(quantized))
    rebuilt.sum().backward()
    assert tensors["a.scales"].grad is not None and tensors["a.scales"].grad.abs().sum() > 0


def test_sparse_entries_are_rebuilt_on_the_dense_grid():
    weight = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme(4, 16, False)
    grid = Grid.of(weight, scheme)
    quantized = grid.quantize(weight)
    flat = torch.tensor([0, 17, 39, 40, 101, 239])
    kept = quantized.codes.reshape(-1)[flat][None]
    tensors = store_quantized("values", type(quantized)(kept, grid.scales, quantized.zeros, scheme))
    values = rebuild_entries(tensors, "values", scheme, (6, 40), flat)
    torch.testing.assert_close(values, dequantize(quantized).reshape(-1)[flat])


def test_gptq_only_with_input_statistics_and_a_gptq_stage():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    xtx = synthetic_statistics(32).xtx
    rounded = dequantize(rtn(weight, QuantScheme(3, 16, True)))
    stage = QuantStage(bits=3, group=16)
    assert torch.equal(dequantize(quantize_matrix(weight, stage)), rounded)
    rtn_stage = stage.model_copy(update={"method": "rtn"})
    assert torch.equal(dequantize(quantize_matrix(weight, rtn_stage, xtx)), rounded)
    compensated = dequantize(quantize_matrix(weight, stage, xtx))
    error = [
        ((weight - w).double() @ xtx @ (weight - w).double().T).trace()
        for w in (compensated, rounded)
    ]
    assert error[0] < error[1]
