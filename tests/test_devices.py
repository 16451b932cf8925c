"""Devices: auto picks what exists, a device the machine lacks is one clear error."""

import pytest
import torch

from aecompress.errors import AecompressError
from aecompress.models import resolve_device


def test_auto_is_cuda_only_where_there_is_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_missing_cuda_device_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AecompressError, match="no CUDA device"):
        resolve_device("cuda:0")
    assert resolve_device("auto").type == "cpu"


def test_unknown_devices_are_refused():
    for name in ("tpu", "gpu!", "mps"):
        with pytest.raises(AecompressError, match="device"):
            resolve_device(name)
