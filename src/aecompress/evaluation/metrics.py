"""Metrics on numpy arrays, in percent (x100) as GLUE and STS tables report them, and the
standard error of those that are means (accuracy), as lm-eval computes it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]
STDERR = "_stderr"  # a metric's standard error is reported as NAME_stderr (lm-eval's naming)


def accuracy(predicted: np.ndarray, gold: np.ndarray) -> float:
    return 100.0 * float(np.mean(predicted == gold))


def mean_stderr(values: np.ndarray) -> float | None:
    """The standard error of the mean of `values`, as lm-eval's `mean_stderr`: the sample
    standard deviation (n - 1 in the denominator) over sqrt(n); None for fewer than two
    values (lm-eval reports N/A)."""
    if len(values) < 2:
        return None
    return float(np.std(values.astype(np.float64), ddof=1) / np.sqrt(len(values)))


def accuracy_stderr(predicted: np.ndarray, gold: np.ndarray) -> float | None:
    """The standard error of `accuracy` (percent): of the mean of 0/1 correctness."""
    stderr = mean_stderr(predicted == gold)
    return None if stderr is None else 100.0 * stderr


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
    from scipy import stats

    return 100.0 * float(stats.pearsonr(predicted, gold).statistic)


def spearman(predicted: np.ndarray, gold: np.ndarray) -> float:
    from scipy import stats

    return 100.0 * float(stats.spearmanr(predicted, gold).statistic)


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}

# Metrics with a closed-form standard error (lm-eval bootstraps F1 and Matthews: not here).
STDERRS: dict[str, Callable[[np.ndarray, np.ndarray], float | None]] = {"accuracy": accuracy_stderr}


def scores(names: tuple[str, ...], predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """The metrics `names` of the predictions, and NAME_stderr for each that has one."""
    found = {name: METRICS[name](predicted, gold) for name in names}
    for name in names:
        stderr = STDERRS[name](predicted, gold) if name in STDERRS else None
        if stderr is not None:
            found[name + STDERR] = stderr
    return found
