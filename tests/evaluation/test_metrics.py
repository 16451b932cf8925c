import numpy as np
import pytest

from aecompress.evaluation.metrics import accuracy, f1, matthews, pearson, spearman

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
