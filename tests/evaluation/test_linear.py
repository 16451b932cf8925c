import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aecompress.errors import AecompressError
from aecompress.evaluation.linear import (
    L2_GRID,
    LinearHead,
    choose_l2,
    fit_logistic,
    fit_ridge,
    standardise,
)
from aecompress.evaluation.metrics import accuracy, pearson


def blobs(n: int, d: int, gap: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian classes whose means differ by `gap` along the first feature."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    x[:, 0] += gap * y
    return x, y


def test_standardise_uses_train_statistics_and_zeroes_constant_features() -> None:
    train = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    other = torch.tensor([[3.0, 7.0, 5.0]])
    train_z, other_z = standardise(train, other)
    assert torch.allclose(train_z.mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(train_z[:, [0, 2]].std(0, correction=0), torch.ones(2))
    assert torch.equal(train_z[:, 1], torch.zeros(3))  # constant: shifted, not scaled
    mean, std = train.mean(0), train.std(0, correction=0)
    expected = (other[0, [0, 2]] - mean[[0, 2]]) / std[[0, 2]]
    assert torch.allclose(other_z[0, [0, 2]], expected) and other_z[0, 1] == 2.0


def test_logistic_separates_separable_classes() -> None:
    x, y = blobs(200, 5, gap=10.0, seed=0)
    test_x, test_y = blobs(200, 5, gap=10.0, seed=1)
    head = fit_logistic(x, y, l2=1e-3, classes=2)
    assert accuracy(head(test_x).argmax(-1).numpy(), test_y.numpy()) == 100.0


def test_logistic_reaches_the_minimum_of_its_objective() -> None:
    x, y = blobs(300, 4, gap=1.0, seed=2)
    l2 = 0.01
    head = fit_logistic(x, y, l2=l2, classes=2)
    weight = head.weight.clone().requires_grad_(True)
    bias = head.bias.clone().requires_grad_(True)
    objective = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
    objective.backward()
    assert weight.grad is not None and bias.grad is not None
    assert weight.grad.abs().max() < 1e-5 and bias.grad.abs().max() < 1e-5


def test_logistic_from_a_start_reaches_the_same_optimum() -> None:
    x, y = blobs(300, 4, gap=1.0, seed=2)
    start = fit_logistic(x, y, l2=1.0, classes=2)
    warm = fit_logistic(x, y, 0.01, start, classes=2)
    cold = fit_logistic(x, y, 0.01, classes=2)
    assert not torch.allclose(start.weight, cold.weight, atol=1e-3)
    assert torch.allclose(warm.weight, cold.weight, atol=1e-5)
    assert torch.allclose(warm.bias, cold.bias, atol=1e-5)


def test_ridge_is_the_exact_penalised_least_squares_solution() -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=generator, dtype=torch.float64) + 2
    y = x @ torch.arange(6.0, dtype=torch.float64) + 0.5 + torch.randn(50, generator=generator)
    l2 = 0.3
    head = fit_ridge(x, y, l2)
    # numpy: [x 1] [w; b] = y with the rows sqrt(n * l2) [I 0] [w; b] = 0 appended
    augmented = np.hstack([x.numpy(), np.ones((50, 1))])
    penalty = np.hstack([np.sqrt(50 * l2) * np.eye(6), np.zeros((6, 1))])
    solution = np.linalg.lstsq(
        np.vstack([augmented, penalty]), np.concatenate([y.numpy(), np.zeros(6)]), rcond=None
    )[0]
    assert np.allclose(head.weight.numpy(), solution[:6]) and np.isclose(head.bias, solution[6])


def score_pearson(outputs: torch.Tensor, gold: torch.Tensor) -> float:
    return pearson(outputs.numpy(), gold.numpy())


def test_cross_validation_prefers_little_l2_for_signal_and_much_for_noise() -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(200, 30, generator=generator, dtype=torch.float64)
    signal = x @ torch.randn(30, generator=generator, dtype=torch.float64)
    noise = torch.randn(200, generator=generator, dtype=torch.float64)
    chosen = [
        choose_l2(x, y, fit_ridge, score_pearson, generator=torch.Generator().manual_seed(0))
        for y in (signal + 0.01 * noise, noise)
    ]
    assert chosen[0] < 1e-2 and chosen[1] >= 1.0


def test_cross_validation_is_seeded_and_needs_two_examples() -> None:
    x, y = blobs(60, 3, gap=1.0, seed=5)

    def score(outputs: torch.Tensor, gold: torch.Tensor) -> float:
        return accuracy(outputs.argmax(-1).numpy(), gold.numpy())

    def fit(x: torch.Tensor, y: torch.Tensor, l2: float, start: LinearHead | None):
        return fit_logistic(x, y, l2, start, classes=2)

    runs = [choose_l2(x, y, fit, score, generator=torch.Generator().manual_seed(9)) for _ in "ab"]
    assert runs[0] == runs[1] and runs[0] in L2_GRID
    with pytest.raises(AecompressError, match="at least 2 train examples"):
        choose_l2(x[:1], y[:1], fit, score)
