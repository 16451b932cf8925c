"""Linear heads on fixed features: L2-regularised logistic and ridge regression in torch.

Everything is float64. With n examples, features X [n, d] and the head's weight W and
bias b, the fits minimise

- logistic (classes): mean cross-entropy(X W + b, y) + l2 * ||W||^2, by L-BFGS;
- ridge (scores): mean (X w + b - y)^2 + l2 * ||w||^2, in closed form;

the bias is not penalised. `choose_l2` picks l2 from a grid by k-fold cross-validation
on the examples it is given (the caller gives it the train split only), rated by a score
such as the task's metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aecompress.errors import AecompressError

L2_GRID = tuple(10.0**k for k in range(-5, 2))  # 1e-5 ... 10


@dataclass(frozen=True)
class LinearHead:
    weight: torch.Tensor  # [d, classes] (logistic) or [d] (ridge)
    bias: torch.Tensor  # [classes] or []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


Fit = Callable[[torch.Tensor, torch.Tensor, float], LinearHead]  # fit(x, y, l2) -> head
Score = Callable[[torch.Tensor, torch.Tensor], float]  # score(outputs, y): higher is better


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Every feature shifted and scaled to mean 0, std 1 on `train` (constant features to 0),
    the same shift and scale applied to `others`."""
    mean, std = train.mean(0), train.std(0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float, classes: int, max_iter: int = 500
) -> LinearHead:
    """Multinomial logistic regression: minimise mean cross-entropy + l2 * ||W||^2 (L-BFGS
    with strong-Wolfe line search from zero, stopping at gradient 1e-7 or max_iter)."""
    x = x.double()
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return LinearHead(weight.detach(), bias.detach())


def fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> LinearHead:
    """Ridge regression: minimise mean squared error + l2 * ||w||^2, solved exactly
    ((Xc^T Xc / n + l2 I) w = Xc^T (y - mean y) / n on centred features)."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean()
    centred = x - x_mean
    gram = centred.T @ centred / len(x) + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, centred.T @ (y - y_mean) / len(x))
    return LinearHead(weight, y_mean - x_mean @ weight)


def choose_l2(
    x: torch.Tensor,
    y: torch.Tensor,
    fit: Fit,
    score: Score,
    *,
    folds: int = 5,
    grid: Sequence[float] = L2_GRID,
    generator: torch.Generator | None = None,
) -> float:
    """The l2 of `grid` whose out-of-fold outputs score highest: (x, y) is split into
    `folds` random folds (fewer when there are fewer examples), each fold's outputs come
    from the fit on the others, and `score` rates all of them at once (NaN: worst; ties:
    the larger l2)."""
    if len(x) < 2:
        raise AecompressError("a linear probe needs at least 2 train examples")
    folds = min(folds, len(x))
    fold = torch.randperm(len(x), generator=generator) % folds
    scores = [_out_of_fold_score(x, y, fold, fit, score, l2) for l2 in grid]
    best = max(scores)
    return max(l2 for l2, value in zip(grid, scores, strict=True) if value == best)


def _out_of_fold_score(
    x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, fit: Fit, score: Score, l2: float
) -> float:
    outputs: torch.Tensor | None = None
    for k in range(int(fold.max()) + 1):
        inside, outside = fold != k, fold == k
        out = fit(x[inside], y[inside], l2)(x[outside].double())
        if outputs is None:
            outputs = out.new_empty((len(x), *out.shape[1:]))
        outputs[outside] = out
    assert outputs is not None
    value = score(outputs, y)
    return value if math.isfinite(value) else -math.inf
