"""Linear heads on fixed features: L2-regularised logistic and ridge regression in torch.

Everything is float64. With n examples, features X [n, d] and the head's weight W and
bias b, the fits minimise

- logistic (classes): mean cross-entropy(X W + b, y) + l2 * ||W||^2, by L-BFGS;
- ridge (scores): mean (X w + b - y)^2 + l2 * ||w||^2, in closed form;

the bias is not penalised. `choose_l2` picks l2 from a grid by k-fold cross-validation
on the examples it is given (the caller gives it the train split only), rated by a score
such as the task's metric; within a fold it walks the grid from the largest l2 down, each
iterative fit starting from the previous optimum (the objectives are strictly convex, so
the start changes only the time to reach the same optimum).
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


# fit(x, y, l2, start) -> head; `start`: a head to start an iterative fit from (or None)
Fit = Callable[[torch.Tensor, torch.Tensor, float, LinearHead | None], LinearHead]
Score = Callable[[torch.Tensor, torch.Tensor], float]  # score(outputs, y): higher is better


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Every feature shifted and scaled to mean 0, std 1 on `train` (constant features to 0),
    the same shift and scale applied to `others`."""
    mean, std = train.mean(0), train.std(0, correction=0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    l2: float,
    start: LinearHead | None = None,
    *,
    classes: int,
    max_iter: int = 500,
) -> LinearHead:
    """Multinomial logistic regression: minimise mean cross-entropy + l2 * ||W||^2 (L-BFGS
    with strong-Wolfe line search from `start` or zero, stopping at gradient 1e-7 or
    max_iter)."""
    x = x.double()
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64)
    bias = torch.zeros(classes, dtype=torch.float64)
    if start is not None:
        weight.copy_(start.weight)
        bias.copy_(start.bias)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
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


def fit_ridge(
    x: torch.Tensor, y: torch.Tensor, l2: float, start: LinearHead | None = None
) -> LinearHead:
    """Ridge regression: minimise mean squared error + l2 * ||w||^2, solved exactly
    ((Xc^T Xc / n + l2 I) w = Xc^T (y - mean y) / n on centred features; `start` is not
    needed)."""
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
    path = sorted(grid, reverse=True)
    outputs = _out_of_fold_outputs(x, y, fold, fit, path)
    scores = [_finite(score(out, y)) for out in outputs]
    best = max(scores)
    return max(l2 for l2, value in zip(path, scores, strict=True) if value == best)


def _out_of_fold_outputs(
    x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor, fit: Fit, path: Sequence[float]
) -> list[torch.Tensor]:
    """For each l2 of `path`, every example's output from the fit on the other folds; each
    fold's fits follow the path, each starting from the one before."""
    outputs: list[torch.Tensor] = []
    for k in range(int(fold.max()) + 1):
        inside, outside = fold != k, fold == k
        x_fit, y_fit, x_held = x[inside], y[inside], x[outside].double()
        head = None
        for step, l2 in enumerate(path):
            head = fit(x_fit, y_fit, l2, head)
            out = head(x_held)
            if k == 0:
                outputs.append(out.new_empty((len(x), *out.shape[1:])))
            outputs[step][outside] = out
    return outputs


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf
