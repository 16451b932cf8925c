import pytest
import torch

from aecompress.errors import AecompressError
from aecompress.evaluation.common import length_batches, pad_batch, pool


def test_length_batches_longest_first() -> None:
    assert length_batches([3, 1, 4, 1, 5], 2) == [[4, 2], [0, 1], [3]]
    with pytest.raises(AecompressError):
        length_batches([1], 0)


def test_pad_batch() -> None:
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, -1.0]]
    assert pool(hidden, mask, "max").tolist() == [[3.0, 2.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    with pytest.raises(AecompressError, match="unknown pooling"):
        pool(hidden, mask, "median")
