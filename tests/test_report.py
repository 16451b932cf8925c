import matplotlib

from aecompress.report import ratio_axis

matplotlib.use("Agg")


def test_ratio_axis_labels_the_grid_ratios_plainly():
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    axes.plot([3, 10, 25], [1, 2, 3])
    ratio_axis(axes, [3, 10, 25])
    figure.canvas.draw()
    assert [t.get_text() for t in axes.get_xticklabels()] == ["3", "10", "25"]
    assert list(axes.get_xticks()) == [3, 10, 25]
    assert axes.get_xticklabels(minor=True) == []
    plt.close(figure)
