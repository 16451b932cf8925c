"""Metrics on numpy arrays, in percent (x100) as GLUE and STS tables report them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

Metric = Callable[[np.ndarray, np.ndarray], float]


def accuracy(predicted: np.ndarray, gold: np.ndarray) -> float:
    return 100.0 * float(np.mean(predicted == gold))


def f1(predicted: np.ndarray, gold: np.ndarray) -> float:
    """F1 of the positive class (label 1)."""
    true_pos = float(np.sum((predicted == 1) & (gold == 1)))
    denominator = float(np.sum(predicted == 1) + np.sum(gold == 1))
    return 100.0 * 2 * true_pos / denominator if denominator else 0.0


def matthews(predicted: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation of binary labels (0 when a marginal is constant)."""
    tp = float(np.sum((predicted == 1) & (gold == 1)))
    tn = float(np.sum((predicted == 0) & (gold == 0)))
    fp = float(np.sum((predicted == 1) & (gold == 0)))
    fn = float(np.sum((predicted == 0) & (gold == 1)))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 100.0 * (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predicted: np.ndarray, gold: np.ndarray) -> float:
    return 100.0 * float(stats.pearsonr(predicted, gold).statistic)


def spearman(predicted: np.ndarray, gold: np.ndarray) -> float:
    return 100.0 * float(stats.spearmanr(predicted, gold).statistic)


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
