import numpy as np
import pytest

from aecompress.evaluation.metrics import (
    accuracy,
    accuracy_stderr,
    f1,
    matthews,
    mean_stderr,
    pearson,
    scores,
    spearman,
)

PREDICTED = np.array([1, 1, 0, 0, 1])
GOLD = np.array([1, 0, 0, 1, 1])  # tp 2, tn 1, fp 1, fn 1


def test_accuracy() -> None:
    assert accuracy(PREDICTED, GOLD) == pytest.approx(60.0)


def test_f1_of_the_positive_class() -> None:
    # precision 2/3, recall 2/3
    assert f1(PREDICTED, GOLD) == pytest.approx(100 * 2 / 3)


def test_matthews() -> None:
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3*3*2*2)
    assert matthews(PREDICTED, GOLD) == pytest.approx(100 / 6)
    assert matthews(np.ones(4), np.array([0, 1, 1, 0])) == 0.0


def test_pearson() -> None:
    # deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): 3 / sqrt(2 * 42/9)
    assert pearson(np.array([1.0, 2, 3]), np.array([1.0, 2, 4])) == pytest.approx(
        100 * 3 / np.sqrt(2 * 42 / 9)
    )


def test_spearman_with_ties() -> None:
    # ranks (1..5) and (1, 2, 3.5, 5, 3.5): 8 / sqrt(10 * 9.5)
    x, y = np.array([1.0, 2, 3, 4, 5]), np.array([5.0, 6, 7, 8, 7])
    assert spearman(x, y) == pytest.approx(100 * 8 / np.sqrt(95))


def test_mean_stderr_is_lm_evals() -> None:
    from lm_eval.api.metrics import mean_stderr as lm_eval_mean_stderr

    values = np.array([1.0, 0, 0, 1, 1, 1, 0])
    assert mean_stderr(values) == pytest.approx(lm_eval_mean_stderr(list(values)))
    # sample standard deviation (n - 1) over sqrt(n): 3 right of 5, sqrt(0.3) / sqrt(5)
    assert accuracy_stderr(PREDICTED, GOLD) == pytest.approx(100 * np.sqrt(0.3 / 5))
    assert mean_stderr(np.array([1.0])) is None  # lm-eval: N/A


def test_scores_adds_the_stderr_of_accuracy_only() -> None:
    found = scores(("accuracy", "f1"), PREDICTED, GOLD)
    assert found == {
        "accuracy": accuracy(PREDICTED, GOLD),
        "f1": f1(PREDICTED, GOLD),
        "accuracy_stderr": accuracy_stderr(PREDICTED, GOLD),
    }
