"""Quantization as a stage of a method: its text form, and storing / rebuilding matrices
and sparse entries from their codes."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from aecompress.errors import AecompressError
from aecompress.methods import GroupSpec, check_stage, make_method
from aecompress.methods.quantize import Grid, QuantScheme, dequantize, gptq, rtn
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
        (
            "int3:g64:damp=0.1:act_order=false:block=32",
            {"bits": 3, "group": 64, "damp": "0.1", "act_order": "false", "block": "32"},
        ),
    ],
)
def test_a_stage_is_written_as_text(text: str, fields: dict):
    assert parse_stage(text) == fields
    stage = QuantStage.model_validate(text)
    assert QuantStage.model_validate(str(stage)) == stage


@pytest.mark.parametrize("text", ["4", "int", "intx:g64", "int4:g", "int4:fast", "int4:ridge=0.1"])
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


def test_a_stage_takes_the_gptq_methods_settings_with_their_defaults_and_checks():
    defaults = make_method("gptq").options
    stage = QuantStage(bits=4)
    assert stage.gptq_settings == {
        "damp": defaults.damp,
        "block": defaults.block,
        "act_order": defaults.act_order,
    }
    assert str(stage) == "int4:g64:gptq"
    custom = QuantStage.model_validate("int4:g64:damp=0.1:act_order=false")
    assert (custom.damp, custom.act_order, custom.block) == (0.1, False, defaults.block)
    assert str(custom) == "int4:g64:gptq:damp=0.1:act_order=false"
    for bad in ({"damp": -1}, {"block": 0}, {"act_order": "maybe"}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            QuantStage(bits=4, **bad)
        with pytest.raises(AecompressError, match=next(iter(bad))):
            make_method("gptq", bad)
    with pytest.raises(ValidationError, match="damp: GPTQ settings, not rtn's"):
        QuantStage.model_validate("int4:rtn:damp=0.1")


def test_a_stage_runs_gptq_with_its_settings():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    xtx = synthetic_statistics(32).xtx
    stage = QuantStage(bits=3, group=16, damp=0.3, act_order=False, block=8)
    expected = gptq(weight, xtx, stage.scheme, damp=0.3, act_order=False, block=8)
    assert torch.equal(quantize_matrix(weight, stage, xtx).codes, expected.codes)
    assert not torch.equal(expected.codes, gptq(weight, xtx, stage.scheme).codes)


@pytest.mark.parametrize("method,runs", [("svdllm", True), ("sparsegpt", False), ("svd", False)])
def test_gptq_settings_are_refused_where_the_stage_runs_no_gptq(method: str, runs: bool):
    spec = GroupSpec("up", "up", "linear", 1, 8, 32, quantize=QuantStage(bits=4, damp=0.1))
    if runs:
        check_stage(make_method(method), spec)
    else:
        with pytest.raises(AecompressError, match="runs no GPTQ that damp would set"):
            check_stage(make_method(method), spec)


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
